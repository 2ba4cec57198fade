"""Several processes under the supervisor: `[trainer] launcher = "torchrun"`, through the real CLI, with a
real torch.distributed group (gloo, CPU) of two ranks. Faults in rank 1 (crash, NaN, a SIGSTOPped process)
are named with their rank, the whole group restarts from the last epoch, and the watchdog's death leaves no
process of the group behind."""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from conftest import cli, ledger, report, start_bg, toml_value, wait_for

from supervisor.attempt import RANK_PREFIX, torchrun_argv
from supervisor.config import parse_config

pytestmark = pytest.mark.slow

# Follows the protocol for several processes (docs/protocol.md): rank 0 writes the attempt's events and the
# checkpoints, every rank its step events to its own file. FAULTS="A:kind@epoch:step,..." fires in rank 1
# of attempt A: crash (exit 1), nan (a NaN loss in its own events), meannan (a NaN into the all-reduce: rank 0
# reports the group's NaN with nonfinite_ranks), stop (SIGSTOP itself).
DIST_TRAINER = textwrap.dedent('''
    import json, os, signal, sys, time
    import torch
    import torch.distributed as dist
    from supervisor.durable import atomic_write
    from supervisor.protocol import rank_events_path

    env = os.environ
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    events = rank_events_path(env["SUPERVISOR_EVENTS"], rank)

    def emit(**kw):
        with open(events, "a") as f:
            f.write(json.dumps({**kw, "t": time.time()}) + "\\n")  # stamped as the client stamps events

    faults = dict(x.split(":", 1) for x in env.get("FAULTS", "").split(",") if x)
    kind, _, at = faults.get(env["SUPERVISOR_ATTEMPT"], "").partition("@")
    start, epochs = int(env["SUPERVISOR_START_EPOCH"]), int(env["SUPERVISOR_EPOCHS"])
    load = env.get("SUPERVISOR_LOAD_PATH")
    state = json.loads(open(load).read()) if load else {"w": 1.0, "trained": []}
    w = torch.tensor([state["w"]])
    print(f"rank {rank} of {world}: epochs {start}..{epochs - 1}", flush=True)
    for epoch in range(start, epochs):
        for step in range(1, 6):
            time.sleep(0.03)
            hit = rank == 1 and kind and at == f"{epoch}:{step}"
            if hit and kind == "crash":
                raise RuntimeError("injected crash in rank 1")
            if hit and kind == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            loss = float("nan") if hit and kind == "nan" else 1.0 / (epoch * 5 + step)
            if not (hit and kind == "meannan"):  # meannan: rank 1 reports nothing; rank 0 names it
                emit(event="step", epoch=epoch, step=step, loss=loss)
            if loss != loss:
                sys.exit(3)
            g = torch.tensor([float("nan") if hit and kind == "meannan" else 0.1 * (rank + 1)])
            dist.all_reduce(g)
            if g.item() != g.item():  # the group's mean is NaN: rank 0 says whose it was, as the reference trainer
                if rank == 0:
                    emit(event="step", epoch=epoch, step=step, loss=float("nan"), nonfinite_ranks=[1])
                sys.exit(3)
            w -= 0.01 * g
        if rank == 0:
            state = {"w": w.item(), "trained": state["trained"] + [epoch], "world": world}
            path = os.path.join(env["SUPERVISOR_CHECKPOINT_DIR"], f"epoch-{epoch:04d}.pt")
            data = json.dumps(state).encode()
            atomic_write(path, lambda f: f.write(data))
            emit(event="checkpoint", epoch=epoch, path=path)
        dist.barrier()
    dist.destroy_process_group()
''')


