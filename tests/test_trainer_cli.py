"""`python -m trainer` speaks the supervisor's protocol: events, checkpoints, exit codes, injected faults."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from trainer_helpers import ROOT, read_events, run_trainer, synth_root, tiny_params  # noqa: F401

from supervisor.client import sha256_file
from trainer.faults import CUDA_ASSERT_TEXT, GPU_OOM_TEXT


def _kinds(events):
    return [(e["event"], e.get("epoch")) for e in events if e["event"] not in ("step", "heartbeat")]


@pytest.mark.slow
def test_nan_on_attempt_0_then_the_next_attempt_resumes(tmp_path, synth_root):  # noqa: F811
    params = tiny_params(synth_root, num_epoch=2, inject_fault={"kind": "nan", "epoch": 1, "step": 2})
    proc, events = run_trainer(tmp_path, params)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "FAULT INJECTION" in proc.stdout
    last = events[-1]
    assert (last["event"], last["epoch"], last["step"]) == ("step", 1, 2) and math.isnan(last["loss"])
    assert _kinds(events) == [("checkpoint", 0)]  # epoch 0 had no eval (test_pr_after_epoch = 1)
    assert "Traceback" not in proc.stdout + proc.stderr

    # Attempt 1 (what the supervisor launches next): from the epoch-0 checkpoint, another seed.
    ckpt = tmp_path / "ckpt" / "epoch-0000.pt"
    proc, events = run_trainer(
        tmp_path, params,
        env={"SUPERVISOR_ATTEMPT": "1", "SUPERVISOR_SEED": "6", "SUPERVISOR_LOAD_EPOCH": "0",
             "SUPERVISOR_START_EPOCH": "1", "SUPERVISOR_EPOCHS": "2", "SUPERVISOR_LOAD_SHA256": sha256_file(ckpt)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _kinds(events)[-2:] == [("eval", 1), ("checkpoint", 1)]  # eval first, checkpoint ends the epoch
    metrics = [e for e in events if e["event"] == "eval"][-1]["metrics"]
    assert set(metrics) == {"AP50", "VOCmAP", "loss"} and all(0 <= metrics[k] <= 1 for k in ("AP50", "VOCmAP"))
    state = torch.load(tmp_path / "ckpt" / "epoch-0001.pt", weights_only=True)
    assert state["epoch"] == 1 and state["seed"] == 6


@pytest.mark.parametrize(
    ("kind", "needle"),
    [("crash", "RuntimeError: FAULT INJECTION: crash"), ("cuda_error", CUDA_ASSERT_TEXT), ("gpu_oom", GPU_OOM_TEXT)],
)
def test_crash_and_cuda_error(tmp_path, synth_root, kind, needle):  # noqa: F811
    params = tiny_params(synth_root, num_epoch=1, inject_fault={"kind": kind, "epoch": 0, "step": 1})
    proc, events = run_trainer(tmp_path, params)
    assert proc.returncode == 1
    assert needle in proc.stderr
    assert [e["step"] for e in events if e["event"] == "step"] == [0]


def test_fault_only_fires_on_its_attempt(tmp_path, synth_root):  # noqa: F811
    params = tiny_params(synth_root, num_epoch=1, test_pr_after_epoch=5,
                         inject_fault={"kind": "crash", "epoch": 0, "step": 0, "attempt": 1})  # fmt: skip
    proc, events = run_trainer(tmp_path, params)
    assert proc.returncode == 0, proc.stderr
    assert _kinds(events) == [("checkpoint", 0)]


def test_a_list_of_faults_fires_each_on_its_own_attempt_and_step(tmp_path, synth_root):  # noqa: F811
    faults = [{"kind": "crash", "epoch": 0, "step": 3, "attempt": 0}, {"kind": "gpu_oom", "epoch": 0, "step": 2,
              "attempt": 1}]  # fmt: skip
    params = tiny_params(synth_root, num_epoch=1, inject_fault=faults)
    proc, events = run_trainer(tmp_path, params, env={"SUPERVISOR_ATTEMPT": "1"})
    assert proc.returncode == 1 and GPU_OOM_TEXT in proc.stderr
    assert [e["step"] for e in events if e["event"] == "step"] == [0, 1]


def test_amp_overflow_is_reported_as_nan_after_the_skip_limit(tmp_path, synth_root):  # noqa: F811
    """Under AMP (GradScaler on the CPU here, CUDA on a GPU) infinite gradients never reach the loss:
    the scaler skips the steps, and `amp_skip_limit` skips in a row are reported as a NaN."""
    params = tiny_params(synth_root, num_epoch=1, mix_precision=True, amp_skip_limit=3, amp_min_scale=16384,
                         inject_fault={"kind": "amp_overflow", "epoch": 0, "step": 1})  # fmt: skip
    proc, events = run_trainer(tmp_path, params)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    steps = [e for e in events if e["event"] == "step"]
    assert all(math.isfinite(e["loss"]) for e in steps[:-1])
    assert math.isnan(steps[-1]["loss"]) and steps[-1]["amp_skipped_steps"] == 3 and steps[-1]["step"] == 3


def test_hang_stops_all_events(tmp_path, synth_root):  # noqa: F811
    params = tiny_params(synth_root, num_epoch=1, inject_fault={"kind": "hang", "epoch": 0, "step": 1})
    (tmp_path / "params.json").write_text(json.dumps(params))
    env = {
        **os.environ,
        "SUPERVISOR_PARAMS": str(tmp_path / "params.json"),
        "SUPERVISOR_EVENTS": str(tmp_path / "events.jsonl"),
        "SUPERVISOR_CHECKPOINT_DIR": str(tmp_path / "c"),
    }
    proc = subprocess.Popen([sys.executable, "-m", "trainer"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not any(e["event"] == "step" for e in read_events(tmp_path / "events.jsonl")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        count = len(read_events(tmp_path / "events.jsonl"))
        time.sleep(3)
        events = read_events(tmp_path / "events.jsonl")
        assert proc.poll() is None and len(events) == count
        assert [e["event"] for e in events] == ["heartbeat", "step"]  # the capability, step 0, then nothing
    finally:
        proc.kill()
        out = proc.communicate()[0]
    assert "FAULT INJECTION" in out and "hang" in out


def test_supervisor_epochs_win_and_the_contradiction_is_reported(tmp_path, synth_root):  # noqa: F811
    params = tiny_params(synth_root, num_epoch=3, test_pr_after_epoch=5)
    proc, events = run_trainer(tmp_path, params, env={"SUPERVISOR_EPOCHS": "1", "SUPERVISOR_BATCH_DIVISOR": "2"})
    assert proc.returncode == 0, proc.stderr
    assert _kinds(events) == [("checkpoint", 0)]
    warnings = [ln for ln in proc.stdout.splitlines() if "contradicts" in ln]
    assert len(warnings) == 1 and "num_epoch = 3" in warnings[0]
    assert "micro-batch 4 x 2 accumulation steps" in proc.stdout
    assert max(e["step"] for e in events if e["event"] == "step") == 5  # 48 images / 8 per step


def test_a_checkpoint_with_the_wrong_sha256_is_refused_in_one_line(tmp_path, synth_root):  # noqa: F811
    params = tiny_params(synth_root, num_epoch=1, test_pr_after_epoch=5)
    assert run_trainer(tmp_path, params)[0].returncode == 0
    proc, _ = run_trainer(tmp_path, params, env={"SUPERVISOR_LOAD_EPOCH": "0", "SUPERVISOR_EPOCHS": "2",
                                                 "SUPERVISOR_LOAD_SHA256": "0" * 64})  # fmt: skip
    assert proc.returncode == 2
    assert "sha256" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr


def test_missing_data_is_one_line(tmp_path):
    proc, _ = run_trainer(tmp_path, tiny_params(tmp_path / "nothing"))
    assert proc.returncode == 2
    assert "no VOCdevkit under data_root" in proc.stdout and "Traceback" not in proc.stderr
