"""One training attempt: build everything from (params, seed), resume, train, evaluate, checkpoint.

Exact resume rests on three facts: the LR is a pure function of the position in training
(trainer.schedule), each epoch's batches and augmentation are a pure function of (seed, epoch)
(trainer.data.EpochBatchSampler), and the checkpoint holds every other piece of state (model with
BN statistics, optimizer momentum, GradScaler, RNG states; mid-epoch also the epoch's running
accumulators). It holds only tensors and primitive containers, so it loads with
torch.load(weights_only=True).

Checkpoints are written in the background (supervisor.client.Supervised.save_checkpoint): training
goes on once the state is copied to host memory. A checkpoint request from the watchdog (or a
SIGTERM) is served at the next optimizer step with a mid-epoch checkpoint; the next attempt starts
exactly there (SUPERVISOR_START_STEP).

Under torchrun (WORLD_SIZE > 1) the attempt trains data-parallel (DistributedDataParallel; gloo on the CPU,
NCCL on cuda:LOCAL_RANK): `batch_size_train` is the global micro-batch, split evenly over the processes; each
process takes its slice of the same global batches (trainer.data.EpochBatchSampler), the evaluation is
sharded by batch and gathered on rank 0, and rank 0 writes the checkpoints, which hold every rank's random
states. docs/trainer.md, "Several processes".
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from supervisor.client import CheckpointRequest, NonFiniteLoss, Supervised, capture_rng, restore_rng
from trainer import faults
from trainer.data import (
    DataError,
    EpochBatchSampler,
    EvalBatchSampler,
    EvalDataset,
    TrainDataset,
    VOCIndex,
    collate_eval,
    collate_train,
    derive_seed,
    find_devkit,
    multiscale_sizes,
    read_voc,
)
from trainer.evaluate import evaluate_detections, postprocess
from trainer.loss import COMPONENTS, yolo_loss
from trainer.model import Detector, level_anchors
from trainer.params import Params
from trainer.schedule import LRSchedule, step_position
from trainer.synth import ensure_synthetic

log = logging.getLogger("trainer")

# 2: RNG states of Python, NumPy, torch and CUDA (client.capture_rng); mid-epoch checkpoints add
# "step" and "progress". Format 1 (torch/CUDA RNG only, end of epoch only) still loads.
CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)
HEARTBEAT_EVERY_S = 5.0


@dataclass(frozen=True)
class Group:
    """The processes of a data-parallel attempt (one process: rank 0 of 1, no process group)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns: bool = False  # this attempt initialized the process group (and destroys it at the end)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


class Stopped(Exception):
    """A stop request was served: the checkpoint is written and announced, the attempt ends (exit 0)."""

    def __init__(self, epoch: int, step: int | None, reason: str) -> None:
        super().__init__(epoch, step, reason)
        self.epoch, self.step, self.reason = epoch, step, reason


@dataclass
class Attempt:
    """Everything one attempt trains with; built by `setup`."""

    params: Params
    sup: Supervised
    device: torch.device
    model: Detector
    optimizer: torch.optim.SGD
    scaler: torch.amp.GradScaler
    schedule: LRSchedule
    anchors: torch.Tensor
    train_index: VOCIndex
    test_index: VOCIndex
    epochs: int
    micro_batch: int
    accum: int
    autocast: bool
    channels_last: bool
    history: dict[str, Any] = field(default_factory=dict)
    poisoned_grads: bool = False  # FAULT INJECTION amp_overflow fired in this attempt
    resume_progress: dict[str, Any] | None = None  # the running epoch's accumulators of a mid-epoch checkpoint
    eval_started: bool = False
    group: Group = field(default_factory=Group)
    net: torch.nn.Module | None = None  # the DistributedDataParallel wrapper (several processes)
    net_frozen: bool | None = None  # the freeze state `net` was built for


