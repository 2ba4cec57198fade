"""Mid-epoch checkpoints of the reference trainer: a request (or SIGTERM) is served at the next
optimizer step, and the next attempt resumes exactly there: same weights, optimizer state and
reported metrics as a run that was never interrupted."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from trainer_helpers import ROOT, read_events, run_trainer, same_training_state, synth_root, tiny_params  # noqa: F401 - fixture

from supervisor import protocol as P
from supervisor.client import CheckpointRequest, Supervised, atomic_write, sha256_file
from trainer.data import DataError
from trainer.params import load_params
from trainer.train import run


@dataclass
class RequestAfter(Supervised):
    """An attempt whose watchdog writes `request` into the request file (atomically, as the watchdog
    does) right after the trainer reported optimizer step `after` = (epoch, step): the request
    arrives while the run is going, at a known point."""

    after: tuple[int, int] | None = None
    request: CheckpointRequest | None = None

    def step(self, epoch, step, loss, **extra):
        super().step(epoch, step, loss, **extra)
        if (epoch, step) == self.after:
            atomic_write(self.request_path, lambda f: f.write(self.request.to_json()))


def _attempt(tmp: Path, params, *, seed=5, epochs=2, load_epoch=-1, start_step=0, load_path=None, after=None,
             request=None, events="events.jsonl"):  # fmt: skip
    sup = RequestAfter(
        checkpoint_dir=tmp / "ckpt", events_path=tmp / events, seed=seed, load_epoch=load_epoch,
        start_epoch=load_epoch if start_step else load_epoch + 1, start_step=start_step, epochs=epochs,
        load_path=load_path, request_path=tmp / "request.json", after=after, request=request,
    )  # fmt: skip
    return run(load_params(params), sup)


def _steps(events):
    return [(e["epoch"], e["step"], e["loss"], e["lr"]) for e in events if e["event"] == "step"]


def _checkpoints(events):
    return [e for e in events if e["event"] == "checkpoint"]


def _epoch_lines(caplog) -> list[str]:
    """The trainer's per-epoch log lines (loss, LR, loss components, AP50, ...) without the timings."""
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    caplog.clear()
    return [re.sub(r" [\d.]+ img/s [\d.]+s", "", line) for line in lines]


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        {"num_workers": 0},
        # workers, gradient accumulation (a step is 2 micro-batches), GradScaler on, multi-scale in both epochs
        {"num_workers": 2, "batch_size_train": 4, "accum_batch_num": 2, "mix_precision": True, "multi_scale_epoch": 3},
    ],
    ids=["workers0", "workers2-accum2-amp-multiscale"],
)
def test_a_run_paused_mid_epoch_resumes_exactly(tmp_path, synth_root, overrides, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, logger="trainer")
    params = tiny_params(synth_root, **overrides)
    straight, paused = tmp_path / "straight", tmp_path / "paused"

    # Uninterrupted, but asked for a checkpoint (no stop) after step 1 of epoch 0: it is served at
    # once, with step 2, and training goes on untouched.
    _attempt(straight, params, after=(0, 1), request=CheckpointRequest(1, "checkpoint"))
    events = read_events(straight / "events.jsonl")
    straight_lines = _epoch_lines(caplog)
    mid = _checkpoints(events)[0]
    assert (mid["epoch"], mid["step"], mid["request"]) == (0, 2, 1)
    assert mid["sha256"] == sha256_file(mid["path"]) and mid["size"] == Path(mid["path"]).stat().st_size
    assert torch.load(mid["path"], weights_only=True)["step"] == 2
    assert [(c["epoch"], c.get("step")) for c in _checkpoints(events)] == [(0, 2), (0, None), (1, None)]

    # Paused: a stop request after step 2 of epoch 1 ends the attempt with the checkpoint of step 3.
    out = _attempt(paused, params, after=(1, 2), request=CheckpointRequest(1, "stopped", stop=True),
                   events="events-0.jsonl")  # fmt: skip
    assert out["stopped"] == {"epoch": 1, "step": 3, "reason": "stopped"}
    first = read_events(paused / "events-0.jsonl")
    assert _steps(first)[-1][:2] == (1, 2)  # nothing trained after the step it was served at
    ckpt = _checkpoints(first)[-1]
    assert (ckpt["epoch"], ckpt["step"], ckpt["request"], ckpt["reason"]) == (1, 3, 1, "stopped")
    assert ckpt["path"] == str(paused / "ckpt" / P.checkpoint_name(1, step=3))
    assert not (paused / "ckpt" / "epoch-0001.pt").exists()
    assert _epoch_lines(caplog) == straight_lines[:1]

    # The next attempt: same seed, SUPERVISOR_START_STEP=3 (a new request file: the watchdog's ids restart).
    (paused / "request.json").unlink()
    _attempt(paused, params, load_epoch=1, start_step=3, load_path=Path(ckpt["path"]), events="events-1.jsonl")
    second = read_events(paused / "events-1.jsonl")
    assert _steps(second)[0][:2] == (1, 3)
    assert _epoch_lines(caplog) == straight_lines[1:]  # also the loss components summed over the whole epoch

    a = torch.load(straight / "ckpt" / "epoch-0001.pt", weights_only=True)
    b = torch.load(paused / "ckpt" / "epoch-0001.pt", weights_only=True)
    assert same_training_state(a, b)
    assert a["scaler"] == b["scaler"]
    assert a["metrics"] == b["metrics"]  # train loss of the interrupted epoch, AP50, VOCmAP, eval loss, per class
    assert _steps(first) + _steps(second) == _steps(events)  # every step's loss and LR, in order
    assert [e["metrics"] for e in second if e["event"] == "eval"] == [e["metrics"] for e in events
                                                                      if e["event"] == "eval"]  # fmt: skip


