"""The package as pip installs it: the watchdog (`pip install train-supervisor`) needs no torch.

The base dependencies are the watchdog's alone; torch and torchvision come with the `[trainer]` extra (the
reference detector), the integrations with `[lightning]` / `[transformers]`, everything with `[test]`. The
slow test installs the base package, non-editable, from a copy of the files deploy/Dockerfile copies into a
fresh venv that has no torch, and supervises a torch-free protocol trainer through the installed
`supervisor` command, a crash and a resume included. The fast one imports every module of `supervisor`
and checks that no trainer-only library came with them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import clean_env, write_run

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
# What only the extras bring (and what they pull in): none of it may be imported by the watchdog.
HEAVY = ("torch", "torchvision", "numpy", "PIL", "tqdm", "lightning", "pytorch_lightning", "transformers",
         "accelerate")  # fmt: skip
# The modules that need an extra, by design; any other module of `supervisor` must import with the base install.
EXTRA_ONLY = ("supervisor.integrations.lightning", "supervisor.integrations.transformers")

# A protocol trainer with the standard library and supervisor.client only: three "steps" per epoch, a JSON
# checkpoint per epoch written atomically and announced, and one crash in the first attempt right after
# epoch 0's checkpoint, so the second attempt has to resume from SUPERVISOR_LOAD_PATH.
TORCH_FREE_TRAINER = textwrap.dedent("""
    import hashlib, json, os, sys

    from supervisor.client import Supervised, atomic_write

    sup = Supervised.from_env()
    attempt = os.environ["SUPERVISOR_ATTEMPT"]
    load_path = os.environ.get("SUPERVISOR_LOAD_PATH")
    state = {"epoch": -1, "trail": []}
    if load_path:
        state = json.loads(open(load_path, encoding="utf-8").read())
        print(f"attempt {attempt}: resumed from {load_path} (epoch {state['epoch']})", flush=True)
    for epoch in range(sup.start_epoch, sup.epochs):
        for step in range(3):
            sup.step(epoch, step, 1.0 / (1 + 3 * epoch + step))
        state = {"epoch": epoch, "trail": state["trail"] + [[int(attempt), sup.seed, epoch]]}
        data = json.dumps(state).encode()
        path = sup.checkpoint_path(epoch)
        atomic_write(path, lambda f: f.write(data))
        sup.checkpoint_done(epoch, path=path, sha256=hashlib.sha256(data).hexdigest(), size=len(data))
        if epoch == 0 and attempt == "0":
            sys.exit("crashing after epoch 0's checkpoint, on purpose")
    print("torch loaded:", "torch" in sys.modules, flush=True)