def write_dist_run(tmp_path: Path, epochs: int, faults: str = "", **tables: dict) -> Path:
    (tmp_path / "dist_trainer.py").write_text(DIST_TRAINER)
    trainer = {"command": ["python", "dist_trainer.py"], "launcher": "torchrun", "nproc_per_node": 2,
               "env": {"FAULTS": faults}}  # fmt: skip
    watch = {"heartbeat_timeout_s": 4.0, "startup_timeout_s": 120.0, **tables.pop("watch", {})}
    restart = {"backoff_initial_s": 0.05, "backoff_max_s": 0.2}
    lines = ['name = "dist"', f"epochs = {epochs}"]
    for table, values in {"trainer": trainer, "watch": watch, "restart": restart, **tables}.items():
        lines += ["", f"[{table}]"] + [f"{k} = {toml_value(v)}" for k, v in values.items()]
    path = tmp_path / "run.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_torchrun_command_line():
    cfg = parse_config({"name": "x", "epochs": 2, "trainer": {"command": "python -m trainer --x 1",
                        "launcher": "torchrun", "nproc_per_node": 4}}, Path("/b"), Path("r.toml"))  # fmt: skip
    argv = torchrun_argv(cfg, ["/usr/bin/python3", "-m", "trainer", "--x", "1"], "x", Path("/r/ranks"))
    assert argv[:3] == ["/usr/bin/python3", "-m", "torch.distributed.run"]
    assert "--nproc-per-node=4" in argv and "--max-restarts=0" in argv and "--standalone" in argv
    assert "--log-dir=/r/ranks" in argv and argv[-4:] == ["--module", "trainer", "--x", "1"]
    assert torchrun_argv(cfg, ["bash", "run.sh"], "x", None)[-3:] == ["--no-python", "bash", "run.sh"]
    assert RANK_PREFIX.match("[rank1]: Traceback").group(1) == "1"
    with pytest.raises(Exception, match="only with trainer.launcher"):
        parse_config({"name": "x", "epochs": 2, "trainer": {"command": "t", "nproc_per_node": 2}}, Path("/b"),
                     Path("r.toml"))  # fmt: skip


def test_faults_in_rank_1_are_named_with_their_rank_and_the_group_restarts_together(tmp_path):
    toml = write_dist_run(tmp_path, epochs=5, faults="0:crash@1:3,1:nan@2:2,2:meannan@3:4,3:stop@4:2")
    out = cli("start", "-q", str(toml), timeout=400)
    assert out.returncode == 0, out.stderr[-4000:]
    rep = report(toml)
    rows = rep["restarts"]
    print("\n" + cli("report", str(toml)).stdout)
    assert [(r["epoch"], r["load_epoch"], r["reason"], r["rank"]) for r in rows] == [
        (0, -1, "normal start", None), (1, 0, "crash", 1), (2, 1, "nan", 1), (3, 2, "nan", 1), (4, 3, "hang", 1)]
    assert len({r["seed"] for r in rows}) == 5
    assert [a["rank"] for a in rep["attempts"]] == [1, 1, 1, 1, None]
    assert "injected crash in rank 1" in rep["attempts"][0]["detail"] or rep["attempts"][0]["detail"].startswith(
        "rank 1:")  # fmt: skip
    final = json.loads((tmp_path / "runs" / "dist" / "checkpoints" / "epoch-0004.pt").read_text())
    assert final["trained"] == [0, 1, 2, 3, 4] and final["world"] == 2
    md = cli("report", str(toml)).stdout
    assert "| epoch | load_epoch | seed | reason | rank |" in md and "| crash | 1 |" in md
    log = (tmp_path / "runs" / "dist" / "attempts" / "attempt-0000.log").read_text()
    assert "[rank1]: " in log and "injected crash in rank 1" in log  # every rank's output, prefixed


def test_the_watchdog_killed_leaves_no_rank_and_no_torchrun_agent(tmp_path):
    toml = write_dist_run(tmp_path, epochs=200)
    run_dir = tmp_path / "runs" / "dist"
    proc = start_bg(toml)
    try:
        events = run_dir / "attempts" / "attempt-0000.rank-1.events.jsonl"
        wait_for(lambda: events.exists() and events.read_text().count("\n") >= 3, timeout=120, what="rank 1 steps")
        shim = next(f["pid"] for f in ledger(run_dir) if f["fact"] == "attempt_started")
        tree = psutil.Process(shim).children(recursive=True)
        assert len(tree) >= 3  # torchrun's agent and two ranks
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

        def gone() -> bool:
            return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree)

        wait_for(gone, timeout=30, what="the group to die with the watchdog")
    finally:
        proc.kill()
    time.sleep(0.5)
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []
