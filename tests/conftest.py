"""Shared helpers: write a run.toml for the fake trainer, run the real CLI, read the report."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FAKE = HERE / "fake_trainer.py"


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def write_run(
    dirpath: Path, name: str = "run", epochs: int = 4, params: dict | None = None,
    command: list[str] | str | None = None, run_dir: str | None = None, **sections: dict,
) -> Path:  # fmt: skip
    """A run.toml for the fake trainer; `sections` add tables such as watch={...}."""
    lines = [f"name = {toml_value(name)}", f"epochs = {epochs}"]
    if run_dir is not None:
        lines.append(f"run_dir = {toml_value(run_dir)}")
    lines += ["", "[trainer]"]
    lines.append(f"command = {toml_value(command or ['python', str(FAKE)])}")
    trainer_extra = sections.pop("trainer", {})
    for k, v in trainer_extra.items():
        lines.append(f"{k} = {toml_value(v)}")
    lines += ["", "[trainer.params]"]
    for k, v in {"steps_per_epoch": 3, "step_s": 0.01, **(params or {})}.items():
        lines.append(f"{k} = {toml_value(v)}")
    restart = {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, **sections.pop("restart", {})}
    sections["restart"] = restart
    for table, values in sections.items():
        lines += ["", f"[{table}]"] + [f"{k} = {toml_value(v)}" for k, v in values.items()]
    path = dirpath / "run.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(*args: str, cwd: Path | None = None, timeout: float = 120, env: dict | None = None):
    """Run `supervisor ARGS` as a real process under this interpreter."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "supervisor.cli", *args], cwd=cwd, capture_output=True, text=True,
        timeout=timeout, env=full_env,
    )  # fmt: skip


def start_bg(run_toml: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "supervisor.cli", "start", "-q", str(run_toml)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
    )  # fmt: skip


def report(run_toml: Path) -> dict:
    out = cli("report", str(run_toml), "--format", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def ledger(run_dir: Path) -> list[dict]:
    path = run_dir / "ledger.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def tmpfs(where: Path, size: str):
    """A real small filesystem at `where` (mount -t tmpfs, root only: skips elsewhere), unmounted after."""
    where.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.decode(errors='replace').strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def run_dir_of():
    return lambda run_toml: run_toml.parent / "runs" / "run"


def clean_env(*, drop: tuple[str, ...] = ("COMPOSE_",), **extra: str) -> dict[str, str]:
    """os.environ without credentials, platform markers, supervisor settings or the `drop` prefixes (compose
    settings by default) that would leak into a child; AWS's own lookups pointed nowhere; `extra` added."""
    prefixes = ("AWS_", "KAGGLE_", "COLAB_", "SUPERVISOR_", *drop)
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE="/nonexistent/aws-config",
               AWS_SHARED_CREDENTIALS_FILE="/nonexistent/aws-credentials")  # fmt: skip
    env.update(extra)
    return env
