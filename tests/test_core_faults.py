"""One end-to-end test per fault through the real CLI: the restart row is written and the run completes."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest
from conftest import FAKE, cli, ledger, report, write_run


def run_with(tmp_path: Path, faults: list[dict], epochs: int = 3, **sections) -> tuple:
    params = {"faults": faults, **sections.pop("params", {})}
    toml = write_run(tmp_path, epochs=epochs, params=params, **sections)
    out = cli("start", str(toml), timeout=120)
    return out, report(toml), toml


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("nan", "nan"),
        ("cuda_error", "cuda error"),
        ("cuda_hang", "cuda error"),
        ("gpu_oom", "gpu oom"),
        ("enospc", "disk full"),
        ("crash", "crash"),
        ("crash_quoting_oom", "crash"),  # words in the code a traceback quotes are not evidence
        ("oom_kill", "crash"),  # a SIGKILL with no OOM-killer evidence is not called an OOM
    ],
)
def test_fault_restarts_from_previous_epoch(tmp_path, kind, reason):
    out, rep, _ = run_with(tmp_path, [{"kind": kind, "attempt": 0, "epoch": 1, "step": 1}],
                           watch={"cuda_error_grace_s": 0.5})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert rep["status"] == "completed"
    assert rep["restarts"] == [
        {"epoch": 0, "load_epoch": -1, "load_step": None, "seed": 29, "reason": "normal start"},
        {"epoch": 1, "load_epoch": 0, "load_step": None, "seed": 28, "reason": reason},
    ]
    assert rep["checkpoints"][-1] == 2


def test_test_nan_restarts_same_epoch_from_previous_checkpoint(tmp_path):
    out, rep, toml = run_with(tmp_path, [{"kind": "test_nan", "attempt": 0, "epoch": 1, "step": -1}])
    assert out.returncode == 0, out.stderr
    assert rep["restarts"][1] == {"epoch": 1, "load_epoch": 0, "load_step": None, "seed": 28, "reason": "test nan"}
    # The checkpoint the trainer wrote after a NaN eval was never recorded as verified.
    recorded = [f for f in ledger(toml.parent / "runs" / "run") if f["fact"] == "checkpoint" and f["attempt"] == 0]
    assert [f["epoch"] for f in recorded] == [0]


def test_hang_is_killed_after_heartbeat_timeout(tmp_path):
    out, rep, _ = run_with(tmp_path, [{"kind": "hang", "attempt": 0, "epoch": 1, "step": 0}],
                           watch={"heartbeat_timeout_s": 1.0})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert rep["restarts"][1]["reason"] == "hang"


def test_memory_guard_stops_tree_before_kernel(tmp_path):
    out, rep, _ = run_with(tmp_path, [{"kind": "cpu_oom", "attempt": 0, "epoch": 1, "step": 0}],
                           watch={"memory_limit": "400MiB"})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert rep["restarts"][1] == {"epoch": 1, "load_epoch": 0, "load_step": None, "seed": 28, "reason": "cpu oom"}
    ended = [a for a in rep["attempts"] if a["ended_by"] == "cpu oom"]
    assert ended and ended[0]["exit"] == "signal SIGKILL"


def _memory_cgroup() -> Path | None:
    base = Path("/sys/fs/cgroup/memory")
    if not (base / "memory.oom_control").exists():
        return None
    d = base / f"sv-test-{uuid.uuid4().hex[:8]}"
    try:
        d.mkdir()
        (d / "memory.limit_in_bytes").write_text(str(256 << 20))
        if (d / "memory.memsw.limit_in_bytes").exists():  # no swapping out of the limit
            (d / "memory.memsw.limit_in_bytes").write_text(str(256 << 20))
    except OSError:
        shutil.rmtree(d, ignore_errors=True)
        return None
    return d


def test_kernel_oom_kill_is_cpu_oom(tmp_path):
    """A real kernel OOM kill inside a memory cgroup (v1 here; needs root): SIGKILL + oom_kill counter."""
    cg = _memory_cgroup()
    if cg is None:
        pytest.skip("cannot create a memory cgroup here (needs root and the cgroup v1 memory controller)")
    try:
        command = ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$0" {FAKE}', "{python}"]
        # The trainer lives in its own cgroup here (in a container it shares ours); steps of 0.3 s give
        # the watchdog's 0.5 s cgroup sampling time to see it there before it is killed.
        out, rep, _ = run_with(tmp_path, [{"kind": "cpu_oom", "attempt": 0, "epoch": 1, "step": 0}],
                               command=command, params={"step_s": 0.3})  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert rep["restarts"][1] == {"epoch": 1, "load_epoch": 0, "load_step": None, "seed": 28, "reason": "cpu oom"}
    finally:
        try:
            cg.rmdir()
        except OSError:
            pass


def test_gpu_oom_halves_the_batch(tmp_path):
    out, rep, toml = run_with(tmp_path, [{"kind": "gpu_oom", "attempt": 0, "epoch": 1, "step": 0},
                                         {"kind": "gpu_oom", "attempt": 1, "epoch": 1, "step": 0}])  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert [a["batch_divisor"] for a in rep["attempts"]] == [1, 2, 4]
    assert "divisor 4" in (toml.parent / "runs" / "run" / "attempts" / "attempt-0002.log").read_text()


def test_disk_min_free_prunes_then_faults(tmp_path):
    """Free space below disk_min_free: old checkpoints are pruned first, then the attempt is stopped."""
    import shutil as sh

    free = sh.disk_usage(tmp_path).free
    out, rep, toml = run_with(
        tmp_path, [{"kind": "disk_fill", "attempt": 0, "epoch": 2, "step": 0}], epochs=3,
        watch={"disk_min_free": free - (32 << 20)}, checkpoints={"keep_last": 3},
    )  # fmt: skip
    # The filler pushes free space below the line: the run cannot make progress, and says so.
    reasons = [r["reason"] for r in rep["restarts"]]
    assert "disk full" in reasons, (out.stderr, reasons)


def test_zero_code_mode(tmp_path):
    """A script that knows nothing of us: placeholders, loss regex on stdout, checkpoints by pattern."""
    script = tmp_path / "plain.py"
    script.write_text(
        "import sys, pathlib, time\n"
        "seed, load, epochs, ck, attempt = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],\n"
        "    int(sys.argv[5]))\n"
        "for e in range(load + 1, epochs):\n"
        "    for s in range(3):\n"
        "        loss = float('nan') if (attempt, e, s) == (0, 1, 2) else 1.0 / (e + 1)\n"
        "        print(f'epoch {e} step {s} loss={loss:.4f}', flush=True)\n"
        "        if loss != loss: time.sleep(30)\n"
        "    p = pathlib.Path(ck) / f'model_{e}.bin'; p.parent.mkdir(exist_ok=True)\n"
        "    p.write_bytes(b'x' * 100)\n"
    )
    toml = write_run(
        tmp_path, epochs=3,
        command=["python", str(script), "{seed}", "{load_epoch}", "{epochs}", "{checkpoint_dir}", "{attempt}"],
        trainer={"mode": "zero-code"}, checkpoints={"pattern": "{checkpoint_dir}/model_{epoch}.bin", "settle_s": 0.2},
    )  # fmt: skip
    out = cli("start", str(toml))
    assert out.returncode == 0, out.stderr
    rep = report(toml)
    assert rep["restarts"][1] == {"epoch": 1, "load_epoch": 0, "load_step": None, "seed": 28, "reason": "nan"}
    assert rep["checkpoints"][-1] == 2
