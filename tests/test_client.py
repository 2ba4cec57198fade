"""The trainer-side helper with real files, threads, signals and torch: background checkpoint saves,
checkpoint requests, SIGTERM, random states and resumable batch order. No assertion on durations."""

from __future__ import annotations

import collections
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from supervisor import client
from supervisor import protocol as P
from supervisor.client import (
    CheckpointRequest,
    NonFiniteLoss,
    SkipBatches,
    Supervised,
    atomic_write,
    capture_rng,
    restore_rng,
    sha256_file,
    snapshot,
)

ROOT = Path(__file__).resolve().parents[1]


def _sup(tmp: Path, **kw) -> Supervised:
    return Supervised(checkpoint_dir=tmp / "ckpt", events_path=tmp / "events.jsonl", **kw)


def _events(tmp: Path, kind: str | None = None) -> list[dict]:
    path = tmp / "events.jsonl"
    if not path.exists():
        return []
    out = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in out if kind is None or e["event"] == kind]


def _state() -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "model": collections.OrderedDict(w=torch.randn(64, 32, generator=g), b=torch.zeros(32)),
        "meta": {"epoch": 3, "name": "x", "lr": 0.125, "none": None},
        "list": [torch.arange(5), (1, "a", 2.5)],
    }


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


class GatedSave:
    """torch.save that waits for `gate` before writing: a slow disk the test controls. `log` records
    the order in which saves start and end."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.gate = threading.Event()
        self.log: list[str] = []
        self.real = torch.save
        self.count = 0
        monkeypatch.setattr(torch, "save", self)

    def __call__(self, obj, f, *args, **kwargs):
        self.count += 1
        n = self.count
        self.log.append(f"start {n}")
        assert self.gate.wait(60), "the test never opened the gate"
        self.real(obj, f, *args, **kwargs)
        self.log.append(f"end {n}")


def open_gate_when_main_blocks(gate: threading.Event) -> tuple[threading.Thread, list[bool]]:
    """Open `gate` once the main thread is blocked waiting for the in-flight save (or after 30 s,
    so a broken implementation fails instead of hanging). The list says whether it was seen blocked."""
    main, seen = threading.main_thread().ident, []

    def watch() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not seen:
            frame = sys._current_frames().get(main)
            while frame is not None:
                if frame.f_code.co_name == "_join_save":
                    seen.append(True)
                    break
                frame = frame.f_back
            time.sleep(0.005)
        gate.set()

    t = threading.Thread(target=watch)
    t.start()
    return t, seen


# -- background saves -----------------------------------------------------------------------------


@pytest.mark.parametrize("background", [True, False])
def test_a_save_is_announced_with_the_sha256_and_size_of_the_file(tmp_path, background):
    sup, state = _sup(tmp_path), _state()
    end = sup.save_checkpoint(state, 2, background=background)
    mid = sup.save_checkpoint(state, 3, step=7, background=background)
    sup.wait()
    assert end == tmp_path / "ckpt" / "epoch-0002.pt"
    assert mid == tmp_path / "ckpt" / "epoch-0003-step-00000007.pt"
    ev_end, ev_mid = _events(tmp_path, "checkpoint")
    for ev, path in ((ev_end, end), (ev_mid, mid)):
        assert ev["path"] == str(path)
        assert ev["sha256"] == sha256_file(path) and ev["size"] == path.stat().st_size
        assert ev["stall_s"] >= 0 and ev["write_s"] >= 0 and "request" not in ev
        assert _same(torch.load(path, weights_only=True), state)
    assert "step" not in ev_end and (ev_mid["epoch"], ev_mid["step"]) == (3, 7)
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")]  # no temp file left


@pytest.mark.parametrize("reuse", [True, False])
def test_each_save_holds_the_values_of_its_own_call(tmp_path, reuse):
    """Snapshots copy into the previous snapshot's buffers (reuse_buffers): never stale values."""
    sup, state = _sup(tmp_path, reuse_buffers=reuse), _state()
    expected = []
    for epoch in range(3):
        state["model"]["w"].add_(1.0)
        state["meta"]["epoch"] = epoch
        expected.append(snapshot(state))
        sup.save_checkpoint(state, epoch)
    sup.wait()
    for epoch in range(3):
        assert _same(torch.load(tmp_path / "ckpt" / f"epoch-{epoch:04d}.pt", weights_only=True), expected[epoch])


