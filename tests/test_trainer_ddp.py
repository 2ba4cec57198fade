"""The reference trainer under torchrun: two CPU processes (gloo, one thread each) train data-parallel.

Tiny parameters: 48 training images of 64 px, global micro-batch 8 (4 per process), GradScaler on, multi-scale
in epoch 0, 2 epochs of 6 optimizer steps, eval after epoch 1 in 3 batches of 4 (rank 0 takes 2, rank 1 one).

- `two`: 2 processes; a checkpoint request (no stop) arrives after step 0 and is served at step 1.
- `one`: 1 process with SUPERVISOR_BATCH_DIVISOR=2: micro-batch 4, 2 accumulation steps, the same global batch.
  Its two micro-batches of each step are exactly the shards the two processes train on (same images, input
  sizes and augmentation), so BatchNorm normalizes the same 4 images, and the gradient is g0/2 + g1/2 in
  both (DDP averages the two ranks' gradients; scaling by 1/2 is exact in floating point and a sum of two
  terms does not depend on their order): the runs agree bit for bit. Only the BN running statistics differ
  (one process updates them at both micro-batches of a step, DDP keeps rank 0's), hence the eval metrics.
- `paused` + resumed: 2 processes stopped by a stop request after step 0 of epoch 1, then a second torchrun
  attempt from that mid-epoch checkpoint: identical to `two`.
- `accum`: with accumulation in each process (2 per process against 4 in one process) the four micro-batch
  gradients are summed in another order ((g0 + g2) + (g1 + g3) against ((g0 + g1) + g2) + g3): float rounding,
  compared after the first optimizer step (later steps amplify it; see ACCUM_ATOL).
"""

from __future__ import annotations

import logging
import math
import textwrap
from pathlib import Path

import pytest
import torch
from trainer_helpers import run_torchrun, run_trainer, same_training_state, synth_root, tiny_params  # noqa: F401 - fixture

from supervisor import protocol as P
from supervisor.client import Supervised
from trainer import faults
from trainer.data import EpochBatchSampler, EvalBatchSampler
from trainer.params import FaultSpec, ParamsError, load_params
from trainer.train import _loaders, evaluate, run, setup

# With accumulation in each process: weights and momentum of 1 and 2 processes after ONE optimizer step differ
# by the rounding of the gradient sums: measured 1.8e-7 on a momentum buffer (= the gradient after one step) of
# up to 0.79, 2 float32 ulps there. A gradient left without its all-reduce (rank 0's shards only) would be off by
# about half the gradient itself (median element 1.2e-3). Over more steps this tiny detector at loss ~150,
# whose gradient norm is far above clip_max_norm, amplifies rounding about tenfold per step (1e-2 after 6
# steps), so later steps are not compared.
ACCUM_ATOL = 1e-6

# `python -m trainer` whose rank 0 writes a checkpoint request right after reporting step TEST_AFTER="E,S": a
# request that arrives mid-run at a known point (as the watchdog's would), so the run is reproducible.
REQUEST_AFTER = textwrap.dedent("""
    import os, sys
    from dataclasses import dataclass
    import trainer.__main__ as entry
    from supervisor.client import CheckpointRequest, Supervised, atomic_write

    AFTER = tuple(int(x) for x in os.environ["TEST_AFTER"].split(","))
    REQUEST = CheckpointRequest(1, os.environ["TEST_REASON"], stop=os.environ["TEST_STOP"] == "1")

    @dataclass
    class RequestAfter(Supervised):
        def step(self, epoch=None, step=None, loss=None, **extra):
            super().step(epoch, step, loss, **extra)
            if self.is_main and (epoch, step) == AFTER:
                atomic_write(self.request_path, lambda f: f.write(REQUEST.to_json()))

    entry.Supervised = RequestAfter
    sys.exit(entry.main())
""")


def _params(root: Path, **overrides) -> dict:
    base = {"num_epoch": 2, "batch_size_train": 8, "batch_size_test": 4, "mix_precision": True,
            "test_pr_after_epoch": 1}  # fmt: skip
    return tiny_params(root, **{**base, **overrides})


def _request_env(tmp: Path, after: tuple[int, int], reason: str, stop: bool) -> dict[str, str]:
    return {"TEST_AFTER": f"{after[0]},{after[1]}", "TEST_REASON": reason, "TEST_STOP": "1" if stop else "0",
            P.ENV_CHECKPOINT_REQUEST: str(tmp / "request.json")}  # fmt: skip


def _check(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ddp-script") / "request_after.py"
    path.write_text(REQUEST_AFTER)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synth_root, script):  # noqa: F811
    base = tmp_path_factory.mktemp("ddp")
    params = _params(synth_root)
    out = {"params": params}

    two = base / "two"
    proc, events = run_torchrun(two, params, _request_env(two, (0, 0), "every_s", False), script=[str(script)])
    _check(proc)
    out["two"] = (two, events)

    one = base / "one"
    env = {**_request_env(one, (0, 0), "every_s", False), "SUPERVISOR_BATCH_DIVISOR": "2", "OMP_NUM_THREADS": "1"}
    proc, events = run_trainer(one, params, env, script=[str(script)])
    _check(proc)
    out["one"] = (one, [events])

    paused = base / "paused"
    proc, first = run_torchrun(paused, params, _request_env(paused, (1, 0), "preempted", True), script=[str(script)])
    _check(proc)
    out["paused_log"] = proc.stdout + proc.stderr
    ckpt = [e for e in first[0] if e["event"] == "checkpoint"][-1]
    (paused / "request.json").unlink()  # the watchdog replaces the file before each attempt
    proc, second = run_torchrun(paused, params, {
        P.ENV_LOAD_EPOCH: "1", P.ENV_START_EPOCH: "1", P.ENV_START_STEP: str(ckpt["step"]),
        P.ENV_LOAD_PATH: ckpt["path"], P.ENV_LOAD_SHA256: ckpt["sha256"], P.ENV_ATTEMPT: "1",
        P.ENV_EVENTS: str(paused / "events-1.jsonl"),
    })  # fmt: skip
    _check(proc)
    out["paused"] = (paused, first, second, ckpt)
    return out


def _steps(events: list[dict]) -> list[tuple]:
    return [(e["epoch"], e["step"], e["loss"], e["lr"]) for e in events if e["event"] == "step"]


def _load(tmp: Path, epoch: int) -> dict:
    return torch.load(tmp / "ckpt" / f"epoch-{epoch:04d}.pt", weights_only=True)


