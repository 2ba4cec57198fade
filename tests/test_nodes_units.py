"""Several nodes, the parts: config, torchrun's command line, whose fault ended an attempt, and the relay of rank
0's events and checkpoints from a follower to the leader through a store (a folder store here; the two-node run
on SeaweedFS is tests/s3/test_nodes.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from supervisor.attempt import build_argv
from supervisor.config import ConfigError, parse_config
from supervisor.nodes import Coordination, FollowerLink, LeaderLink, NodeEnd, Plan, cause
from supervisor.store.filebackend import FileBackend

NODES = {"launcher": "torchrun", "nproc_per_node": 2, "nnodes": 2, "node_rank": 1,
         "rdzv_endpoint": "10.0.0.1:29400"}  # fmt: skip
STORAGE = {"url": "s3://bucket/runs"}


def cfg(trainer: dict | None = None, storage: dict | None = STORAGE, **top):
    raw = {"name": "big", "epochs": 3, "trainer": {"command": "python train.py", **NODES, **(trainer or {})}, **top}
    if storage is not None:
        raw["storage"] = storage
    return parse_config(raw, Path("/b"), Path("run.toml"))


def refusal(**kw) -> str:
    with pytest.raises(ConfigError) as info:
        cfg(**kw)
    return str(info.value)


def test_several_nodes_need_an_endpoint_a_store_protocol_mode_and_c10d():
    assert "trainer.rdzv_endpoint" in refusal(trainer={"rdzv_endpoint": None})
    assert "same [storage] url" in refusal(storage=None)
    assert "protocol mode" in refusal(trainer={"mode": "zero-code"})
    assert "c10d" in refusal(trainer={"rdzv_backend": "static"})
    assert "not below nnodes" in refusal(trainer={"node_rank": 2})
    assert "only with trainer.launcher" in refusal(trainer={"launcher": "none", "nproc_per_node": 1})


def test_each_attempt_is_a_new_rendezvous_served_by_node_0():
    c = cfg(trainer={"local_addr": "10.0.0.2"})
    argv = build_argv(c, {"attempt": "3", "seed": "1"})
    assert "--nnodes=2" in argv and "--node-rank=1" in argv and "--standalone" not in argv
    assert {"--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.1:29400", "--rdzv-id=big-0003",
            "--rdzv-conf=is_host=0", "--local-addr=10.0.0.2"} <= set(argv)  # fmt: skip
    assert "--rdzv-conf=is_host=1" in build_argv(cfg(trainer={"node_rank": 0}), {"attempt": "0"})


def end(node, fault, at, detail="", tail=()) -> NodeEnd:
    return NodeEnd(node, fault, detail, rank=node, detected_at=at, tail=list(tail))


def test_the_attempt_ends_by_the_first_fault_that_did_not_only_follow_another():
    crash = end(1, "crash", 10.5, "exit 1; last output: RuntimeError: injected crash")
    peer = end(0, "crash", 10.2, "exit 1", tail=["RuntimeError: [../gloo/transport/tcp/pair.cc:534] Connection "
                                                   "closed by peer [127.0.0.1]:43105"])  # fmt: skip
    assert peer.collateral and not crash.collateral
    assert cause([peer, crash]) is crash  # earlier, but only a consequence
    assert cause([peer, end(2, "stopped", 9.0, "the leader ended the attempt (crash)")]) is None
    nan = end(2, "nan", 10.4, "loss nan at epoch 1 step 3")
    assert cause([peer, crash, nan]) is nan
    assert cause([end(0, None, None), end(1, None, None)]) is None


def test_a_plan_and_the_ends_round_trip_through_the_store(tmp_path):
    coord = Coordination(FileBackend(tmp_path / "store"))
    checkpoint = {"epoch": 1, "path": "checkpoints/epoch-0001.pt", "size": 5, "sha256": "ab" * 32, "step": None}
    coord.put_plan(Plan("s1", 4, 28, 1, 2, None, checkpoint))
    plan = coord.plan(4)
    assert plan is not None and plan.seed == 28 and plan.batch_divisor == 2 and plan.record.label == "epoch 1"
    assert coord.plan(5) is None
    coord.put_end(4, end(1, "hang", 3.0, "rank 1 silent"))
    coord.put_end(4, end(2, None, None))
    assert sorted(coord.ends(4)) == [1, 2] and coord.ends(4)[1].fault == "hang"
    coord.put_events(4, 1, ['{"a": 1}\n'])
    coord.put_events(4, 3, ['{"c": 3}\n'])  # chunk 2 not there yet: the list stops before the gap
    assert coord.events_since(4, 0) == [(1, ['{"a": 1}\n'])]
    coord.put_events(4, 2, ['{"b": 2}\n'])
    assert [seq for seq, _ in coord.events_since(4, 1)] == [2, 3]


def test_rank_0_on_a_follower_reaches_the_leaders_events_with_its_checkpoint_verified(tmp_path):
    coord = Coordination(FileBackend(tmp_path / "store"))
    far, near = tmp_path / "follower-run", tmp_path / "leader-run"
    for d in (far, near):
        (d / "attempts").mkdir(parents=True)
    ckpt = far / "checkpoints" / "epoch-0000.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"weights after epoch 0")
    far_events, near_events = far / "attempts" / "attempt-0002.events.jsonl", near / "attempts" / "e.jsonl"
    lines = [{"event": "step", "epoch": 0, "step": 1, "loss": 0.5, "t": 1.0},
             {"event": "checkpoint", "epoch": 0, "path": str(ckpt), "t": 2.0}]  # fmt: skip
    far_events.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"event": "step", "epo')  # torn tail
    (near / "req.json").write_text('{"id": 1, "reason": "every_s", "stop": false}')
    follower = FollowerLink(coord, 2, far, far_events, far / "req.json", lambda raw: Path(raw))
    leader = LeaderLink(coord, 2, near, near_events, near / "req.json")
    leader.guarded()  # publishes the leader's request
    follower.guarded()  # takes it, relays both whole lines (the torn one waits)
    leader.guarded()
    got = [json.loads(x) for x in near_events.read_text().splitlines()]
    assert [g["event"] for g in got] == ["step", "checkpoint"]
    local = near / "checkpoints" / "epoch-0000.pt"
    assert got[1]["path"] == str(local) and local.read_bytes() == b"weights after epoch 0"
    assert got[1]["sha256"] == hashlib.sha256(b"weights after epoch 0").hexdigest() and got[1]["size"] == 21
    assert (far / "req.json").read_text() == '{"id": 1, "reason": "every_s", "stop": false}'
    with open(far_events, "a") as f:
        f.write('ch": 0, "step": 2, "loss": 0.4, "t": 3.0}\n')
    follower.guarded()
    leader.guarded()
    assert json.loads(near_events.read_text().splitlines()[-1])["step"] == 2
    leader.stop_all("crash", pause=False)
    leader.guarded()
    follower.guarded()
    assert follower.stop["why"] == "crash"


def test_a_relayed_checkpoint_that_does_not_match_its_sha256_is_not_recorded(tmp_path):
    coord = Coordination(FileBackend(tmp_path / "store"))
    near = tmp_path / "leader-run"
    near.mkdir()
    rotten = _file(tmp_path / "x", b"rotten")
    coord.put_file(7, "checkpoints/epoch-0001.pt", rotten, hashlib.sha256(b"rotten").hexdigest())
    coord.put_events(7, 1, [json.dumps({"event": "checkpoint", "epoch": 1, "path": "checkpoints/epoch-0001.pt",
                                        "sha256": "0" * 64, "size": 6}) + "\n"])  # fmt: skip
    events = near / "e.jsonl"
    LeaderLink(coord, 7, near, events, near / "req.json").guarded()
    assert not events.exists() or events.read_text() == ""
    assert not (near / "checkpoints" / "epoch-0001.pt").exists()


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