@dataclass
class SkipCounter:
    """Counts optimizer steps the GradScaler skipped in a row (its scale fell at every update).

    Under AMP a NaN/inf gradient does not surface in the loss: the scaler silently skips the step
    and halves its scale. A run of `limit` skips in a row that has driven the scale below
    `min_scale` is therefore reported as a NaN. The floor matters: at the start of training the
    scaler legitimately backs off from 65536 for several steps in a row (seen on an H200 at 416 px:
    8 skips and more before the first real step), and gradients that overflow float16 even at scale 1 are
    not a warm-up (fairseq's `min_loss_scale` rule).
    """

    limit: int
    min_scale: float = 1.0
    run: int = 0

    def update(self, scale_before: float, scale_after: float) -> bool:
        """Record one step; True when the run of skipped steps reached the limit below the floor."""
        self.run = self.run + 1 if scale_after < scale_before else 0
        return self.run >= self.limit and scale_after < self.min_scale


def pick_device(params: Params, group: Group | None = None) -> torch.device:
    if params.device == "cuda" or (params.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", group.local_rank) if group is not None and group.active else torch.device("cuda")
    return torch.device("cpu")


def start_group(params: Params, sup: Supervised) -> Group:
    """Join the process group of a torchrun attempt (WORLD_SIZE > 1): gloo on the CPU, NCCL on cuda:LOCAL_RANK.
    The batch plan is checked first, so a global batch that does not split fails before the rendezvous."""
    if sup.world_size <= 1:
        return Group()
    params.batch_plan(sup.batch_divisor, sup.world_size)  # ParamsError in one line
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK") or sup.rank)
    group = Group(sup.rank, sup.world_size, local)
    device = pick_device(params, group)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():  # a caller that made its own group keeps it
        if dist.get_world_size() != sup.world_size or dist.get_rank() != sup.rank:
            raise DataError(f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}, "
                            f"but RANK/WORLD_SIZE say {sup.rank} of {sup.world_size}")  # fmt: skip
        return group
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=sup.rank, world_size=sup.world_size)
    log.info("data-parallel: rank %d of %d (local rank %d) on %s", sup.rank, sup.world_size, local, device)
    return Group(sup.rank, sup.world_size, local, owns=True)


def end_group(group: Group) -> None:
    if group.owns:
        import torch.distributed as dist

        with contextlib.suppress(Exception):  # ending anyway: a broken group must not hide the real error
            dist.destroy_process_group()


def _comm_device(att: Attempt) -> torch.device:
    """Where small collective tensors live: the process's CUDA device for NCCL, the CPU for gloo."""
    return att.device if att.device.type == "cuda" else torch.device("cpu")


def seed_rank(seed: int, rank: int) -> None:
    """Several processes: each rank's global random generators (torch, Python, NumPy) get their own stream,
    seeded by (seed, rank). The reference trainer's augmentation does not draw from them (its randomness
    travels with each sample's key), but anything added that does (dropout, ...) differs per rank."""
    s = derive_seed(seed, 0xD15, rank)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


def resolve_epochs(params: Params, sup: Supervised) -> int:
    """SUPERVISOR_EPOCHS wins over num_epoch; a contradiction is reported, not ignored."""
    if sup.epochs is None:
        return params.num_epoch
    if sup.epochs != params.num_epoch:
        log.warning(
            "num_epoch = %d contradicts the run's epochs = %d (SUPERVISOR_EPOCHS): training %d epochs",
            params.num_epoch, sup.epochs, sup.epochs,
        )  # fmt: skip
    return sup.epochs


def load_data(params: Params) -> tuple[VOCIndex, VOCIndex]:
    root = Path(params.data_root).expanduser()
    devkit = find_devkit(root)
    if devkit is None and params.synthetic_images > 0:
        size = params.synthetic_size or params.input_size
        devkit = ensure_synthetic(root, params.synthetic_images, size, params.synthetic_seed)
    if devkit is None:
        raise DataError(
            f"no VOCdevkit under data_root {str(root)!r}: point data_root at the folder holding VOCdevkit/ "
            "or set synthetic_images to generate a synthetic set there"
        )
    classes = params.class_names
    return read_voc(devkit, params.train_sets, classes), read_voc(devkit, params.test_sets, classes)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on convolution weights only; BN parameters and biases are not decayed."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def setup(params: Params, sup: Supervised, group: Group | None = None) -> Attempt:
    """Build the attempt; load the resume checkpoint when SUPERVISOR_LOAD_EPOCH >= 0."""
    group = group or Group()
    device = pick_device(params, group)
    epochs = resolve_epochs(params, sup)
    micro, accum = params.batch_plan(sup.batch_divisor, group.world)
    train_index, test_index = load_data(params)
    if len(train_index) < group.world:
        raise DataError(f"{len(train_index)} training images cannot be shared by {group.world} processes")
    log.info(
        "data: %d training images, %d test images, %d classes",
        len(train_index),
        len(test_index),
        len(params.class_names),
    )
    torch.manual_seed(derive_seed(sup.seed, 0x5EED))
    resuming = sup.load_epoch >= 0
    model = Detector(len(params.class_names), params.neck_channels, pretrained=params.pretrained and not resuming)
    if group.active:
        seed_rank(sup.seed, group.rank)
        if params.sync_bn and device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same state_dict keys as BatchNorm
        elif params.sync_bn and group.main:
            log.warning("sync_bn needs CUDA (SyncBatchNorm): BatchNorm statistics stay per process on the CPU")
    channels_last = params.channels_last if params.channels_last is not None else device.type == "cuda"
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = torch.optim.SGD(param_groups(model, params.weight_decay), lr=0.0, momentum=params.momentum)
    autocast = params.mix_precision and device.type == "cuda"
    if params.mix_precision and not autocast:
        log.info("mix_precision on the CPU: float32 compute, GradScaler still active (and its NaN guard)")
    scaler = torch.amp.GradScaler(device.type, enabled=params.mix_precision)
    if sup.batch_divisor > 1:
        log.info("SUPERVISOR_BATCH_DIVISOR=%d: micro-batch %d x %d accumulation steps", sup.batch_divisor, micro, accum)
    if group.active:
        log.info("global micro-batch %d: %d per process x %d processes, %d accumulation steps",
                 micro * group.world, micro, group.world, accum)  # fmt: skip
    att = Attempt(
        params=params, sup=sup, device=device, model=model, optimizer=optimizer, scaler=scaler,
        schedule=LRSchedule.from_params(params), anchors=level_anchors(params.anchors).to(device),
        train_index=train_index, test_index=test_index,
        epochs=epochs, micro_batch=micro, accum=accum, autocast=autocast, channels_last=channels_last, group=group,
    )  # fmt: skip
    if resuming:
        restore(att, sup.load_checkpoint(map_location="cpu"))
    return att