def test_the_caller_goes_on_before_the_write_and_its_changes_do_not_reach_the_file(tmp_path, monkeypatch):
    save = GatedSave(monkeypatch)
    sup, state = _sup(tmp_path), _state()
    expected = snapshot(state)
    path = sup.save_checkpoint(state, 0)
    # save_checkpoint returned while the write is held: nothing on disk, nothing announced yet.
    assert "end 1" not in save.log and not path.exists() and _events(tmp_path) == []
    state["model"]["w"].add_(1.0)  # training goes on and changes the live tensors
    state["list"][0].zero_()
    sup.heartbeat(phase="training")
    save.gate.set()
    sup.wait()
    assert save.log == ["start 1", "end 1"]
    assert _same(torch.load(path, weights_only=True), expected)
    kinds = [e["event"] for e in _events(tmp_path)]
    assert kinds == ["heartbeat", "checkpoint"]  # announced after the caller had moved on


def test_only_one_save_is_in_flight(tmp_path, monkeypatch):
    save = GatedSave(monkeypatch)
    sup = _sup(tmp_path)
    sup.save_checkpoint(_state(), 0)
    watcher, seen = open_gate_when_main_blocks(save.gate)
    sup.save_checkpoint(_state(), 1)  # must wait for save 1 before starting (or even snapshotting)
    watcher.join()
    sup.wait()
    assert seen == [True]
    assert save.log == ["start 1", "end 1", "start 2", "end 2"]
    assert [e["epoch"] for e in _events(tmp_path, "checkpoint")] == [0, 1]


def test_a_failed_background_save_is_raised_by_wait_and_by_the_next_save(tmp_path, capfd):
    (tmp_path / "ckpt").write_text("a file where the checkpoint dir should be")
    sup = _sup(tmp_path)
    sup.save_checkpoint(_state(), 0)  # returns: the failure happens in the background
    with pytest.raises(OSError):
        sup.wait()
    sup.wait()  # raised once, then cleared
    assert "checkpoint save of" in capfd.readouterr().err  # also said at once, for a script that never waits
    sup.save_checkpoint(_state(), 1)
    with pytest.raises(OSError):
        sup.save_checkpoint(_state(), 2)
    with pytest.raises(OSError), sup:  # leaving the block waits, and raises the error of the last save
        sup.save_checkpoint(_state(), 3)
    assert _events(tmp_path, "checkpoint") == []


def test_a_nan_is_reported_after_the_in_flight_checkpoint_is_announced(tmp_path, monkeypatch):
    save = GatedSave(monkeypatch)
    sup = _sup(tmp_path)
    sup.save_checkpoint(_state(), 4)
    watcher, seen = open_gate_when_main_blocks(save.gate)
    with pytest.raises(NonFiniteLoss):
        sup.step(5, 0, math.nan)
    watcher.join()
    assert seen == [True]
    assert [e["event"] for e in _events(tmp_path)] == ["checkpoint", "step"]


def test_snapshot_copies_tensors_once_and_keeps_state_dict_metadata():
    bn = torch.nn.BatchNorm1d(3)
    sd = bn.state_dict()
    shared = torch.ones(4)
    snap = snapshot({"bn": sd, "a": shared, "b": shared, "t": (shared, 2)})
    assert type(snap["bn"]) is collections.OrderedDict and snap["bn"]._metadata == sd._metadata
    assert snap["a"] is snap["b"] is snap["t"][0] and snap["a"].data_ptr() != shared.data_ptr()
    sd["running_mean"].add_(5)
    assert torch.equal(snap["bn"]["running_mean"], torch.zeros(3))


# -- events -------------------------------------------------------------------------------------


