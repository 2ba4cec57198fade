"""Exact resume on the CPU: 3 epochs straight == 2 epochs + resume from the epoch-1 checkpoint."""

from __future__ import annotations

import shutil

import pytest
import torch
from trainer_helpers import same_training_state, synth_root, tiny_params  # noqa: F401 - fixture

from supervisor.client import Supervised
from trainer.params import load_params
from trainer.train import SkipCounter, run


def _attempt(tmp, params, seed, load_epoch, epochs):
    sup = Supervised(
        checkpoint_dir=tmp / "ckpt", events_path=tmp / "events.jsonl", seed=seed, load_epoch=load_epoch,
        start_epoch=load_epoch + 1, epochs=epochs,
    )  # fmt: skip
    run(load_params(params), sup)
    return sup


def _load(tmp, epoch):
    return torch.load(tmp / "ckpt" / f"epoch-{epoch:04d}.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_bit_identical_and_a_new_seed_changes_the_data(tmp_path, synth_root, workers):  # noqa: F811
    params = tiny_params(synth_root, num_workers=workers)
    straight, split, reseeded = tmp_path / "straight", tmp_path / "split", tmp_path / "reseeded"
    _attempt(straight, params, seed=5, load_epoch=-1, epochs=3)
    _attempt(split, params, seed=5, load_epoch=-1, epochs=2)
    (reseeded / "ckpt").mkdir(parents=True)
    shutil.copy(split / "ckpt" / "epoch-0001.pt", reseeded / "ckpt" / "epoch-0001.pt")
    _attempt(split, params, seed=5, load_epoch=1, epochs=3)
    _attempt(reseeded, params, seed=6, load_epoch=1, epochs=3)

    a, b, c = _load(straight, 2), _load(split, 2), _load(reseeded, 2)
    assert same_training_state(_load(straight, 1), _load(split, 1))
    assert same_training_state(a, b)
    assert a["metrics"]["2"] == b["metrics"]["2"]
    assert not same_training_state(a, c)  # another seed: other batches and augmentation from epoch 2 on
    assert set(a) >= {"model", "optimizer", "scaler", "scheduler", "rng", "epoch", "metrics", "seed"}
    assert a["epoch"] == 2 and c["seed"] == 6


def test_skip_counter_with_a_real_grad_scaler():
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    counter = SkipCounter(limit=3, min_scale=1.0)
    fired = []
    for i in range(5):
        loss = (w * (float("inf") if i >= 1 else 1.0)).sum()
        scaler.scale(loss).backward()
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        fired.append(counter.update(before, scaler.get_scale()))
    assert fired == [False, False, False, True, True]
    assert torch.isfinite(w).all()  # the scaler protected the weights: only the counter tells


def test_skip_counter_ignores_the_scalers_start_up_back_off():
    """Ten skips in a row from 65536 are the scaler finding its scale, not a NaN; the same run
    that drives the scale below the floor is."""
    counter = SkipCounter(limit=8, min_scale=1.0)
    scale = 65536.0
    for _ in range(10):
        assert not counter.update(scale, scale / 2)
        scale /= 2
    counter.update(scale, scale)  # a real step: the run ends
    fired = []
    for _ in range(17):
        fired.append(counter.update(scale, scale / 2))
        scale /= 2
    assert fired.index(True) == 7  # the floor is crossed at the 7th skip (64 -> 0.5), the limit at the 8th
