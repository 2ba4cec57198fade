"""Several nodes (docs/distributed.md): two supervisors, two run dirs, one run in one S3 prefix on SeaweedFS, and
torchrun's c10d rendezvous on a free local port of 127.0.0.1. Node 0 leads (lease, ledger, decisions), node 1
follows the attempts it publishes; a crash on node 1 restarts both, with the same seed and resume point."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest
from conftest import report, start_bg, toml_value
from test_torchrun import DIST_TRAINER

from .s3_support import free_ports
from .test_e2e_cli import storage_table

pytestmark = pytest.mark.slow

# The torchrun test's trainer, its faults firing on the node whose FAULTS names them (whatever rank runs there:
# c10d gives rank 0 to whichever node its rendezvous sorts first), and saying which seed and checkpoint it got.
NODE_TRAINER = DIST_TRAINER.replace("hit = rank == 1 and kind and", "hit = bool(kind) and").replace(
    'print(f"rank {rank} of {world}: epochs {start}..{epochs - 1}", flush=True)',
    'print(f"rank {rank} of {world}: epochs {start}..{epochs - 1} seed {env[\'SUPERVISOR_SEED\']} load "'
    ' f"{env.get(\'SUPERVISOR_LOAD_EPOCH\')} {env.get(\'SUPERVISOR_LOAD_SHA256\') or \'-\'}", flush=True)')
assert NODE_TRAINER != DIST_TRAINER and "hit = bool(kind)" in NODE_TRAINER and "time.sleep(0.03)" in NODE_TRAINER


def node_toml(tmp_path: Path, node: int, port: int, storage: dict, local_addr: str, faults: str = "",
              epochs: int = 4, step_s: float = 0.03, node_timeout_s: float = 60.0) -> Path:
    home = tmp_path / f"node{node}"
    home.mkdir()
    (home / "dist_trainer.py").write_text(NODE_TRAINER.replace("time.sleep(0.03)", f"time.sleep({step_s})"))
    tables = {
        "trainer": {"command": ["python", "dist_trainer.py"], "launcher": "torchrun", "nproc_per_node": 1,
                    "nnodes": 2, "node_rank": node, "rdzv_endpoint": f"127.0.0.1:{port}", "local_addr": local_addr,
                    "node_timeout_s": node_timeout_s, "env": {"FAULTS": faults}},
        "watch": {"heartbeat_timeout_s": 10.0, "startup_timeout_s": 120.0},
        "restart": {"backoff_initial_s": 0.05, "backoff_max_s": 0.2},
        "storage": storage,
    }  # fmt: skip
    lines = ['name = "two-nodes"', f"epochs = {epochs}"]
    for table, values in tables.items():
        lines += ["", f"[{table}]"] + [f"{k} = {toml_value(v)}" for k, v in values.items()]
    path = home / "run.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def seeds_in(log: Path) -> set[tuple[str, str, str]]:
    """(seed, load epoch, load sha256) every rank of an attempt printed at its start."""
    return set(re.findall(r"seed (\d+) load (-?\d+) (\S+)", log.read_text()))


# c10d numbers the nodes by their address (then pid): "127.0.0.1" sorts before "localhost", so local_addr decides
# where global rank 0 (the one that saves) runs. On the follower, its events and checkpoints reach the leader
# through the store (nodes.py).
@pytest.mark.parametrize("rank0_on", ["leader", "follower"])
def test_a_crash_on_node_1_restarts_both_nodes_with_the_same_seed_and_resume_point(weed, tmp_path, rank0_on):
    storage = storage_table(weed, f"nodes-{uuid.uuid4().hex[:8]}")
    port = free_ports(1)[0]
    first, second = "127.0.0.1", "localhost"
    addrs = (first, second) if rank0_on == "leader" else (second, first)
    leader = node_toml(tmp_path, 0, port, storage, addrs[0])
    follower = node_toml(tmp_path, 1, port, storage, addrs[1], faults="0:crash@1:3")
    procs = [start_bg(leader), start_bg(follower)]
    try:
        outs = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-4000:]
    rep = report(leader)
    assert rep["status"] == "completed"
    rows = [(r["epoch"], r["load_epoch"], r["reason"]) for r in rep["restarts"]]
    assert rows == [(0, -1, "normal start"), (1, 0, "crash")]
    crashed = rep["attempts"][0]
    assert crashed["node"] == 1 and crashed["ended_by"] == "crash" and "injected crash" in crashed["detail"]
    assert crashed["rank"] == (1 if rank0_on == "leader" else 0)
    leader_runs, follower_runs = tmp_path / "node0" / "runs" / "two-nodes", tmp_path / "node1" / "runs" / "two-nodes"
    for attempt in rep["attempts"]:  # every node ran each attempt with the leader's seed and resume point
        log = f"attempts/attempt-{attempt['attempt']:04d}.log"
        on_leader, on_follower = seeds_in(leader_runs / log), seeds_in(follower_runs / log)
        assert on_leader and on_follower and len(on_leader | on_follower) == 1, (on_leader, on_follower)
        seed, load, _ = next(iter(on_leader | on_follower))
        assert (int(seed), int(load)) == (attempt["seed"], attempt["load_epoch"])
    final = json.loads((leader_runs / "checkpoints" / "epoch-0003.pt").read_text())
    assert final["trained"] == [0, 1, 2, 3] and final["world"] == 2
    assert not (follower_runs / "ledger.jsonl").exists()  # one record of the run: the leader's


def test_a_node_that_disappears_is_a_fault_of_the_attempt_and_the_run_goes_on_when_it_is_back(weed, tmp_path):
    """kill -9 of node 1's supervisor (its group dies with it): the leader names node 1 lost after node_timeout_s,
    publishes the next attempt and waits in its rendezvous; a new supervisor on node 1 joins it, and the run
    completes."""
    import os
    import signal

    from conftest import ledger, wait_for

    storage = storage_table(weed, f"nodes-{uuid.uuid4().hex[:8]}")
    port = free_ports(1)[0]
    # slow steps: node 1 dies mid-attempt; node 0 waits 5 s for its report
    leader = node_toml(tmp_path, 0, port, storage, "127.0.0.1", epochs=3, step_s=0.3, node_timeout_s=5.0)
    follower = node_toml(tmp_path, 1, port, storage, "localhost", epochs=3, step_s=0.3, node_timeout_s=5.0)
    runs = tmp_path / "node0" / "runs" / "two-nodes"
    lead = start_bg(leader)
    gone = start_bg(follower)
    back = None
    try:
        wait_for(lambda: any(f["fact"] == "checkpoint" for f in ledger(runs)) if (runs / "ledger.jsonl").exists()
                 else False, timeout=180, what="the first checkpoint")  # fmt: skip
        os.kill(gone.pid, signal.SIGKILL)
        gone.wait(timeout=10)
        wait_for(lambda: any(f["fact"] == "attempt_ended" for f in ledger(runs)), timeout=120, what="node 1 lost")
        back = start_bg(follower)
        _, err = lead.communicate(timeout=300)
        assert lead.returncode == 0, err[-4000:]
        back.communicate(timeout=60)
        assert back.returncode == 0
    finally:
        for p in (lead, gone, back):
            if p is not None:
                p.kill()
    rep = report(leader)
    lost = rep["attempts"][0]
    assert rep["status"] == "completed" and lost["ended_by"] == "session lost" and lost["node"] == 1, lost
    assert "no report within 5s" in lost["detail"]
    assert [r["reason"] for r in rep["restarts"]] == ["normal start", "session lost"]


def test_a_sigterm_to_the_leader_pauses_every_node_and_both_continue_from_the_store(weed, tmp_path):
    """SIGTERM to node 0's supervisor: its group and node 1's stop, the run ends paused, both supervisors exit 75;
    started again, they go on from the newest checkpoint and complete."""
    import os
    import signal

    from conftest import ledger, wait_for

    storage = storage_table(weed, f"nodes-{uuid.uuid4().hex[:8]}")
    port = free_ports(1)[0]
    leader = node_toml(tmp_path, 0, port, storage, "127.0.0.1", epochs=3, step_s=0.3)
    follower = node_toml(tmp_path, 1, port, storage, "localhost", epochs=3, step_s=0.3)
    runs = tmp_path / "node0" / "runs" / "two-nodes"
    procs = [start_bg(leader), start_bg(follower)]
    try:
        wait_for(lambda: any(f["fact"] == "checkpoint" for f in ledger(runs)) if (runs / "ledger.jsonl").exists()
                 else False, timeout=180, what="the first checkpoint")  # fmt: skip
        os.kill(procs[0].pid, signal.SIGTERM)
        for p in procs:
            p.communicate(timeout=120)
        assert [p.returncode for p in procs] == [75, 75]
        assert report(leader)["status"] == "paused"
        procs = [start_bg(leader), start_bg(follower)]
        outs = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:]
    finally:
        for p in procs:
            p.kill()
    rep = report(leader)
    assert rep["status"] == "completed"
    assert rep["attempts"][0]["ended_by"] == "stopped" and rep["attempts"][0]["node"] == 0
    assert rep["restarts"][1]["load_epoch"] >= 0  # went on from a checkpoint, not from scratch
    final = json.loads((runs / "checkpoints" / "epoch-0002.pt").read_text())
    assert final["trained"] == [0, 1, 2]