def _max_difference(a: dict, b: dict) -> tuple[float, float]:
    """Largest |difference| over parameters + momentum (0.0: bit for bit), and over the BN running statistics."""
    buffers = {k for k in a["model"] if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    tensors = [(a["model"][k], b["model"][k]) for k in a["model"] if k not in buffers]
    for pid, st in a["optimizer"]["state"].items():
        tensors += [(v, b["optimizer"]["state"][pid][k]) for k, v in st.items() if k == "momentum_buffer"]
    weights = max(float((x.double() - y.double()).abs().max()) for x, y in tensors)
    stats = max(float((a["model"][k].double() - b["model"][k].double()).abs().max()) for k in buffers
                if not k.endswith("num_batches_tracked"))  # fmt: skip
    return weights, stats


# -- without processes ------------------------------------------------------------------------------


def test_each_rank_takes_its_slice_of_the_global_batches_one_process_would_train_on():
    one = EpochBatchSampler(48, 8, seed=5, base_size=64, sizes=[64, 96], sizes_every=2)
    ranks = [EpochBatchSampler(48, 8, seed=5, base_size=64, sizes=[64, 96], sizes_every=2, rank=r, world=2)
             for r in (0, 1)]  # fmt: skip
    # One process with SUPERVISOR_BATCH_DIVISOR=2: micro-batches of 4, 4 per optimizer step.
    halves = EpochBatchSampler(48, 4, seed=5, base_size=64, sizes=[64, 96], sizes_every=4)
    for s in (one, halves, *ranks):
        s.set_epoch(3, multiscale=True)
    whole, shards, small = one.batches(), [r.batches() for r in ranks], halves.batches()
    assert len(ranks[0]) == len(ranks[1]) == len(whole) == 6
    for b, batch in enumerate(whole):
        assert shards[0][b] + shards[1][b] == batch  # disjoint halves of the same global batch
        assert small[2 * b] == shards[0][b] and small[2 * b + 1] == shards[1][b]  # same keys: sizes and seeds
    for r in ranks:  # a mid-epoch resume skips global batches: the same ones on every rank
        r.set_epoch(3, multiscale=True, skip=2)
    assert [list(r) for r in ranks] == [s[2:] for s in shards]
    with pytest.raises(ValueError, match="rank 2"):
        EpochBatchSampler(48, 8, 5, 64, [64], rank=2, world=2)


def test_the_evaluation_is_shared_by_batches():
    assert list(EvalBatchSampler(10, 4)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert list(EvalBatchSampler(10, 4, rank=0, world=2)) == [[0, 1, 2, 3], [8, 9]]
    assert list(EvalBatchSampler(10, 4, rank=1, world=2)) == [[4, 5, 6, 7]]
    assert list(EvalBatchSampler(10, 4, batches=2, rank=2, world=3)) == []  # test_pr_batch_ratio left it none
    assert list(EvalBatchSampler(0, 4)) == []


def test_the_global_batch_must_split_over_the_processes(tmp_path, synth_root):  # noqa: F811
    p = load_params(_params(synth_root))
    assert p.batch_plan(1, 2) == (4, 1) and p.batch_plan(2, 2) == (2, 2) and p.batch_plan(2) == (4, 2)
    with pytest.raises(ParamsError, match="batch_size_train = 8 is the global batch of the 3 processes"):
        p.batch_plan(1, 3)
    # Refused before the process group is joined (no rendezvous that would wait for the other ranks).
    with pytest.raises(ParamsError, match="multiple of 3"):
        run(p, Supervised(events_path=tmp_path / "events.jsonl", rank=0, world_size=3))


def test_a_fault_can_target_one_rank():
    spec = [FaultSpec(kind="nan", epoch=1, step=2, rank=1), FaultSpec(kind="crash", epoch=2, step=0)]
    assert faults.due(spec, 0, 1, 2, rank=0) is None
    assert faults.due(spec, 0, 1, 2, rank=1) == "nan"
    assert faults.due(spec, 0, 2, 0, rank=3) == "crash"  # no rank: every rank


# -- two processes ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_train_as_one_process_with_the_same_global_batch(runs):
    two, (ev2, _) = runs["two"]
    one, (ev1,) = runs["one"]
    for epoch in (0, 1):
        a, b = _load(two, epoch), _load(one, epoch)
        weights, stats = _max_difference(a, b)
        assert weights == 0.0  # parameters and momentum, bit for bit
        assert a["scaler"] == b["scaler"] and a["metrics"][str(epoch)]["train_loss"] == b["metrics"][str(epoch)][
            "train_loss"]  # fmt: skip
        assert stats > 0  # BN running statistics: DDP keeps rank 0's updates only
    assert _steps(ev2) == _steps(ev1)  # every step's loss (rank 0: the global mean) and LR
    assert len(_steps(ev2)) == 12
    mid2, mid1 = (torch.load(tmp / "ckpt" / "epoch-0000-step-00000001.pt", weights_only=True) for tmp in (two, one))
    assert _max_difference(mid2, mid1)[0] == 0.0

    # The sharded evaluation gathered on rank 0 gives exactly what one process computes with those weights.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the trainer's processes
    try:
        params = load_params(runs["params"])
        sup = Supervised(checkpoint_dir=two / "ckpt", seed=5, load_epoch=1, start_epoch=2, epochs=2)
        att = setup(params, sup)
        metrics = evaluate(att, _loaders(att)[2], 1)
    finally:
        torch.set_num_threads(threads)
    (eval2,) = [e["metrics"] for e in ev2 if e["event"] == "eval"]
    assert eval2 == {k: metrics[k] for k in ("AP50", "VOCmAP", "loss")}
    assert _load(two, 1)["metrics"]["last"]["per_class"] == metrics["per_class"]
    (eval1,) = [e["metrics"] for e in ev1 if e["event"] == "eval"]
    print(f"1 vs 2 processes: weights and momentum identical; BN statistics differ by up to {stats:.3g}; "
          f"eval {eval2} (2 processes) vs {eval1} (1 process)")  # fmt: skip


@pytest.mark.slow
def test_with_accumulation_the_first_step_agrees_to_rounding(tmp_path, synth_root, script):  # noqa: F811
    """2 accumulation steps per process (`no_sync` for the first micro-batch) against 4 in one process."""
    params = _params(synth_root, accum_batch_num=2, num_epoch=1, test_pr_after_epoch=5)
    two, one = tmp_path / "two", tmp_path / "one"
    proc, _ = run_torchrun(two, params, _request_env(two, (0, 0), "stopped", True), script=[str(script)])
    _check(proc)
    env = {**_request_env(one, (0, 0), "stopped", True), "SUPERVISOR_BATCH_DIVISOR": "2", "OMP_NUM_THREADS": "1"}
    proc, events = run_trainer(one, params, env, script=[str(script)])
    _check(proc)
    a, b = (torch.load(tmp / "ckpt" / "epoch-0000-step-00000001.pt", weights_only=True) for tmp in (two, one))
    weights, _ = _max_difference(a, b)
    assert weights < ACCUM_ATOL, weights
    print(f"accumulation, after one optimizer step: max |weight or momentum difference| {weights:.3g}")


@pytest.mark.slow
def test_rank_1_reports_its_own_losses_and_nothing_else(runs):
    two, (ev0, ev1) = runs["two"]
    assert ev1[0]["event"] == "heartbeat" and ev1[0][P.HANDLES] == [P.CAPABILITY_CHECKPOINT_REQUEST]
    assert {e["event"] for e in ev1} == {"heartbeat", "step"}  # no eval, no checkpoint
    steps0 = [e for e in ev0 if e["event"] == "step"]
    steps1 = [e for e in ev1 if e["event"] == "step"]
    assert [(e["epoch"], e["step"], e["lr"]) for e in steps0] == [(e["epoch"], e["step"], e["lr"]) for e in steps1]
    for e0, e1 in zip(steps0, steps1, strict=True):
        assert e1["loss"] != e0["local_loss"]  # each rank's own shard
        assert math.isclose(e0["loss"], (e0["local_loss"] + e1["loss"]) / 2, rel_tol=1e-12)  # rank 0: the mean
    # Rank 0 served the request (after step 0: a checkpoint of step 1) and wrote every checkpoint.
    ckpts = [(e["epoch"], e.get("step"), e.get("request")) for e in ev0 if e["event"] == "checkpoint"]
    assert ckpts == [(0, 1, 1), (0, None, None), (1, None, None)]
    state = _load(two, 1)
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])  # seeded per rank
    assert torch.equal(state["rng"]["torch"], state["rng_ranks"][0]["torch"])
    assert sorted(p.name for p in (two / "ckpt").iterdir()) == ["epoch-0000-step-00000001.pt", "epoch-0000.pt",
                                                                 "epoch-0001.pt"]  # fmt: skip