def test_every_event_has_a_time_and_the_capability_is_declared_once(tmp_path):
    sup = _sup(tmp_path)
    before = time.time()
    sup.handles_requests()
    sup.handles_requests()
    sup.step(0, 0, 1.5)
    sup.step(0, 1, 1.25, t=123.0)  # a caller's own t wins
    events = _events(tmp_path)
    assert [e["event"] for e in events] == ["heartbeat", "step", "step"]
    assert events[0][P.HANDLES] == [P.CAPABILITY_CHECKPOINT_REQUEST]
    assert all(round(e["t"], 3) == e["t"] for e in events)
    assert events[0]["t"] >= round(before, 3) - 0.001 and events[2]["t"] == 123.0


# -- checkpoint requests ------------------------------------------------------------------------


def _write_request(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def test_requests_ignore_garbage_half_files_and_old_ids(tmp_path):
    req_path = tmp_path / "request.json"
    sup = _sup(tmp_path, request_path=req_path)
    assert sup.checkpoint_requested() is None  # no file
    _write_request(req_path, b"\x00garbage")
    assert sup.checkpoint_requested() is None
    _write_request(req_path, b'{"id": 1, "reason": "pre')  # half-written
    assert sup.checkpoint_requested() is None
    _write_request(req_path, b'{"id": "1", "reason": "x"}')  # wrong type
    assert sup.checkpoint_requested() is None
    _write_request(req_path, CheckpointRequest(1, "preempted").to_json())
    req = sup.checkpoint_requested()
    assert req == CheckpointRequest(1, "preempted", False)
    assert sup.checkpoint_requested() == req  # pending until served
    sup.save_checkpoint({"x": torch.ones(1)}, 0, step=3, request=req)
    assert sup.checkpoint_requested() is None  # served
    _write_request(req_path, CheckpointRequest(1, "preempted").to_json())  # the same id again
    assert sup.checkpoint_requested() is None
    _write_request(req_path, CheckpointRequest(0, "older").to_json())
    assert sup.checkpoint_requested() is None
    _write_request(req_path, CheckpointRequest(2, "stopped", stop=True).to_json())
    assert sup.checkpoint_requested() == CheckpointRequest(2, "stopped", True)
    sup.wait()
    ev = _events(tmp_path, "checkpoint")[0]
    assert (ev["epoch"], ev["step"], ev["request"], ev["reason"]) == (0, 3, 1, "preempted")


def test_polling_a_request_costs_one_stat_until_the_file_changes(tmp_path, monkeypatch):
    req_path = tmp_path / "request.json"
    _write_request(req_path, CheckpointRequest(4, "preempted").to_json())
    sup = _sup(tmp_path, request_path=req_path)
    calls = {"stat": 0, "read": 0}
    real_stat, real_read = os.stat, client._read_bytes

    def counting_stat(path, *a, **kw):
        if Path(path) == req_path:
            calls["stat"] += 1
        return real_stat(path, *a, **kw)

    def counting_read(path):
        calls["read"] += 1
        return real_read(path)

    monkeypatch.setattr(client.os, "stat", counting_stat)
    monkeypatch.setattr(client, "_read_bytes", counting_read)
    for _ in range(100):
        assert sup.checkpoint_requested().id == 4
    assert calls == {"stat": 100, "read": 1}
    _write_request(req_path, CheckpointRequest(5, "stopped", stop=True).to_json())
    assert sup.checkpoint_requested().id == 5
    assert calls == {"stat": 101, "read": 2}


# -- random states ------------------------------------------------------------------------------


def _draws() -> list:
    return [random.random(), random.gauss(0, 1), float(np.random.rand()), float(np.random.randn()),
            torch.rand(4), torch.randn(2)]  # fmt: skip


def test_random_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    random.gauss(0, 1)  # leaves a cached second gaussian in Python's generator ...
    np.random.randn()  # ... and in NumPy's: both must be captured
    torch.save({"rng": capture_rng()}, tmp_path / "rng.pt")
    expected = _draws()
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert _same(_draws(), expected)


# -- SIGTERM ------------------------------------------------------------------------------------

SIGTERM_SCRIPT = r"""
import sys, time
from supervisor.client import Supervised
sup = Supervised.from_env()
sup.install_sigterm_handler()
print("ready", flush=True)
step = 0
while True:
    step += 1
    if sys.argv[1] == "serve":
        req = sup.checkpoint_requested()
        if req is not None:
            sup.save_checkpoint({"step": step}, 0, step=step, request=req)
            if req.stop:
                sup.wait()
                print("stopped", step, flush=True)
                sys.exit(0)
    time.sleep(0.01)
"""


def _spawn(tmp_path: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, P.ENV_EVENTS: str(tmp_path / "events.jsonl"), P.ENV_CHECKPOINT_DIR: str(tmp_path / "ckpt")}
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT, mode], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_sigterm_is_a_stop_request_served_at_the_next_step(tmp_path):
    proc = _spawn(tmp_path, "serve")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    step = int(out.split()[-1])
    (ev,) = _events(tmp_path, "checkpoint")
    path = Path(ev["path"])
    assert (ev["epoch"], ev["step"], ev["reason"]) == (0, step, "sigterm") and "request" not in ev
    assert path.name == f"epoch-0000-step-{step:08d}.pt" and ev["sha256"] == sha256_file(path)
    assert torch.load(path, weights_only=True) == {"step": step}


