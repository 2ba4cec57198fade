"""The Hugging Face `Trainer` under the supervisor (protocol mode): one callback.

    from transformers import Trainer, TrainingArguments
    from supervisor.integrations.transformers import SupervisorCallback

    sup_cb = SupervisorCallback()
    args = TrainingArguments(output_dir="out", logging_steps=1, save_steps=50, **sup_cb.training_args())
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[sup_cb])
    trainer.train(resume_from_checkpoint=sup_cb.resume_from_checkpoint(args.output_dir))

The Trainer writes each checkpoint as a folder (`<output_dir>/checkpoint-<step>`); the protocol's
checkpoint is one file. So after each save the callback packs the folder into one uncompressed tar,
written atomically at the run's checkpoint path and announced; a resume unpacks it back into
`<output_dir>/checkpoint-<step>`. Hooks, resume and limits: docs/integrations.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import secrets
import shutil
import tarfile
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from supervisor.client import CheckpointRequest, Supervised
from supervisor.durable import atomic_write
from supervisor.integrations._common import announce_fields, scalar_metrics, to_float, verified_load_path

__all__ = ["SupervisorCallback", "pack_checkpoint", "unpack_checkpoint"]

PREFIX_CHECKPOINT_DIR = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR
META_NAME = "supervisor.json"  # the first member of a packed checkpoint: global_step, seed
FOLDER_NAME = "checkpoint"  # the folder's files lie under this name in the tar
# Eval metrics that are timings, not measurements of the model.
_TIMING_SUFFIXES = ("_runtime", "_per_second", "_model_preparation_time")


class _HashingWriter(io.RawIOBase):
    """Everything written goes to `f` and into a sha256: the digest and size come without a re-read."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha256.update(view)
        self._f.write(view)
        self.size += view.nbytes
        return view.nbytes


def pack_checkpoint(folder: str | os.PathLike[str], dest: str | os.PathLike[str],
                    meta: dict[str, Any]) -> tuple[str, int]:  # fmt: skip
    """Pack `folder` (a Trainer checkpoint) into one uncompressed tar at `dest`, atomically (temp file
    beside it, fsync, rename, fsync dir). Returns its sha256 and size, hashed while writing."""
    src = Path(folder)
    hashed: list[_HashingWriter] = []

    def write(f: Any) -> None:
        w = _HashingWriter(f)
        hashed.append(w)
        with tarfile.open(fileobj=w, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            data = json.dumps(meta, sort_keys=True).encode()
            info = tarfile.TarInfo(META_NAME)
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
            tar.addfile(info, io.BytesIO(data))
            tar.add(src, arcname=FOLDER_NAME, recursive=True)

    atomic_write(dest, write)
    return hashed[-1].sha256.hexdigest(), hashed[-1].size


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The `supervisor.json` of a packed checkpoint."""
    with tarfile.open(path, mode="r:") as tar:
        member = tar.extractfile(META_NAME)
        if member is None:
            raise ValueError(f"{path}: not a packed Trainer checkpoint (no {META_NAME})")
        return json.loads(member.read())


def unpack_checkpoint(path: str | os.PathLike[str], output_dir: str | os.PathLike[str],
                      drop_rng: bool = False) -> Path:  # fmt: skip
    """Unpack a packed checkpoint into `<output_dir>/checkpoint-<global_step>` (replacing a folder of that
    name, which may be a half-written one of a killed attempt) and return that folder. The files are
    unpacked into a temp folder first and renamed into place. `drop_rng`: leave out the random states,
    so the Trainer does not restore them (a resume after a fault runs with a new seed)."""
    meta = read_meta(path)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{PREFIX_CHECKPOINT_DIR}-{int(meta['global_step'])}"
    tmp = out / f".{target.name}.restore-{secrets.token_hex(4)}"
    try:
        with tarfile.open(path, mode="r:") as tar:
            tar.extractall(tmp, filter="data")
        folder = tmp / FOLDER_NAME
        if not folder.is_dir():
            raise ValueError(f"{path}: not a packed Trainer checkpoint (no {FOLDER_NAME}/)")
        if drop_rng:
            for rng in folder.glob("rng_state*.pth"):
                rng.unlink()
        if target.exists():
            shutil.rmtree(target)
        os.replace(folder, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class SupervisorCallback(TrainerCallback):
    """Reports the steps, evaluations and checkpoints of a Hugging Face `Trainer` to the supervisor.

    - `on_log` (every `logging_steps`): a `step` event with `state.global_step` and the logged loss (the
      mean since the last log). A non-finite loss is reported and raises `NonFiniteLoss`, which ends
      `trainer.train()` and the process with an error: the watchdog names the fault `nan`. The Trainer's
      `logging_nan_inf_filter` (on by default) would hide NaN losses, so the callback turns it off at
      the start of training (`disable_nan_inf_filter=False` keeps it);
    - `on_evaluate`: an `eval` event with the numeric metrics (timings left out); a non-finite one is
      what the watchdog calls `test nan`;
    - `on_save`: packs the folder the Trainer just wrote into one tar at the run's checkpoint path
      (`checkpoint_path(step=S)` in a step run; in an epoch run the epoch's end, or `(epoch, step)` for a
      save inside an epoch) and announces it with its sha256 and size;
    - `on_step_end`: serves checkpoint requests (`control.should_save`; with `stop`, also
      `control.should_training_stop`, and no further evaluation or save that epoch), makes sure the
      run's last step is saved, and writes a heartbeat when nothing was reported for `heartbeat_s`.

    Unsupervised (no SUPERVISOR_EVENTS) the callback does nothing.
    """

    def __init__(
        self,
        sup: Supervised | None = None,
        handle_requests: bool = True,
        heartbeat_s: float = 30.0,
        metrics: Iterable[str] | None = None,
        disable_nan_inf_filter: bool = True,
    ) -> None:
        self.sup = sup if sup is not None else Supervised.from_env()
        self.handle_requests = handle_requests
        self.heartbeat_s = heartbeat_s
        self.metrics = None if metrics is None else list(metrics)
        self.disable_nan_inf_filter = disable_nan_inf_filter
        self._pending: CheckpointRequest | None = None  # a request whose save is under way
        self._stopping = False
        self._epoch_ended = False
        self._last_emit = time.monotonic()

    # -- what the script asks ---------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.sup.supervised

    def training_args(self) -> dict[str, Any]:
        """`TrainingArguments` that make the Trainer train the run's length with the attempt's seed:
        `max_steps` (step run) or `num_train_epochs` and `save_strategy="epoch"` (epoch run), `seed`,
        and `logging_nan_inf_filter=False` (a NaN loss must be seen). {} unsupervised."""
        if not self.active:
            return {}
        out: dict[str, Any] = {"seed": self.sup.seed, "logging_nan_inf_filter": False}
        if self.sup.step_run and self.sup.steps:
            out["max_steps"] = self.sup.steps
        elif self.sup.epochs:
            out.update(num_train_epochs=self.sup.epochs, save_strategy="epoch")
        return out

    def resume_from_checkpoint(self, output_dir: str | os.PathLike[str]) -> str | None:
        """The folder to pass to `trainer.train(resume_from_checkpoint=...)`: SUPERVISOR_LOAD_PATH (its
        sha256 checked, raises `ChecksumMismatch`) unpacked into `<output_dir>/checkpoint-<step>`; None on
        a fresh start. After a fault the attempt has a new seed: the checkpoint's random states are then
        left out, so the Trainer does not put the old ones back."""
        path = verified_load_path(self.sup)
        if path is None:
            return None
        seed = read_meta(path).get("seed")
        return str(unpack_checkpoint(path, output_dir, drop_rng=seed != self.sup.seed))

    # -- hooks ------------------------------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        if not self.active:
            return
        self._stopping, self._pending = False, None
        if self.disable_nan_inf_filter and args.logging_nan_inf_filter:
            args.logging_nan_inf_filter = False  # it replaces a NaN loss by the mean of the previous ones
        if state.is_world_process_zero:
            if self.handle_requests:
                self.sup.handles_requests()
            self._check_limits(args, state)
            self._mark()

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        self._epoch_ended = False

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        if not self.active:
            return
        request = None
        if self.handle_requests:
            request = self.sup.checkpoint_requested() if state.is_world_process_zero else None
            request = _broadcast(request)
        if request is not None:
            self._pending = request
            control.should_save = True
            if request.stop:
                self._stopping = True
                control.should_training_stop = True
        if self.sup.step_run and self.sup.steps and state.global_step >= self.sup.steps:
            control.should_save = True  # the run completes with the checkpoint of its last step
        if state.is_world_process_zero and time.monotonic() - self._last_emit >= self.heartbeat_s:
            self.sup.heartbeat()
            self._mark()

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        self._epoch_ended = True
        if self._stopping:  # stopped inside the epoch: neither an eval nor an epoch-end checkpoint of it
            control.should_save = False
            control.should_evaluate = False

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kw: Any):  # fmt: skip
        if not self.active or not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        loss = to_float(logs["loss"])
        if loss is None:
            return
        self._mark()
        gs = state.global_step
        if self.sup.step_run:
            self.sup.step(step=gs, loss=loss)  # raises NonFiniteLoss on NaN/inf
        else:
            epoch, done = self._position(args, state)
            self.sup.step(epoch, max(0, done - 1), loss)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: dict[str, Any] | None = None, **kw: Any):  # fmt: skip
        if not self.active or not state.is_world_process_zero or self._stopping or not metrics:
            return
        found = {k: v for k, v in scalar_metrics(metrics, self.metrics).items()
                 if k != "epoch" and not k.endswith(_TIMING_SUFFIXES)}  # fmt: skip
        if not found:
            return
        self._mark()
        if self.sup.step_run:
            self.sup.eval(found, step=state.global_step)
        else:
            self.sup.eval(self._position(args, state)[0], found)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        if not self.active:
            return
        request, self._pending = self._pending, None
        if not state.is_world_process_zero:
            return
        gs = state.global_step
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{gs}"
        if not folder.is_dir():
            raise FileNotFoundError(f"supervisor: the Trainer saved step {gs} but {folder} is not a folder")
        if self.sup.step_run:
            epoch, step = None, gs
        else:
            epoch, done = self._position(args, state)
            step = None if (self._epoch_ended and done >= self._steps_per_epoch(args, state)) else done
        path = self.sup.checkpoint_path(epoch, step) if not self.sup.step_run else self.sup.checkpoint_path(step=step)
        t0 = time.perf_counter()
        meta = {"global_step": gs, "seed": self.sup.seed, "epoch": epoch, "step": step,
                "folder": folder.name, "format": 1}  # fmt: skip
        sha256, size = pack_checkpoint(folder, path, meta)
        took = time.perf_counter() - t0
        self.sup.checkpoint_done(epoch, path, step=step, sha256=sha256, **announce_fields(request, took, took, size))
        self._mark()

    # -- internals --------------------------------------------------------------------------------

    def _mark(self) -> None:
        self._last_emit = time.monotonic()

    def _steps_per_epoch(self, args: TrainingArguments, state: TrainerState) -> int:
        epochs = self.sup.epochs or math.ceil(args.num_train_epochs)
        return max(1, state.max_steps // max(1, epochs))

    def _position(self, args: TrainingArguments, state: TrainerState) -> tuple[int, int]:
        """(epoch, optimizer steps of it done) of an epoch run: every epoch has max_steps / epochs steps."""
        spe = self._steps_per_epoch(args, state)
        gs = state.global_step
        epoch = max(0, (gs - 1) // spe)
        return epoch, gs - epoch * spe

    def _check_limits(self, args: TrainingArguments, state: TrainerState) -> None:
        epochs = self.sup.epochs
        if self.sup.step_run and self.sup.steps and state.max_steps != self.sup.steps:
            have = f"steps = {self.sup.steps} but the Trainer trains {state.max_steps} steps"
        elif not self.sup.step_run and self.sup.epochs and (args.max_steps > 0 or args.num_train_epochs != epochs):
            have = f"epochs = {epochs} but the Trainer has num_train_epochs = {args.num_train_epochs}"
            if args.max_steps > 0:
                have += f" and max_steps = {args.max_steps}"
        else:
            return
        warnings.warn(f"supervisor: the run has {have}; pass **SupervisorCallback.training_args()", stacklevel=2)


def _broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank of an initialised process group (saving is collective: every rank
    must decide alike); `value` itself in a single process."""
    with contextlib.suppress(ImportError):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            box = [value]
            dist.broadcast_object_list(box, src=0)
            return box[0]
    return value
