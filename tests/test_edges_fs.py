"""Filesystem errors on the supervisor's own files end in a clear pause, never a traceback: the run dir
deleted or made read-only mid-run, a disk that fills with disk_min_free unset, `start` on a full disk,
a run_dir that cannot be created. The small filesystems are real tmpfs mounts (root only; skipped
elsewhere)."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import cli, ledger, start_bg, tmpfs, wait_for, write_run


def one_clear_line(stderr: str, *words: str) -> None:
    assert "Traceback" not in stderr, stderr
    hits = [line for line in stderr.splitlines() if all(w in line for w in words)]
    assert hits, f"no line naming {words}:\n{stderr}"


def reached(run_dir: Path, n: int) -> bool:
    return sum(1 for f in ledger(run_dir) if f["fact"] == "checkpoint") >= n


def test_run_dir_deleted_mid_run_pauses_with_one_line(tmp_path):
    toml = write_run(tmp_path, epochs=40, params={"step_s": 0.05})
    run_dir = tmp_path / "runs" / "run"
    proc = start_bg(toml)
    wait_for(lambda: reached(run_dir, 1), timeout=60, what="a checkpoint")
    gone = tmp_path / "deleted"  # a rename is atomic; an rmtree races with files the trainer is creating
    run_dir.rename(gone)
    shutil.rmtree(gone, ignore_errors=True)
    assert proc.wait(timeout=60) == 75
    stderr = proc.stderr.read()
    one_clear_line(stderr, "vanished")


def test_ledger_made_unwritable_mid_run_pauses_and_resumes_once_fixed(tmp_path):
    if shutil.which("chattr") is None:
        pytest.skip("no chattr")
    toml = write_run(tmp_path, epochs=40, params={"step_s": 0.05})
    run_dir = tmp_path / "runs" / "run"
    proc = start_bg(toml)
    wait_for(lambda: reached(run_dir, 1), timeout=60, what="a checkpoint")
    if subprocess.run(["chattr", "+i", str(run_dir / "ledger.jsonl")], capture_output=True).returncode != 0:
        proc.kill()
        pytest.skip("this filesystem has no immutable flag")
    try:
        assert proc.wait(timeout=60) == 75
        one_clear_line(proc.stderr.read(), "ledger.jsonl", "Operation not permitted", "permissions")
    finally:
        subprocess.run(["chattr", "-i", str(run_dir / "ledger.jsonl")], capture_output=True)
    text = "\n".join(line for line in (run_dir / "ledger.jsonl").read_text().splitlines())
    assert all(json.loads(x) for x in text.splitlines())
    out = cli("start", "-q", str(toml))
    assert out.returncode == 0, out.stderr


def test_start_on_a_read_only_filesystem_pauses_with_one_line(tmp_path):
    with tmpfs(tmp_path / "disk", "8m") as disk:
        toml = write_run(tmp_path, epochs=2, run_dir=str(disk / "run"))
        (disk / "run").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        out = cli("start", "-q", str(toml))
        assert out.returncode == 75, (out.returncode, out.stderr)
        one_clear_line(out.stderr, "Read-only file system", "remount")
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        out = cli("start", "-q", str(toml))
        assert out.returncode == 0, out.stderr


def test_disk_filling_without_disk_min_free_pauses_instead_of_a_traceback(tmp_path):
    with tmpfs(tmp_path / "disk", "24m") as disk:
        faults = [{"kind": "disk_fill", "attempt": a, "epoch": 1, "step": 1} for a in range(3)]
        toml = write_run(tmp_path, epochs=4, params={"step_s": 0.05, "faults": faults}, run_dir=str(disk / "run"))
        out = cli("start", "-q", str(toml), timeout=180)
        assert out.returncode == 75, (out.returncode, out.stderr[-3000:])
        one_clear_line(out.stderr, "No space left on device", "free disk space")
        (disk / "run" / "filler.bin").unlink()
        text = toml.read_text().replace('"disk_fill"', '"none"')
        toml.write_text(text)
        out = cli("start", "-q", str(toml), timeout=180)
        assert out.returncode == 0, out.stderr[-3000:]


def test_start_on_a_full_disk_pauses_and_writes_nothing_half(tmp_path):
    with tmpfs(tmp_path / "disk", "4m") as disk:
        toml = write_run(tmp_path, epochs=2, run_dir=str(disk / "run"))
        (disk / "run").mkdir()
        with contextlib.suppress(OSError), open(disk / "fill", "wb") as f:
            while True:
                f.write(b"\0" * 65536)
        out = cli("start", str(toml))
        assert out.returncode == 75, (out.returncode, out.stderr)
        one_clear_line(out.stderr, "No space left on device")
        for path in (disk / "run").rglob("*"):
            assert not path.name.endswith(".tmp"), path
        (disk / "fill").unlink()
        out = cli("start", str(toml))
        assert out.returncode == 0, out.stderr


def test_run_dir_that_cannot_be_created_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    toml = write_run(tmp_path, epochs=1, run_dir=str(blocker / "run"))
    out = cli("start", str(toml))
    assert out.returncode == 2, out.stderr
    one_clear_line(out.stderr, str(blocker))
    assert len([x for x in out.stderr.splitlines() if x.strip()]) == 1, out.stderr