def test_a_second_sigterm_kills_at_once(tmp_path):
    proc = _spawn(tmp_path, "ignore")  # a script that never looks at requests
    proc.send_signal(signal.SIGTERM)
    assert "SIGTERM" in proc.stderr.readline()  # the first one was caught
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM
    proc.communicate()


def test_a_sigterm_with_a_request_pending_serves_the_request_and_stops(tmp_path):
    req_path = tmp_path / "request.json"
    sup = _sup(tmp_path, request_path=req_path)
    previous = sup.install_sigterm_handler()
    try:
        _write_request(req_path, CheckpointRequest(7, "preempted").to_json())
        os.kill(os.getpid(), signal.SIGTERM)
        req = sup.checkpoint_requested()
        assert req == CheckpointRequest(7, "preempted", stop=True)
        sup.save_checkpoint({"x": 1}, 0, step=1, request=req, background=False)
        assert sup.checkpoint_requested() is None  # one checkpoint served both
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert _events(tmp_path, "checkpoint")[0]["request"] == 7


# -- environment and resumable order ------------------------------------------------------------


def test_from_env_reads_a_mid_epoch_resume_and_loads_it(tmp_path):
    ck = tmp_path / "ck"
    env = {P.ENV_CHECKPOINT_DIR: str(ck), P.ENV_LOAD_EPOCH: "3", P.ENV_START_STEP: "7",
           P.ENV_CHECKPOINT_REQUEST: str(tmp_path / "req.json")}  # fmt: skip
    sup = Supervised.from_env(env)
    assert (sup.load_epoch, sup.start_epoch, sup.start_step) == (3, 3, 7)  # inside epoch 3, not after it
    assert sup.request_path == tmp_path / "req.json"
    path = sup.save_checkpoint({"w": torch.arange(3)}, 3, step=7, background=False)
    assert sup.resume_path() == path == ck / "epoch-0003-step-00000007.pt"
    sup = Supervised.from_env({**env, P.ENV_LOAD_SHA256: sha256_file(path), P.ENV_START_EPOCH: "3"})
    assert torch.equal(sup.load_checkpoint()["w"], torch.arange(3))
    sup = Supervised.from_env({**env, P.ENV_LOAD_SHA256: "0" * 64})
    with pytest.raises(client.ChecksumMismatch):
        sup.load_checkpoint()
    assert Supervised.from_env({P.ENV_LOAD_EPOCH: "3"}).start_epoch == 4  # an epoch end: the next epoch


def test_skip_batches_resumes_an_epoch_without_loading_the_skipped_batches():
    data = torch.arange(50) * 10
    loaded: list[int] = []

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            loaded.append(i)
            return data[i]

    def sampler():
        inner = DistributedSampler(range(len(data)), num_replicas=1, rank=0, shuffle=True, seed=7)
        return SkipBatches(BatchSampler(inner, batch_size=4, drop_last=False))

    full = sampler()
    full.set_epoch(3)
    whole = [b.tolist() for b in DataLoader(Data(), batch_sampler=full)]
    resumed = sampler()  # a new process: same seed, same epoch, 5 batches already trained
    resumed.set_epoch(3, skip=5)
    loaded.clear()
    rest = [b.tolist() for b in DataLoader(Data(), batch_sampler=resumed)]
    assert len(whole) == 13 and len(resumed) == 8
    assert rest == whole[5:]
    assert len(loaded) == sum(len(b) for b in rest)  # the skipped batches were never loaded
    full.set_epoch(4)
    assert [b.tolist() for b in DataLoader(Data(), batch_sampler=full)] != whole  # another epoch, another order