@pytest.mark.slow
def test_a_two_process_run_paused_mid_epoch_resumes_exactly(runs):
    two, straight = runs["two"]
    paused, first, second, ckpt = runs["paused"]
    assert (ckpt["epoch"], ckpt["step"], ckpt["request"], ckpt["reason"]) == (1, 1, 1, "preempted")
    assert "stopped at epoch 1 step 1 on request (preempted)" in runs["paused_log"]
    for r in (0, 1):  # both ranks stopped at the same step and took up exactly there
        assert _steps(first[r])[-1][:2] == (1, 0) and _steps(second[r])[0][:2] == (1, 1)
        assert _steps(first[r]) + _steps(second[r]) == _steps(straight[r])  # every step's loss and LR, per rank
    a, b = _load(two, 1), _load(paused, 1)
    assert same_training_state(a, b)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # BN statistics too
    assert a["scaler"] == b["scaler"] and a["metrics"] == b["metrics"]
    assert [e["metrics"] for e in second[0] if e["event"] == "eval"] == [e["metrics"] for e in straight[0]
                                                                        if e["event"] == "eval"]  # fmt: skip
    for r in (0, 1):  # every rank's random states: the uninterrupted run's
        assert all(torch.equal(a["rng_ranks"][r][k], b["rng_ranks"][r][k]) for k in ("torch",))


@pytest.mark.slow
def test_another_world_size_resumes_with_a_warning(runs, tmp_path, caplog):
    two = runs["two"][0]
    caplog.set_level(logging.WARNING, logger="trainer")
    sup = Supervised(checkpoint_dir=tmp_path, seed=5, load_epoch=0, start_epoch=1, epochs=1,
                     load_path=two / "ckpt" / "epoch-0000.pt", events_path=tmp_path / "events.jsonl")  # fmt: skip
    assert run(load_params(runs["params"]), sup) == {}  # nothing left to train: setup and restore only
    assert "written by 2 process(es), this attempt has 1" in caplog.text


@pytest.mark.slow
def test_a_nan_in_rank_1_ends_every_rank_at_that_step_and_names_rank_1(tmp_path, synth_root):  # noqa: F811
    fault = {"kind": "nan", "epoch": 0, "step": 2, "rank": 1}
    params = _params(synth_root, num_epoch=1, test_pr_after_epoch=5, inject_fault=fault)
    proc, (ev0, ev1) = run_torchrun(tmp_path, params)
    # Both ranks end with exit 3 at the same micro-batch (torchrun may SIGTERM the later one first: its group has
    # failed), reporting the NaN before: rank 0 the NaN mean, naming rank 1; rank 1 its own NaN loss.
    assert proc.returncode != 0 and "exitcode  : 3" in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.count("non-finite training loss nan at epoch 0 step 2") >= 1
    last0, last1 = ev0[-1], ev1[-1]
    assert (last0["event"], last0["step"], last1["event"], last1["step"]) == ("step", 2, "step", 2)
    assert math.isnan(last1["loss"])  # rank 1's own file: its NaN
    assert math.isnan(last0["loss"]) and math.isfinite(last0["local_loss"]) and last0["nonfinite_ranks"] == [1]
    assert [e["step"] for e in ev0 if e["event"] == "step"] == [0, 1, 2] == [e["step"] for e in ev1
                                                                             if e["event"] == "step"]  # fmt: skip