""")


def test_base_dependencies_leave_torch_to_the_extras():
    """`pip install train-supervisor` is the watchdog alone; `[test]` still installs everything the suite needs."""
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = lambda requirement: Requirement(requirement).name.lower()  # noqa: E731
    base = {name(r) for r in project["dependencies"]}
    assert not base & {"torch", "torchvision", "numpy", "pillow", "tqdm", "lightning", "transformers"}, base
    extras = project["optional-dependencies"]
    assert {"torch", "torchvision", "numpy", "pillow", "tqdm"} <= {name(r) for r in extras["trainer"]}
    assert any(name(r) == "lightning" for r in extras["lightning"])
    assert {"transformers", "accelerate", "torch"} <= {name(r) for r in extras["transformers"]}
    assert {"matplotlib"} <= {name(r) for r in extras["plots"]} and "tensorboard" in extras["tensorboard"][0]
    assert {"mlflow-skinny", "sqlalchemy", "alembic"} <= {name(r) for r in extras["mlflow"]}
    assert f"{project['name']}[trainer,lightning,transformers,plots,tensorboard,mlflow]" in extras["test"]
    assert not base & {"matplotlib", "tensorboard", "mlflow-skinny", "mlflow", "wandb"}, base


def test_no_module_of_the_watchdog_imports_a_trainer_library():
    """Every module of `supervisor` but the integrations that exist to import lightning / transformers (their
    shared helpers included) imports without torch, torchvision, numpy, pillow, tqdm or those libraries."""
    code = textwrap.dedent("""
        import importlib, json, pkgutil, sys
        import supervisor
        names = []
        for info in pkgutil.walk_packages(supervisor.__path__, "supervisor."):
            if info.name.endswith(".__main__") or info.name in sys.argv[1:]:
                continue
            importlib.import_module(info.name)
            names.append(info.name)
        print(json.dumps({"modules": names, "loaded": sorted({m.split(".")[0] for m in sys.modules})}))
    """)
    out = subprocess.run([sys.executable, "-c", code, *EXTRA_ONLY], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"supervisor.cli", "supervisor.watchdog", "supervisor.client", "supervisor.store.s3"} <= set(
        found["modules"]
    ), found["modules"]
    assert not set(HEAVY) & set(found["loaded"]), sorted(set(HEAVY) & set(found["loaded"]))


def venv_env(venv: Path) -> dict[str, str]:
    """The environment of a shell with `venv` activated, nothing of this test's interpreter leaking in."""
    env = clean_env()
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONNOUSERSITE"):
        env.pop(name, None)
    env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
               PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")  # fmt: skip
    return env


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_base_install_in_a_fresh_venv_runs_a_torch_free_trainer_with_a_restart(tmp_path: Path):
    # The files deploy/Dockerfile copies, and nothing else: the wheel built from them must be complete. A copy,
    # so setuptools' build/ folder (stale modules included) lands in tmp_path, not in the checkout.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for package in ("supervisor", "trainer"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    venv = tmp_path / "venv"
    made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=300)
    if made.returncode != 0:
        pytest.skip(f"python -m venv does not work here: {made.stderr.strip()[-500:]}")
    env = venv_env(venv)
    python, supervisor = str(venv / "bin" / "python"), str(venv / "bin" / "supervisor")
    run = lambda *argv, timeout=120: subprocess.run(list(argv), cwd=tmp_path, env=env, capture_output=True,  # noqa: E731
                                                    text=True, timeout=timeout)  # fmt: skip

    installed = run(python, "-m", "pip", "install", "-q", str(source), timeout=480)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    freeze = run(python, "-m", "pip", "freeze").stdout.lower()
    for heavy in ("torch", "torchvision", "numpy", "pillow", "tqdm"):
        assert not any(line.split("==")[0] == heavy for line in freeze.splitlines()), f"{heavy} installed:\n{freeze}"

    no_torch = run(python, "-c", "import torch")
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr, no_torch.stderr
    code = ("import sys, supervisor, supervisor.cli, supervisor.watchdog, supervisor.client, supervisor.store.s3; "
            "print(supervisor.__file__, 'torch' in sys.modules)")  # fmt: skip
    imports = run(python, "-c", code)
    assert imports.returncode == 0, imports.stderr[-3000:]
    module_file, torch_loaded = imports.stdout.split()
    assert Path(module_file).is_relative_to(venv), f"not the installed copy: {module_file}"  # non-editable
    assert torch_loaded == "False"

    script = tmp_path / "torch_free_trainer.py"
    script.write_text(TORCH_FREE_TRAINER)
    toml = write_run(tmp_path, name="no-torch", epochs=3, command=["python", str(script)],
                     watch={"disk_min_free": "10MiB"})  # fmt: skip
    valid = run(supervisor, "validate", str(toml))
    assert valid.returncode == 0, valid.stdout + valid.stderr

    started = run(supervisor, "start", str(toml), timeout=300)
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
    out = run(supervisor, "report", str(toml), "--format", "json")
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["status"] == "completed" and rep["checkpoints"][-1] == 2, rep
    first, second = rep["attempts"]
    assert first["reason"] == "normal start" and first["ended_by"] == "crash", first
    assert second["load_epoch"] == 0 and second["seed"] != first["seed"], second
    run_dir = tmp_path / "runs" / "no-torch"
    final = json.loads((run_dir / "checkpoints" / "epoch-0002.pt").read_text())
    # Epoch 0 trained by the first attempt, 1 and 2 by the second, which started from epoch 0's file.
    assert final["trail"] == [[0, first["seed"], 0], [1, second["seed"], 1], [1, second["seed"], 2]], final
    log = (run_dir / "attempts" / "attempt-0001.log").read_text()
    assert "attempt 1: resumed from" in log and "torch loaded: False" in log, log[-2000:]
