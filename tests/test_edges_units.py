"""The pure parts of the edge rules: event interpretation, ledger repair and folding, the fault table."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from conftest import tmpfs

from supervisor import ledger as L
from supervisor import policy
from supervisor import protocol as P
from supervisor.checkpoints import EventRules, hash_settled
from supervisor.config import RestartConfig
from supervisor.faults import RULES, Fault, grace_s
from supervisor.protocol import parse_event, to_number


def rules(tmp_path: Path, start: int = 0, epochs: int = 4) -> EventRules:
    ck = tmp_path / "checkpoints"
    return EventRules(start, epochs, lambda e, s=None: ck / P.checkpoint_name(e, step=s), lambda raw: Path(raw))


def feed(r: EventRules, line: str, accepting: bool = True):
    ev = parse_event(line)
    assert ev is not None, line
    return r.feed(ev, accepting)


def test_nothing_after_a_trainer_fault_counts_but_a_pause_is_no_fault(tmp_path):
    r = rules(tmp_path)
    ck = tmp_path / "checkpoints"
    seen = feed(r, '{"event":"step","epoch":0,"step":0,"loss":NaN}')
    assert seen.fault[0] is Fault.NAN
    assert feed(r, json.dumps({"event": "checkpoint", "epoch": 0, "path": str(ck / "epoch-0000.pt")}),
                accepting=False).checkpoints == []  # fmt: skip
    assert Fault.STOPPED.external and not Fault.NAN.external  # the attempt keeps accepting after a pause


def test_checkpoint_rules_range_path_and_once(tmp_path):
    r = rules(tmp_path, start=1, epochs=3)
    ck = tmp_path / "checkpoints"
    ok = feed(r, json.dumps({"event": "checkpoint", "epoch": 1, "path": str(ck / "epoch-0001.pt")}))
    assert [a.epoch for a in ok.checkpoints] == [1]
    again = feed(r, json.dumps({"event": "checkpoint", "epoch": 1, "path": str(ck / "epoch-0001.pt")}))
    assert again.checkpoints == [] and again.refused == []
    for event, why in [
        ({"epoch": 0, "path": str(ck / "epoch-0000.pt")}, "outside this attempt's epochs 1..2"),
        ({"epoch": 3, "path": str(ck / "epoch-0003.pt")}, "outside"),
        ({"epoch": 2, "path": str(ck / "epoch-0001.pt")}, "not the run's checkpoint path for epoch 2"),
        ({"epoch": 2, "path": "a\u0000b"}, "without an integer epoch and a path"),
        ({"epoch": True, "path": str(ck / "epoch-0002.pt")}, "without an integer epoch"),
    ]:
        seen = feed(r, json.dumps({"event": "checkpoint", **event}))
        assert seen.checkpoints == [] and why in " ".join(seen.refused), (event, seen.refused)


def test_loss_values(tmp_path):
    r = rules(tmp_path)
    assert feed(r, '{"event":"step","epoch":0,"step":0}').fault is None
    assert feed(r, '{"event":"step","epoch":0,"step":1,"loss":"abc"}').fault is None
    assert r.no_loss == 2 and r.steps == 2
    assert feed(r, '{"event":"step","epoch":0,"step":2,"loss":' + "1" * 400 + "}").fault[0] is Fault.NAN
    assert to_number(-(10**400)) == float("-inf") and to_number("1e999999") == float("inf")
    assert to_number("12" * 500) is not None  # a long digit string is a (huge) number, not a crash
    feed(r, '{"event":"step","epoch":99,"step":0,"loss":1.0}')
    assert r.epoch == 0  # out of range: moves nothing


def test_torn_tail_is_set_aside_and_appends_start_on_a_new_line(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(b'{"fact":"session_started"}\n{"fact":"checkp')
    ledger = L.Ledger(path)
    warnings = ledger.open()
    assert any("torn" in w for w in warnings)
    side = list(tmp_path.glob("ledger.torn-*.jsonl"))
    assert [p.read_bytes() for p in side] == [b'{"fact":"checkp']
    ledger.append(L.NOTE, note="after")
    assert [json.loads(x)["fact"] for x in path.read_text().splitlines()] == ["session_started", "note"]


def test_fold_skips_facts_of_the_wrong_shape():
    facts = [
        {"fact": "attempt_started", "attempt": 0, "seed": 29, "load_epoch": -1},
        {"fact": "checkpoint", "epoch": None, "path": "x", "size": 1, "sha256": "y"},
        {"fact": "checkpoint", "epoch": 0, "path": "checkpoints/epoch-0000.pt", "size": 1, "sha256": "y"},
        {"fact": "attempt_ended", "attempt": 7},
        {"fact": "metrics", "epoch": 0, "metrics": [1, 2]},
        {"fact": "attempt_started", "attempt": 1.5, "seed": 1, "load_epoch": 0},
        {"fact": "checkpoint_removed", "epoch": 0, "sha256": "y"},
    ]
    view = L.fold(facts)
    assert len(view.skipped) == 4 and view.checkpoints == {} and view.removed == [(0, "y")]
    assert [a.attempt for a in view.attempts] == [0] and view.next_attempt == 1


def test_a_failed_append_leaves_no_half_line(tmp_path):
    with tmpfs(tmp_path / "disk", "64k") as disk:
        path = disk / "ledger.jsonl"
        ledger = L.Ledger(path)
        ledger.open()
        ledger.append(L.NOTE, note="one")
        with contextlib.suppress(OSError), open(disk / "filler", "wb") as f:
            for _ in range(64):
                f.write(b"\0" * 1000)
                f.flush()
        before = path.read_bytes()
        with pytest.raises(OSError):
            ledger.append(L.NOTE, note="x" * 20000)  # more than the few bytes left: a partial write
        assert path.read_bytes() == before


def test_hash_settled_waits_for_a_file_to_hold_still(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    size, digest = hash_settled(path, settle_s=0.0)
    assert size == 3 and len(digest) == 64


def test_fault_table_covers_every_fault_and_grace_follows_it():
    assert set(RULES) == set(Fault)
    assert grace_s(Fault.STOPPED, 30, 5) == 30 and grace_s(Fault.CUDA_ERROR, 30, 5) == 5
    assert grace_s(Fault.HANG, 30, 5) == 0 and grace_s(Fault.NAN, 2, 5) == 2
    assert {f for f in Fault if f.pauses} == {Fault.STOPPED, Fault.TIME_LIMIT, Fault.PREEMPTED}


def test_rollback_note_only_when_something_was_rolled_back():
    facts = [
        {"fact": "attempt_started", "attempt": 0, "seed": 29, "load_epoch": -1},
        {"fact": "attempt_ended", "attempt": 0, "fault": "nan", "failed_epoch": 0, "steps": 3},
        {"fact": "attempt_started", "attempt": 1, "seed": 28, "load_epoch": -1},
        {"fact": "attempt_ended", "attempt": 1, "fault": "nan", "failed_epoch": 0, "steps": 3},
    ]
    d = policy.decide(L.fold(facts), RestartConfig(no_progress_limit=9), [29, 28, 31], "r", 4, 0.5)
    assert isinstance(d, policy.Launch) and d.load_epoch == -1 and d.note == ""