# -- step-based runs (run.toml `steps = N`) ------------------------------------------------------


def _step_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {client.ENV_UNIT: "steps", client.ENV_STEPS: "40", P.ENV_CHECKPOINT_DIR: str(tmp / "ckpt"),
           P.ENV_EVENTS: str(tmp / "events.jsonl"), P.ENV_SEED: "29",
           P.ENV_CHECKPOINT_REQUEST: str(tmp / "request.json")}  # fmt: skip
    return {**env, **extra}


def test_from_env_reads_a_step_run_fresh_and_resumed(tmp_path):
    sup = Supervised.from_env(_step_env(tmp_path, **{P.ENV_START_STEP: "0", P.ENV_LOAD_PATH: ""}))
    assert (sup.unit, sup.step_run, sup.steps, sup.epochs) == ("steps", True, 40, None)
    assert (sup.start_step, sup.start_epoch, sup.seed) == (0, 0, 29)
    assert sup.checkpoint_pattern == client.DEFAULT_STEP_RUN_PATTERN == "step-{step:08d}.pt"
    assert sup.resume_path() is None and sup.load_checkpoint() is None  # fresh start
    path = sup.save_checkpoint({"w": torch.arange(4)}, step=25, background=False)
    assert path == tmp_path / "ckpt" / "step-00000025.pt"
    resumed = Supervised.from_env(_step_env(tmp_path, **{P.ENV_START_STEP: "25", P.ENV_LOAD_PATH: str(path),
                                                         P.ENV_LOAD_SHA256: sha256_file(path)}))  # fmt: skip
    assert (resumed.start_step, resumed.start_epoch) == (25, 0)
    assert resumed.resume_path() == path and torch.equal(resumed.load_checkpoint()["w"], torch.arange(4))
    # Without SUPERVISOR_LOAD_PATH the checkpoint of START_STEP is the one to load.
    assert Supervised.from_env(_step_env(tmp_path, **{P.ENV_START_STEP: "25"})).resume_path() == path
    bad = Supervised.from_env(_step_env(tmp_path, **{P.ENV_START_STEP: "25", P.ENV_LOAD_SHA256: "0" * 64}))
    with pytest.raises(client.ChecksumMismatch):
        bad.load_checkpoint()


def test_an_epoch_run_is_unchanged_and_the_default_unit():
    sup = Supervised.from_env({P.ENV_EPOCHS: "5", P.ENV_LOAD_EPOCH: "1"})
    assert (sup.unit, sup.step_run, sup.steps, sup.epochs, sup.start_epoch) == ("epochs", False, None, 5, 2)
    assert sup.checkpoint_pattern == P.DEFAULT_CHECKPOINT_PATTERN
    assert Supervised().unit == "epochs" and Supervised(unit="steps").checkpoint_pattern == "step-{step:08d}.pt"
    with pytest.raises(ValueError, match="unit"):
        Supervised(unit="iterations")


def test_the_checkpoint_pattern_comes_from_the_environment_in_both_units(tmp_path):
    step = Supervised.from_env(_step_env(tmp_path, **{client.ENV_CHECKPOINT_PATTERN: "sub/it-{step}.ckpt"}))
    assert step.checkpoint_path(step=7) == tmp_path / "ckpt" / "sub" / "it-7.ckpt"
    absolute = Supervised.from_env(_step_env(tmp_path, **{client.ENV_CHECKPOINT_PATTERN: "{checkpoint_dir}/s{step}"}))
    assert absolute.checkpoint_path(step=3) == tmp_path / "ckpt" / "s3"
    epoch = Supervised.from_env({P.ENV_CHECKPOINT_DIR: str(tmp_path), client.ENV_CHECKPOINT_PATTERN: "e{epoch}.pt"})
    assert epoch.checkpoint_path(2) == tmp_path / "e2.pt"
    assert epoch.checkpoint_path(2, step=5) == tmp_path / "epoch-0002-step-00000005.pt"  # mid-epoch: step_pattern
    with pytest.raises(TypeError):
        step.checkpoint_path()  # a step run names checkpoints by step
    with pytest.raises(TypeError):
        epoch.checkpoint_path(step=5)  # an epoch run needs the epoch