def checkpoint_state(
    att: Attempt, epoch: int, metrics: dict[str, Any], progress: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The checkpoint of `epoch` (its end), or with `progress` of `progress["step"]` optimizer steps into
    it: tensors and primitive containers only. The tensors are the live ones; save_checkpoint copies them.

    Several processes: a collective (every rank calls it at the same point); the random states of every rank
    are gathered into rank 0's state as `rng_ranks` (`rng` stays rank 0's)."""
    rng = capture_rng()
    ranks = _gather(att, rng)
    state = {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "seed": att.sup.seed,
        "model": att.model.state_dict(),
        "optimizer": att.optimizer.state_dict(),
        "scaler": att.scaler.state_dict(),
        "scheduler": att.schedule.state_dict(),
        "rng": rng,
        "metrics": metrics,
        "params": att.params.model_dump(mode="json"),
        "world_size": att.group.world,
    }
    if att.group.active:
        state["rng_ranks"] = ranks
    if progress is not None:
        state["step"] = progress["step"]
        state["progress"] = progress
    return state


def _gather(att: Attempt, obj: Any) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere); [obj] in one process."""
    if not att.group.active:
        return [obj]
    import torch.distributed as dist

    out: list[Any] | None = [None] * att.group.world if att.group.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def _broadcast(att: Attempt, obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not att.group.active:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def restore(att: Attempt, state: dict[str, Any]) -> None:
    """Load model, optimizer, GradScaler, (for the same seed) RNG states and, from a mid-epoch
    checkpoint, the running epoch's accumulators."""
    sup = att.sup
    if state.get("format") not in READABLE_FORMATS:
        raise DataError(
            f"checkpoint format {state.get('format')!r} is not one of {READABLE_FORMATS}: it was not written by "
            "this trainer"
        )
    if state["epoch"] != sup.load_epoch:
        log.warning("checkpoint says epoch %s but SUPERVISOR_LOAD_EPOCH is %d", state["epoch"], sup.load_epoch)
    step = state.get("step")  # None: the end of the epoch
    if step != (sup.start_step or None):
        held = f"{step} steps into epoch {state['epoch']}" if step else f"the end of epoch {state['epoch']}"
        raise DataError(f"the checkpoint holds {held} but SUPERVISOR_START_STEP is {sup.start_step}")
    att.model.load_state_dict(state["model"])
    att.optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        att.scaler.load_state_dict(state["scaler"])
    saved_world = int(state.get("world_size", 1))
    if saved_world != att.group.world and att.group.main:
        log.warning(
            "the checkpoint was written by %d process(es), this attempt has %d: the same global batches, data "
            "order and LR schedule follow, but not bit for bit (BatchNorm statistics are per process; the random "
            "states of the ranks the checkpoint lacks are seeded afresh)", saved_world, att.group.world,
        )  # fmt: skip
    if state.get("seed") == sup.seed:
        ranks = state.get("rng_ranks") or [state["rng"]]
        if att.group.rank < len(ranks):
            restore_rng(ranks[att.group.rank])
    elif step:
        log.warning(
            "resuming %d steps into epoch %d with seed %d, not the checkpoint's %s: the rest of the epoch "
            "follows another order (not an exact resume)", step, state["epoch"], sup.seed, state.get("seed"),
        )  # fmt: skip
    att.history = dict(state.get("metrics") or {})
    att.resume_progress = dict(state["progress"]) if step else None
    where = f"epoch {state['epoch']} step {step}" if step else f"epoch {state['epoch']}"
    log.info("resumed from the checkpoint of %s (seed %d -> %d)", where, state.get("seed", -1), sup.seed)


def _progress(iterable: Any, total: int, desc: str, show: bool = True) -> Any:
    """A tqdm bar on a terminal or in a notebook; the iterable unchanged otherwise (and on ranks other than 0)."""
    interactive = sys.stdout.isatty() or "ipykernel" in sys.modules
    if not interactive or not show:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def _loaders(att: Attempt) -> tuple[EpochBatchSampler, DataLoader, DataLoader]:
    p = att.params
    g = att.group
    sampler = EpochBatchSampler(
        len(att.train_index), att.micro_batch * g.world, att.sup.seed, p.input_size,
        multiscale_sizes(p.output_scale_S), sizes_every=att.accum, rank=g.rank, world=g.world,
    )  # fmt: skip
    workers = p.num_workers
    common: dict[str, Any] = {"num_workers": workers, "pin_memory": att.device.type == "cuda"}
    if workers > 0:
        common.update(persistent_workers=True, prefetch_factor=2)
    train = DataLoader(
        TrainDataset(att.train_index, p.random_ratio),
        batch_sampler=sampler,
        collate_fn=collate_train,
        generator=torch.Generator().manual_seed(0),
        **common,
    )
    n_test = len(att.test_index)
    n_batches = max(1, math.ceil(p.test_pr_batch_ratio * math.ceil(n_test / p.batch_size_test)))
    test = DataLoader(
        EvalDataset(att.test_index, p.input_size),
        batch_sampler=EvalBatchSampler(n_test, p.batch_size_test, n_batches, g.rank, g.world),
        collate_fn=collate_eval,
        generator=torch.Generator().manual_seed(0),
        **common,
    )
    return sampler, train, test


def set_frozen(model: Detector, frozen: bool) -> None:
    """freeze_epoch: the backbone's weights and BN statistics stay fixed while frozen."""
    for prm in model.backbone.parameters():
        prm.requires_grad_(not frozen)
    if frozen:
        model.backbone.eval()


def _net(att: Attempt, frozen: bool) -> torch.nn.Module:
    """What the training step calls: the model, or with several processes its DistributedDataParallel wrapper.
    DDP reduces the gradients of the parameters that required them when it was built, so it is rebuilt when
    freeze_epoch ends (the old one is collected first: its autograd hooks go with it)."""
    if not att.group.active:
        return att.model
    if att.net is None or att.net_frozen != frozen:
        from torch.nn.parallel import DistributedDataParallel

        att.net = None
        gc.collect()
        ids = [att.device.index] if att.device.type == "cuda" else None
        # DDP's default (broadcast_buffers, forward_sync_buffers in torch 2.14+): every forward starts from rank
        # 0's BN running statistics, the ones checkpointed.
        att.net = DistributedDataParallel(att.model, device_ids=ids)
        att.net_frozen = frozen
    return att.net


def _sync_buffers(att: Attempt) -> None:
    """Rank 0's buffers (BN running statistics) on every rank: each rank updated its own in the last forward."""
    if att.group.active:
        import torch.distributed as dist

        for buf in att.model.buffers():
            dist.broadcast(buf, 0)


def _reduce_step(att: Attempt, value: float, parts: dict[str, float]) -> tuple[float, dict[str, float], list[int]]:
    """Several processes: the global mean of the micro-batch's loss and loss components (the processes' batches
    are equal), and the ranks whose own loss is not finite; one all-reduce of 6 + world float64s."""
    g = att.group
    if not g.active:
        return value, parts, [] if math.isfinite(value) else [0]
    import torch.distributed as dist

    keys = [k for k in COMPONENTS if k in parts] + [k for k in parts if k not in COMPONENTS]
    flags = [0.0] * g.world
    flags[g.rank] = 0.0 if math.isfinite(value) else 1.0
    t = torch.tensor([value, *(parts[k] for k in keys)], dtype=torch.float64) / g.world
    t = torch.cat([t, torch.tensor(flags, dtype=torch.float64)]).to(_comm_device(att))
    dist.all_reduce(t)
    out = t.tolist()
    n = 1 + len(keys)
    return out[0], dict(zip(keys, out[1:n], strict=True)), [r for r, f in enumerate(out[n:]) if f]


def _report_nonfinite(att: Attempt, epoch: int, step: int, local: float, mean: float, ranks: list[int]) -> None:
    """A non-finite loss in some process ends every process at the same micro-batch (before any of them enters
    the backward's collectives). Rank 0 reports the global mean (non-finite) with its own `local_loss` and the
    `nonfinite_ranks`; every other rank its own loss in its own file. Raises NonFiniteLoss."""
    sup = att.sup
    if not att.group.active:
        sup.step(epoch, step, local)
    elif att.group.main:
        sup.step(epoch, step, mean, local_loss=local, nonfinite_ranks=ranks)
    else:
        sup.step(epoch, step, local)
    raise NonFiniteLoss(f"non-finite training loss in rank(s) {ranks} at epoch {epoch} step {step}")


def train_epoch(
    att: Attempt, loader: DataLoader, sampler: EpochBatchSampler, epoch: int, resume: dict[str, Any] | None = None
) -> dict[str, float]:
    """One epoch of optimizer steps; reports every step; raises NonFiniteLoss on NaN/inf.

    After every optimizer step a pending checkpoint request is served with a mid-epoch checkpoint;
    a stop request then ends the epoch with `Stopped`. `resume` (the "progress" of a mid-epoch
    checkpoint) starts the epoch after its first `resume["step"]` optimizer steps, with the running
    sums as they were, so the epoch's reported loss is that of an uninterrupted epoch.
    """
    p, sup, model, opt, scaler = att.params, att.sup, att.model, att.optimizer, att.scaler
    group = att.group
    model.train()
    frozen = epoch < p.freeze_epoch
    set_frozen(model, frozen)
    net = _net(att, frozen)
    resume = resume or {}
    micro_total = sampler.total
    steps = math.ceil(micro_total / att.accum)
    # The micro-batches of the steps already trained are skipped in the sampler: no image is loaded for them.
    skip = min(int(resume.get("step", 0)) * att.accum, micro_total)
    sampler.set_epoch(epoch, multiscale=epoch < p.multi_scale_epoch, skip=skip)
    fmt = torch.channels_last if att.channels_last else torch.contiguous_format
    params_list = [q for g in opt.param_groups for q in g["params"]]
    loss_sum, images = float(resume.get("loss_sum", 0.0)), int(resume.get("images", 0))
    t0 = time.perf_counter() - float(resume.get("seconds", 0.0))
    skips = SkipCounter(p.amp_skip_limit, p.amp_min_scale, run=int(resume.get("amp_skip_run", 0)))
    comp: dict[str, float] = dict(resume.get("comp", {}))
    # step_loss: the global mean (what rank 0 reports and sums); local_loss: this process's own (other ranks).
    step_loss, local_loss, lr = 0.0, 0.0, float(resume.get("lr", 0.0))
    opt.zero_grad(set_to_none=True)
    for mb, (imgs, gt) in enumerate(_progress(loader, len(sampler), f"epoch {epoch}", group.main), start=skip):
        step, first = divmod(mb, att.accum)
        first = first == 0
        if first:
            lr = att.schedule.lr_at(step_position(epoch, step, steps))
            for g in opt.param_groups:
                g["lr"] = lr
            step_loss = local_loss = 0.0
            kind = faults.due(p.inject_fault, sup.attempt, epoch, step, group.rank)
            if kind == "amp_overflow":
                log.warning("FAULT INJECTION (on purpose, inject_fault): every gradient from now on is infinite")
                att.poisoned_grads = True
            elif kind not in (None, "nan"):
                faults.fire(kind, att.device)
        last = (mb + 1) % att.accum == 0 or mb + 1 == micro_total
        # Several processes: gradients are all-reduced at the last micro-batch of a step only.
        no_sync = net.no_sync() if group.active and not last else contextlib.nullcontext()
        x = imgs.to(att.device, non_blocking=True).float().div_(255.0).contiguous(memory_format=fmt)
        with no_sync:
            with torch.autocast(att.device.type, dtype=torch.float16, enabled=att.autocast):
                outputs = net(x)
            loss, parts = yolo_loss(outputs, gt, att.anchors, att.params, epoch)
            if first and kind == "nan":
                loss = faults.poison_loss(loss)
            value = float(loss.detach())
            mean, parts, bad = _reduce_step(att, value, parts)
            for k, v in parts.items():
                comp[k] = comp.get(k, 0.0) + v / micro_total
            if not math.isfinite(mean):
                _report_nonfinite(att, epoch, step, value, mean, bad)  # reports it and raises NonFiniteLoss
            scaler.scale(loss / att.accum).backward()
        step_loss += mean / att.accum
        local_loss += value / att.accum
        images += imgs.shape[0] * group.world
        if last:
            if att.poisoned_grads:
                faults.poison_grads(params_list)
            if p.clip_max_norm:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params_list, p.clip_max_norm)
            before = scaler.get_scale() if scaler.is_enabled() else 0.0
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            if scaler.is_enabled() and skips.update(before, scaler.get_scale()):
                log.error("GradScaler skipped %d optimizer steps in a row, scale now %g: the gradients are not finite",
                          skips.run, scaler.get_scale())
                sup.step(epoch, step, float("nan"), amp_skipped_steps=skips.run)
            per_step = att.micro_batch * group.world * att.accum  # images of the whole group (status: img/s)
            if not group.active:
                sup.step(epoch, step, step_loss, lr=lr, batch_size=per_step)
            elif group.main:
                sup.step(epoch, step, step_loss, lr=lr, local_loss=local_loss, batch_size=per_step)
            else:
                sup.step(epoch, step, local_loss, lr=lr)
            loss_sum += step_loss
            request = sup.checkpoint_requested()  # several processes: the same answer on every rank
            if request is not None:  # served at once: the step numbers of the request and the checkpoint match
                progress = {
                    "step": step + 1, "loss_sum": loss_sum, "images": images, "comp": dict(comp),
                    "amp_skip_run": skips.run, "lr": lr, "seconds": time.perf_counter() - t0,
                }  # fmt: skip
                serve(att, epoch, request, dict(att.history), progress)
    seconds = time.perf_counter() - t0
    parts = " ".join(f"{k} {v:.3g}" for k, v in comp.items())
    return {
        "loss": loss_sum / max(1, steps),
        "lr": lr,
        "img_s": images / max(seconds, 1e-9),
        "seconds": seconds,
        "parts": parts,
    }


