"""Shared pieces of the trainer tests: a tiny synthetic VOC set and tiny parameters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding VOCdevkit/ with 60 images of 64 px (48 trainval, 12 test)."""
    from trainer.synth import write_dataset

    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, images=60, size=64, seed=3)
    return root


def tiny_params(data_root: Path | str, **overrides: Any) -> dict[str, Any]:
    """Parameters for a few-second CPU run at 64 px (grid 2)."""
    p: dict[str, Any] = {
        "data_root": str(data_root),
        "classes": ["circle", "square", "triangle", "cross", "ring"],
        "output_scale_S": 2,
        "batch_size_train": 8,
        "batch_size_test": 16,
        "accum_batch_num": 1,
        "num_epoch": 3,
        "multi_scale_epoch": 1,
        "neck_channels": 16,
        "pretrained": False,
        "num_workers": 0,
        "lr_linear_max": 0.01,
        "lr_warmup_epoch": 1,
        "lr_cosine_max_1": 0.01,
        "lr_T_half_1": 4,
        "mix_precision": False,
        "test_pr_after_epoch": 1,
        "epoch_prior": 2,
        "random_ratio": 0.5,
        "train_sets": ["VOC2007/trainval"],
    }
    p.update(overrides)
    return p


def run_trainer(
    tmp: Path, params: dict[str, Any], env: dict[str, str] | None = None, timeout: float = 180,
    script: list[str] | None = None,
) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:  # fmt: skip
    """`python -m trainer` (or `python SCRIPT ARGS`) under a protocol environment in `tmp`; returns the process
    and its events."""
    full = trainer_env(tmp, params, env)
    cmd = [sys.executable, *(script or ["-m", "trainer"])]
    proc = subprocess.run(cmd, cwd=ROOT, env=full, capture_output=True, text=True, timeout=timeout)
    return proc, read_events(Path(full["SUPERVISOR_EVENTS"]))


def trainer_env(tmp: Path, params: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, str]:
    """The protocol environment `run_trainer` gives an attempt in `tmp` (params written to tmp/params.json)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "params.json").write_text(json.dumps(params))
    return {
        **os.environ,
        "SUPERVISOR_PARAMS": str(tmp / "params.json"),
        "SUPERVISOR_EVENTS": str(tmp / "events.jsonl"),
        "SUPERVISOR_CHECKPOINT_DIR": str(tmp / "ckpt"),
        "SUPERVISOR_RUN_DIR": str(tmp),
        "SUPERVISOR_SEED": "5",
        "SUPERVISOR_LOAD_EPOCH": "-1",
        "SUPERVISOR_ATTEMPT": "0",
        **(env or {}),
    }


def run_torchrun(
    tmp: Path, params: dict[str, Any], env: dict[str, str] | None = None, nproc: int = 2,
    script: list[str] | None = None, timeout: float = 300,
) -> tuple[subprocess.CompletedProcess[str], list[list[dict[str, Any]]]]:  # fmt: skip
    """`python -m trainer` (or `script`: a path and its args) in `nproc` processes under torchrun on this host
    (`--standalone`: a free port), gloo on the CPU, one thread each; returns torchrun's process and every
    rank's events (rank 0's file, SUPERVISOR_EVENTS, then its rank_events_path for each other rank)."""
    full = trainer_env(tmp, params, {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})})
    target = script or ["-m", "trainer"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", *target]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=full, capture_output=True, text=True, timeout=timeout)
    events = Path(full["SUPERVISOR_EVENTS"])
    from supervisor.protocol import rank_events_path

    return proc, [read_events(rank_events_path(events, r)) for r in range(nproc)]


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def same_training_state(a: dict, b: dict) -> bool:
    """Two checkpoints hold identical model weights and optimizer state (every tensor equal, bit for bit)."""
    import torch

    def tensors(state: dict) -> dict:
        out = {f"model.{k}": v for k, v in state["model"].items()}
        for pid, st in state["optimizer"]["state"].items():
            out.update({f"opt.{pid}.{k}": v for k, v in st.items()})
        return out

    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