def test_step_run_events_carry_the_global_step_and_no_epoch(tmp_path):
    sup = Supervised.from_env(_step_env(tmp_path))
    sup.step(step=1, loss=2.5)
    sup.step(step=2, loss=2.25, epoch=0, lr=0.1)  # an epoch may be added: informational
    sup.eval({"val_loss": 1.5}, step=2)
    sup.checkpoint_done(step=2, sha256="ab")
    with pytest.raises(NonFiniteLoss, match="step 3"):
        sup.step(step=3, loss=math.inf)
    with pytest.raises(TypeError):
        sup.step(loss=1.0)
    e = _events(tmp_path)
    strip = [{k: v for k, v in x.items() if k != "t"} for x in e]
    assert strip == [
        {"event": "step", "step": 1, "loss": 2.5},
        {"event": "step", "epoch": 0, "step": 2, "loss": 2.25, "lr": 0.1},
        {"event": "eval", "step": 2, "metrics": {"val_loss": 1.5}},
        {"event": "checkpoint", "step": 2, "path": str(tmp_path / "ckpt" / "step-00000002.pt"), "sha256": "ab"},
        {"event": "step", "step": 3, "loss": math.inf},
    ]
    # The old epoch-run forms still write what they wrote.
    old = _sup(tmp_path / "old")
    old.step(1, 4, 0.5)
    old.eval(1, {"AP50": 0.5})
    old.checkpoint_done(1)
    got = [{k: v for k, v in x.items() if k != "t"} for x in _events(tmp_path / "old")]
    old_path = str(tmp_path / "old" / "ckpt" / "epoch-0001.pt")
    assert got == [{"event": "step", "epoch": 1, "step": 4, "loss": 0.5},
                   {"event": "eval", "epoch": 1, "metrics": {"AP50": 0.5}},
                   {"event": "checkpoint", "epoch": 1, "path": old_path}]  # fmt: skip


@pytest.mark.parametrize("background", [True, False])
def test_a_step_run_serves_requests_with_step_checkpoints(tmp_path, background):
    sup = Supervised.from_env(_step_env(tmp_path, **{P.ENV_START_STEP: "10"}))
    req_path = tmp_path / "request.json"
    state = {"w": torch.zeros(3)}
    served = []
    for step in range(11, 16):  # global steps 11.. after resuming from 10
        state["w"].add_(1)
        sup.step(step=step, loss=1.0 / step)
        if step == 12:
            _write_request(req_path, CheckpointRequest(1, "every_s").to_json())
        if step == 14:
            _write_request(req_path, CheckpointRequest(2, "preempted", stop=True).to_json())
        req = sup.checkpoint_requested()
        if req is not None:
            sup.save_checkpoint(state, step=step, request=req, background=background)
            served.append((step, req.id, req.stop))
            if req.stop:
                break
    sup.wait()
    assert served == [(12, 1, False), (14, 2, True)]
    ev = _events(tmp_path, "checkpoint")
    assert [(e["step"], e["request"], e["reason"]) for e in ev] == [(12, 1, "every_s"), (14, 2, "preempted")]
    assert all("epoch" not in e for e in ev)
    for e in ev:
        path = Path(e["path"])
        assert path.name == f"step-{e['step']:08d}.pt" and e["sha256"] == sha256_file(path)
    last = torch.load(tmp_path / "ckpt" / "step-00000014.pt", weights_only=True)
    assert torch.equal(last["w"], torch.full((3,), 4.0))


# -- several processes (torchrun) ---------------------------------------------------------------