@pytest.mark.slow
def test_sigterm_to_the_trainer_saves_mid_epoch_and_the_next_attempt_resumes_exactly(tmp_path, synth_root):  # noqa: F811
    params = tiny_params(synth_root, num_epoch=1, batch_size_train=4, test_pr_after_epoch=5)
    first = tmp_path / "first"
    first.mkdir()
    (first / "params.json").write_text(json.dumps(params))
    env = {
        **os.environ, P.ENV_PARAMS: str(first / "params.json"), P.ENV_EVENTS: str(first / "events.jsonl"),
        P.ENV_CHECKPOINT_DIR: str(first / "ckpt"), P.ENV_RUN_DIR: str(first), P.ENV_SEED: "5",
        P.ENV_LOAD_EPOCH: "-1", P.ENV_EPOCHS: "1",
    }  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "trainer"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        # The capability heartbeat comes once the SIGTERM handler is in place, before training starts.
        deadline = time.monotonic() + 120
        while not any(P.HANDLES in e for e in read_events(first / "events.jsonl")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out + err
    events = read_events(first / "events.jsonl")
    ckpt = _checkpoints(events)[-1]
    step = ckpt["step"]
    assert ckpt["reason"] == "sigterm" and "request" not in ckpt
    assert _steps(events)[-1][:2] == (0, step - 1)  # served at the step right after the last one reported
    assert ckpt["sha256"] == sha256_file(ckpt["path"]) and ckpt["size"] == Path(ckpt["path"]).stat().st_size
    assert f"stopped at epoch 0 step {step} on request (sigterm)" in out
    assert "done" not in out.split("stopped at")[-1]

    proc, resumed = run_trainer(tmp_path / "second", params, env={
        P.ENV_LOAD_EPOCH: "0", P.ENV_START_EPOCH: "0", P.ENV_START_STEP: str(step), P.ENV_EPOCHS: "1",
        P.ENV_LOAD_PATH: ckpt["path"], P.ENV_LOAD_SHA256: ckpt["sha256"],
    })  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _steps(resumed)[0][:2] == (0, step)

    straight = tmp_path / "straight"
    _attempt(straight, params, epochs=1)
    a = torch.load(straight / "ckpt" / "epoch-0000.pt", weights_only=True)
    b = torch.load(tmp_path / "second" / "ckpt" / "epoch-0000.pt", weights_only=True)
    assert same_training_state(a, b) and a["metrics"] == b["metrics"]
    assert _steps(events) + _steps(resumed) == _steps(read_events(straight / "events.jsonl"))


def test_a_request_file_from_the_environment_stops_the_trainer(tmp_path, synth_root):  # noqa: F811
    """SUPERVISOR_CHECKPOINT_REQUEST end to end: the request is in place before training starts, so
    it is served at the first optimizer step."""
    params = tiny_params(synth_root, num_epoch=1, test_pr_after_epoch=5)
    req = tmp_path / "request.json"
    atomic_write(req, lambda f: f.write(CheckpointRequest(3, "preempted", stop=True).to_json()))
    proc, events = run_trainer(tmp_path, params, env={P.ENV_CHECKPOINT_REQUEST: str(req), P.ENV_EPOCHS: "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert events[0]["event"] == "heartbeat" and events[0][P.HANDLES] == [P.CAPABILITY_CHECKPOINT_REQUEST]
    assert [(e["epoch"], e["step"]) for e in events if e["event"] == "step"] == [(0, 0)]
    (ckpt,) = _checkpoints(events)
    assert (ckpt["epoch"], ckpt["step"], ckpt["request"]) == (0, 1, 3)
    assert ckpt["sha256"] == sha256_file(ckpt["path"])
    assert "stopped at epoch 0 step 1 on request (preempted)" in proc.stdout


@pytest.mark.slow
def test_format_1_checkpoints_still_load_and_a_step_mismatch_is_refused(tmp_path, synth_root):  # noqa: F811
    params = tiny_params(synth_root, num_epoch=2, test_pr_after_epoch=5)
    _attempt(tmp_path, params, epochs=1)
    path = tmp_path / "ckpt" / "epoch-0000.pt"
    state = torch.load(path, weights_only=True)
    assert state["format"] == 2 and set(state["rng"]) >= {"python", "numpy", "torch"} and "step" not in state
    state["format"], state["rng"] = 1, {"torch": state["rng"]["torch"]}  # what the previous trainer wrote
    torch.save(state, path)
    _attempt(tmp_path, params, epochs=2, load_epoch=0)
    assert torch.load(tmp_path / "ckpt" / "epoch-0001.pt", weights_only=True)["epoch"] == 1
    # SUPERVISOR_START_STEP=4 with an end-of-epoch checkpoint: refused in one line, nothing trained.
    with pytest.raises(DataError, match="the end of epoch 0 but SUPERVISOR_START_STEP is 4"):
        _attempt(tmp_path, params, epochs=2, load_epoch=0, start_step=4, load_path=path)