def serve(
    att: Attempt, epoch: int, request: CheckpointRequest, metrics: dict[str, Any], progress: dict[str, Any] | None
) -> None:
    """Save the checkpoint that serves `request` (mid-epoch with `progress`); on a stop request wait
    until it is written and announced, then raise Stopped."""
    sup = att.sup
    step = progress["step"] if progress is not None else None
    sup.save_checkpoint(checkpoint_state(att, epoch, metrics, progress), epoch, step=step, request=request)
    if request.stop:
        sup.wait()
        raise Stopped(epoch, step, request.reason)


@torch.no_grad()
def evaluate(att: Attempt, loader: DataLoader, epoch: int) -> dict[str, Any]:
    """Eval loss, AP50 and VOCmAP over the first test_pr_batch_ratio of the test batches.

    Several processes: every rank evaluates its share of the batches (trainer.data.EvalBatchSampler) with rank
    0's weights and BN statistics; rank 0 gathers the per-batch results, puts them in batch order and computes
    the metrics exactly as one process would; every rank returns them."""
    p, sup, model = att.params, att.sup, att.model
    model.eval()
    _sync_buffers(att)
    if p.num_workers > 0 and not att.eval_started:
        sup.wait()  # the eval workers are forked now: not while a checkpoint thread is writing
    att.eval_started = True
    sampler: EvalBatchSampler = loader.batch_sampler
    n_batches = max(1, sampler.batches)
    results: list[tuple[int, list[dict[str, Any]], list[int], float]] = []  # (batch, detections, images, loss)
    last_beat = time.monotonic()
    fmt = torch.channels_last if att.channels_last else torch.contiguous_format
    batches = zip(sampler.numbers(), loader, strict=True)
    for b, (imgs, gt, idxs, boxes_meta) in _progress(batches, len(sampler), f"eval {epoch}", att.group.main):
        x = imgs.to(att.device, non_blocking=True).float().div_(255.0).contiguous(memory_format=fmt)
        with torch.autocast(att.device.type, dtype=torch.float16, enabled=att.autocast):
            outputs = model(x)
        loss, _ = yolo_loss(outputs, gt, att.anchors, att.params, epoch)
        out = postprocess(
            outputs, att.anchors, (x.shape[2], x.shape[3]), p.conf_thres, p.conf_ratio_thres, p.nms_thres, p.max_det
        )
        dets: list[dict[str, Any]] = []
        for i, res, (scale, px, py) in zip(idxs, out, boxes_meta, strict=True):
            h, w = (int(v) for v in att.test_index.sizes[i])
            bx = res["boxes"].cpu().double()
            bx[:, 0::2] = ((bx[:, 0::2] - px) / scale).clamp(0, w)
            bx[:, 1::2] = ((bx[:, 1::2] - py) / scale).clamp(0, h)
            bx[:, 2:] -= 1.0  # continuous -> VOC pixel-inclusive
            for box, s, lab in zip(bx.tolist(), res["scores"].tolist(), res["labels"].tolist(), strict=True):
                dets.append({"image_id": i, "label": lab, "score": s, "box": box})
        results.append((b, dets, list(idxs), float(loss)))
        if time.monotonic() - last_beat > HEARTBEAT_EVERY_S:
            sup.heartbeat(epoch=epoch, phase="eval", batch=b)
            last_beat = time.monotonic()
    gathered = _gather(att, results)
    metrics = None
    if gathered is not None:  # rank 0 (or the one process): the batches in order, as one process saw them
        merged = sorted((r for part in gathered for r in part), key=lambda r: r[0])
        metrics = _metrics(att, merged, n_batches)
    return _broadcast(att, metrics)