def _rank_events(tmp: Path, rank: int, kind: str | None = None) -> list[dict]:
    path = P.rank_events_path(tmp / "attempt-0001.events.jsonl", rank)
    if not path.exists():
        return []
    out = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in out if kind is None or e["event"] == kind]


def test_from_env_reads_rank_and_world_size():
    sup = Supervised.from_env({P.ENV_RANK: "3", P.ENV_WORLD_SIZE: "4"})
    assert (sup.rank, sup.world_size, sup.is_main) == (3, 4, False)
    sup = Supervised.from_env({})
    assert (sup.rank, sup.world_size, sup.is_main) == (0, 1, True)


def test_another_rank_writes_its_steps_and_heartbeats_to_its_own_file_and_saves_nothing(tmp_path):
    events = tmp_path / "attempt-0001.events.jsonl"
    req_path = tmp_path / "request.json"
    main = Supervised(checkpoint_dir=tmp_path / "ckpt", events_path=events, rank=0, world_size=2)
    other = Supervised(checkpoint_dir=tmp_path / "ckpt", events_path=events, rank=1, world_size=2,
                       request_path=req_path)  # fmt: skip
    assert other.rank_events_path == tmp_path / "attempt-0001.rank-1.events.jsonl"
    assert main.rank_events_path == events
    other.handles_requests()
    other.step(0, 0, 1.5, lr=0.1)
    other.heartbeat(phase="eval")
    other.eval(0, {"AP50": 0.5})  # dropped: rank 0 evaluates
    other.checkpoint_done(0, path=tmp_path / "x.pt")  # dropped: only rank 0's checkpoints count
    main.step(0, 0, 1.25)
    assert [e["event"] for e in _rank_events(tmp_path, 1)] == ["heartbeat", "step", "heartbeat"]
    assert _rank_events(tmp_path, 1, "step")[0]["loss"] == 1.5
    assert [(e["event"], e.get("loss")) for e in _rank_events(tmp_path, 0)] == [("step", 1.25)]

    # save_checkpoint on another rank: nothing written or announced, the path returned, the request served.
    _write_request(req_path, CheckpointRequest(4, "preempted").to_json())
    req = other.checkpoint_requested(sync=False)  # no process group: this rank reads the file itself
    assert req == CheckpointRequest(4, "preempted")
    path = other.save_checkpoint({"w": torch.ones(2)}, 0, step=3, request=req)
    assert path == tmp_path / "ckpt" / "epoch-0000-step-00000003.pt" and not path.exists()
    other.wait()
    assert other.checkpoint_requested(sync=False) is None
    assert not (tmp_path / "ckpt").exists()
    assert _rank_events(tmp_path, 1, "checkpoint") == [] and _rank_events(tmp_path, 0, "checkpoint") == []
    with pytest.raises(NonFiniteLoss):
        other.step(0, 1, float("nan"))  # a NaN is reported in the rank's own file, then raised
    assert math.isnan(_rank_events(tmp_path, 1, "step")[-1]["loss"])


def test_requests_are_not_synchronized_without_a_process_group(tmp_path):
    sup = _sup(tmp_path, request_path=tmp_path / "request.json")
    with pytest.raises(RuntimeError, match="process group"):
        sup.checkpoint_requested(sync=True)
    assert sup.checkpoint_requested() is None  # auto: one process, the file alone


def test_a_reason_survives_the_int64_packing():
    for reason in ("", "preempted", "time limit", "ünïcødé", "x" * client.REASON_SYNC_BYTES):
        words = client._pack_reason(reason)
        assert all(0 <= w < 2**63 for w in words)
        assert client._unpack_reason(words) == reason
    assert client._unpack_reason(client._pack_reason("y" * 300)) == "y" * client.REASON_SYNC_BYTES


RANKS_SCRIPT = r"""
import json, os, sys, time
import torch.distributed as dist
from supervisor.client import Supervised
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + os.environ["TEST_PORT"], rank=rank, world_size=2)
sup = Supervised.from_env()
sup.install_sigterm_handler()
pause = 0.002 if rank == 0 else 0.03  # the ranks step at different speeds
step = 0
while step < 20000:
    time.sleep(pause)
    sup.step(0, step, loss=float(rank + step))
    req = sup.checkpoint_requested()
    step += 1
    if req is not None:
        sup.save_checkpoint({"step": step, "rank": rank}, 0, step=step, request=req)
        print(json.dumps({"rank": rank, "step": step, "id": req.id, "reason": req.reason, "stop": req.stop}),
              flush=True)
        if req.stop:
            sup.wait()
            break
dist.destroy_process_group()
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_serve_a_request_and_a_sigterm_of_one_rank_at_the_same_step(tmp_path):
    """Two real processes (gloo): rank 0 reads the request file and its decision reaches rank 1 in the step's
    one collective, though rank 1 runs ten times slower; a SIGTERM sent to rank 1 alone stops both at the same
    step. Only rank 0 saves and announces."""
    events, req_path, port = tmp_path / "attempt-0001.events.jsonl", tmp_path / "request.json", str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, P.ENV_EVENTS: str(events), P.ENV_CHECKPOINT_DIR: str(tmp_path / "ckpt"),
               P.ENV_CHECKPOINT_REQUEST: str(req_path), P.ENV_RANK: str(rank), P.ENV_WORLD_SIZE: "2",
               "TEST_PORT": port, "OMP_NUM_THREADS": "1"}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-c", RANKS_SCRIPT], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))  # fmt: skip
    try:
        deadline = time.monotonic() + 120

        def wait_for(pred, what):
            while not pred():
                assert time.monotonic() < deadline and all(p.poll() is None for p in procs), what
                time.sleep(0.02)

        wait_for(lambda: len(_rank_events(tmp_path, 1, "step")) >= 3, "rank 1 stepping")
        _write_request(req_path, CheckpointRequest(1, "every_s").to_json())
        wait_for(lambda: _rank_events(tmp_path, 0, "checkpoint"), "the request served")
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    served = [[json.loads(line) for line in out.splitlines()] for out, _ in outs]
    for s in served:
        for line in s:
            line.pop("rank")
    assert served[0] == served[1]  # the same requests, at the same steps, on both ranks
    (first, last) = served[0]
    assert (first["id"], first["reason"], first["stop"]) == (1, "every_s", False)
    assert (last["id"], last["reason"], last["stop"]) == (client.SIGTERM_REQUEST_ID, "sigterm", True)
    ckpts = _rank_events(tmp_path, 0, "checkpoint")
    assert [(c["step"], c.get("request"), c["reason"]) for c in ckpts] == [
        (first["step"], 1, "every_s"), (last["step"], None, "sigterm")]  # fmt: skip
    assert torch.load(ckpts[-1]["path"], weights_only=True) == {"step": last["step"], "rank": 0}
    assert _rank_events(tmp_path, 1, "checkpoint") == []  # rank 1 saved and announced nothing
    steps = [[e["step"] for e in _rank_events(tmp_path, r, "step")] for r in (0, 1)]
    assert steps[0] == steps[1] == list(range(last["step"]))  # nothing stepped past the stop on either rank


def test_a_custom_step_pattern_reaches_the_client_through_the_environment(tmp_path):
    """[checkpoints] step_pattern travels as SUPERVISOR_STEP_PATTERN, so mid-epoch files get the run's names."""
    from supervisor.attempt import Attempt, AttemptSpec
    from supervisor.config import parse_config

    cfg = parse_config({"name": "x", "epochs": 3, "trainer": {"command": ["t"]},
                        "checkpoints": {"step_pattern": "mid/e{epoch}-s{step}.bin"}}, tmp_path, tmp_path / "r.toml")
    env = Attempt(cfg, tmp_path / "run", AttemptSpec(attempt=0, seed=1, load_epoch=-1, batch_divisor=1)).env()
    assert env[P.ENV_STEP_PATTERN] == "mid/e{epoch}-s{step}.bin"
    sup = Supervised.from_env({P.ENV_CHECKPOINT_DIR: str(tmp_path / "ck"), P.ENV_STEP_PATTERN: env[P.ENV_STEP_PATTERN]})
    assert sup.checkpoint_path(2, step=7) == tmp_path / "ck" / "mid" / "e2-s7.bin"
    assert Supervised.from_env({}).step_pattern == P.DEFAULT_STEP_PATTERN