def _metrics(att: Attempt, results: list[tuple[int, list[dict[str, Any]], list[int], float]], n_batches: int
             ) -> dict[str, Any]:  # fmt: skip
    dets = [d for _, batch_dets, _, _ in results for d in batch_dets]
    loss_sum = 0.0
    for *_, loss in results:
        loss_sum += loss
    annotations = []
    for i in (i for _, _, seen, _ in results for i in seen):
        boxes, labels, diff = att.test_index.objects(i)
        for box, lab, d in zip(boxes.tolist(), labels.tolist(), diff.tolist(), strict=True):
            annotations.append(
                {"image_id": i, "label": lab, "box": [box[0], box[1], box[2] - 1, box[3] - 1], "difficult": d}
            )
    res = evaluate_detections(dets, annotations)
    names = att.params.class_names
    per_class = {names[int(k)]: v["AP50"] for k, v in res["per_class"].items()}
    return {"AP50": res["AP50"], "VOCmAP": res["VOCmAP"], "loss": loss_sum / n_batches, "per_class": per_class}


def run(params: Params, sup: Supervised) -> dict[str, Any]:
    """Train epochs start_epoch .. epochs-1; returns the metrics of the last epoch, or
    {"stopped": {"epoch", "step", "reason"}} when a stop request (or SIGTERM) ended the attempt."""
    if sup.events_path is not None:
        sup.events_path.parent.mkdir(parents=True, exist_ok=True)
    if sup.start_step > 0 and sup.start_epoch != sup.load_epoch:
        raise DataError(
            f"SUPERVISOR_START_STEP={sup.start_step} resumes inside epoch SUPERVISOR_LOAD_EPOCH={sup.load_epoch}, "
            f"but SUPERVISOR_START_EPOCH is {sup.start_epoch}"
        )
    in_main = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = sup.install_sigterm_handler() if in_main else None
    sup.handles_requests()
    group = Group()
    try:
        group = start_group(params, sup)
        with sup:  # leaving it waits for the last background checkpoint (and raises its error)
            return _train(params, sup, group)
    except Stopped as stop:
        where = f"epoch {stop.epoch} step {stop.step}" if stop.step is not None else f"the end of epoch {stop.epoch}"
        log.info("stopped at %s on request (%s)", where, stop.reason)
        return {"stopped": {"epoch": stop.epoch, "step": stop.step, "reason": stop.reason}}
    finally:
        end_group(group)
        if in_main:  # a caller that runs several attempts in one process gets its handler back
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _train(params: Params, sup: Supervised, group: Group) -> dict[str, Any]:
    att = setup(params, sup, group)
    start = sup.start_epoch
    log.info(
        "training epochs %d..%d on %s, seed %d, attempt %d", start, att.epochs - 1, att.device, sup.seed, sup.attempt
    )
    if att.schedule.length < att.epochs:
        log.warning(
            "the LR schedule ends at epoch %g (LR 0 afterwards) but the run has %d epochs",
            att.schedule.length,
            att.epochs,
        )
    sampler, train_loader, test_loader = _loaders(att)
    last: dict[str, Any] = {}
    for epoch in range(start, att.epochs):
        resume, att.resume_progress = att.resume_progress, None
        stats = train_epoch(att, train_loader, sampler, epoch, resume)
        metrics: dict[str, Any] = {"train_loss": stats["loss"]}
        line = (
            f"epoch {epoch}/{att.epochs - 1} loss {stats['loss']:.4f} lr {stats['lr']:.5f} "
            f"({stats['parts']}) {stats['img_s']:.1f} img/s {stats['seconds']:.1f}s"
        )
        if epoch >= params.test_pr_after_epoch:
            ev = evaluate(att, test_loader, epoch)
            sup.eval(epoch, {"AP50": ev["AP50"], "VOCmAP": ev["VOCmAP"], "loss": ev["loss"]})
            metrics.update(ev)
            line += f" | AP50 {ev['AP50']:.4f} VOCmAP {ev['VOCmAP']:.4f} eval loss {ev['loss']:.4f}"
        if group.main:
            log.info(line)
        att.history[str(epoch)] = {k: v for k, v in metrics.items() if k != "per_class"}
        last = metrics
        state_metrics = {**att.history, "last": metrics}
        # A request that came during the eval is served by this checkpoint; a stop after the last
        # epoch changes nothing (the run is complete).
        request = sup.checkpoint_requested()
        if request is not None and epoch + 1 < att.epochs:
            serve(att, epoch, request, state_metrics, None)
        else:
            sup.save_checkpoint(checkpoint_state(att, epoch, state_metrics), epoch, request=request)
    return last
