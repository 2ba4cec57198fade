"""PyTorch Lightning under the supervisor (protocol mode): one callback.

    import lightning.pytorch as pl
    from supervisor.integrations.lightning import SupervisorCallback

    sup_cb = SupervisorCallback(every_n_steps=100)       # every_n_steps: periodic saves of a step run
    sup_cb.seed_everything()                             # SUPERVISOR_SEED (a new one after each fault)
    trainer = pl.Trainer(callbacks=[sup_cb], **sup_cb.trainer_limits(), enable_checkpointing=False)
    trainer.fit(model, datamodule, ckpt_path=sup_cb.ckpt_path())   # None on a fresh start

What each hook does, how resume works and the limits: docs/integrations.md.
"""

from __future__ import annotations

import math
import secrets
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from supervisor.client import CheckpointRequest, Supervised
from supervisor.integrations._common import (
    announce_fields,
    place,
    scalar_metrics,
    temp_name,
    to_float,
    verified_load_path,
)

__all__ = ["SupervisorCallback"]


class SupervisorCallback(Callback):
    """Reports steps, evaluations and checkpoints of a Lightning `Trainer.fit` to the supervisor.

    - every optimizer step: a `step` event (loss from the `training_step` output, else `loss_key` or
      `train_loss`/`loss` in `trainer.callback_metrics`); a non-finite loss (checked on every batch,
      also those that only accumulate) is reported and raises `NonFiniteLoss`, which ends `fit` and the
      process with an error: the watchdog names the fault `nan` from the event;
    - after each validation (not the sanity check): an `eval` event with the scalar metrics the
      validation logged (or those of `trainer.callback_metrics` named in `metrics`); a non-finite one is
      what the watchdog calls `test nan`;
    - checkpoints, written by `trainer.save_checkpoint` to a temp name beside the final one, fsynced,
      renamed, then announced: epoch run, at the end of every epoch (`on_train_epoch_end`, after the
      epoch's validation, where `ModelCheckpoint(save_on_train_epoch_end=True)` saves); step run, every
      `every_n_steps` optimizer steps and at the run's last step (`on_train_batch_end`, where
      `ModelCheckpoint(every_n_train_steps=...)` saves). `every_n_steps` in an epoch run adds mid-epoch
      checkpoints;
    - checkpoint requests (declared at the start of fit): served after the next optimizer step with a
      checkpoint announced with the request's id; a stop request then sets `trainer.should_stop`, so
      `fit` returns after that batch and the script can exit 0.

    Unsupervised (no SUPERVISOR_EVENTS) the callback does nothing, so the same script runs by hand.
    """

    def __init__(
        self,
        sup: Supervised | None = None,
        every_n_steps: int | None = None,
        loss_key: str | None = None,
        metrics: Iterable[str] | None = None,
        handle_requests: bool = True,
    ) -> None:
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, not {every_n_steps}")
        self.sup = sup if sup is not None else Supervised.from_env()
        self.every_n_steps = every_n_steps
        self.loss_key = loss_key
        self.metrics = None if metrics is None else list(metrics)
        self.handle_requests = handle_requests
        self._last_step = -1  # the global step last reported
        self._stopping = False  # a stop request was served: no more evals or epoch-end checkpoints
        self._saved: tuple[int | None, int | None] | None = None  # (epoch, step) of the last save

    # -- what the script asks ---------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.sup.supervised

    def ckpt_path(self) -> str | None:
        """The checkpoint to pass to `trainer.fit(..., ckpt_path=...)`: SUPERVISOR_LOAD_PATH, its sha256
        checked (raises `ChecksumMismatch`); None on a fresh start. Lightning restores the weights, the
        optimizer, the schedulers, the epoch and the global step from it."""
        path = verified_load_path(self.sup)
        return None if path is None else str(path)

    def seed_everything(self, workers: bool = True) -> int:
        """`lightning.pytorch.seed_everything(SUPERVISOR_SEED)`: call it before building the model and the
        data. The supervisor gives a new seed after a fault and the same one after a pause."""
        return pl.seed_everything(self.sup.seed, workers=workers)

    def trainer_limits(self) -> dict[str, Any]:
        """`Trainer` arguments that make Lightning train exactly the run's length: `max_epochs` in an
        epoch run, `max_steps` (and no epoch limit) in a step run; {} unsupervised."""
        if self.sup.step_run and self.sup.steps:
            return {"max_steps": self.sup.steps, "max_epochs": -1}
        if self.sup.epochs:
            return {"max_epochs": self.sup.epochs}
        return {}

    # -- hooks ------------------------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Called once the resume checkpoint is restored: global_step and current_epoch are the resumed ones.
        if not self.active:
            return
        self._last_step = trainer.global_step
        self._stopping = False
        if self.handle_requests and trainer.is_global_zero:
            self.sup.handles_requests()
        if trainer.is_global_zero:
            self._check_limits(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.active:
            return
        loss = self._loss(trainer, outputs)
        gs = trainer.global_step
        stepped = gs != self._last_step
        if not stepped and (loss is None or math.isfinite(loss)):
            return  # accumulating gradients: no optimizer step yet
        self._last_step = gs
        if trainer.is_global_zero:
            self._report_step(trainer, gs, loss)  # raises NonFiniteLoss on NaN/inf
        request = None
        if self.handle_requests:
            request = self.sup.checkpoint_requested() if trainer.is_global_zero else None
            if trainer.world_size > 1:  # saving is collective: every rank takes rank 0's decision
                request = trainer.strategy.broadcast(request, src=0)
        periodic = self.every_n_steps is not None and gs % self.every_n_steps == 0
        if self.sup.step_run:
            last = self.sup.steps is not None and gs >= self.sup.steps
            if request is not None or periodic or last:
                self._save(trainer, None, gs, request)
        elif request is not None or periodic:
            epoch, done = self._epoch_position(trainer)
            spe = self._steps_per_epoch(trainer)
            if done is not None and spe is not None and 0 < done < spe:
                self._save(trainer, epoch, done, request)
            else:  # the epoch's last step: its end-of-epoch checkpoint (after the validation) serves the request
                request = None
        if request is not None and request.stop:
            self._stopping = True
            trainer.should_stop = True

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.active or trainer.sanity_checking or self._stopping or not trainer.is_global_zero:
            return
        if trainer.state.fn != "fit":  # trainer.validate()/test() outside fit: no training position
            return
        metrics = scalar_metrics(self._validation_metrics(trainer), self.metrics)
        if not metrics:
            return
        if self.sup.step_run:
            self.sup.eval(metrics, step=trainer.global_step)
        else:
            self.sup.eval(trainer.current_epoch, metrics)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.active or self.sup.step_run or self._stopping:
            return
        epoch, done = self._epoch_position(trainer)
        if done is not None and done < self._steps_per_epoch(trainer):
            return  # stopped before the epoch's end (early stopping, a limit): not an epoch-end checkpoint
        request = None
        if self.handle_requests:  # one that came during the validation: served by this checkpoint too
            request = self.sup.checkpoint_requested() if trainer.is_global_zero else None
            if trainer.world_size > 1:
                request = trainer.strategy.broadcast(request, src=0)
        self._save(trainer, epoch, None, request)
        if request is not None and request.stop:
            self._stopping = True
            trainer.should_stop = True

    # -- internals --------------------------------------------------------------------------------

    def _validation_metrics(self, trainer: pl.Trainer) -> Mapping[str, Any]:
        """What the validation loop logged (not the training metrics that `callback_metrics` also holds);
        with `metrics=` names given, or where Lightning's internals differ, `callback_metrics`."""
        if self.metrics is None:
            try:
                return trainer._logger_connector.metrics["callback"]  # the active (validation) loop's results
            except (AttributeError, KeyError, TypeError):
                pass
        return trainer.callback_metrics

    def _loss(self, trainer: pl.Trainer, outputs: Any) -> float | None:
        value: Any = None
        if outputs is not None and not isinstance(outputs, Mapping):
            value = outputs  # a tensor
        elif isinstance(outputs, Mapping):
            value = outputs.get("loss")
        if value is None:
            metrics = trainer.callback_metrics
            for key in [self.loss_key] if self.loss_key else ["train_loss", "loss"]:
                if key in metrics:
                    value = metrics[key]
                    break
        return to_float(value)

    def _report_step(self, trainer: pl.Trainer, gs: int, loss: float | None) -> None:
        if self.sup.step_run:
            if loss is None:
                self.sup.emit("step", step=gs)  # progress without a loss: the watchdog warns once
            else:
                self.sup.step(step=gs, loss=loss)
            return
        epoch, done = self._epoch_position(trainer)
        index = max(0, (done or 1) - 1)  # the optimizer steps of the epoch done before this one
        if loss is None:
            self.sup.emit("step", epoch=epoch, step=index)
        else:
            self.sup.step(epoch, index, loss)

    def _steps_per_epoch(self, trainer: pl.Trainer) -> int | None:
        batches = trainer.num_training_batches
        if not isinstance(batches, int) or batches <= 0:
            return None  # an iterable without a length: no position inside an epoch
        return math.ceil(batches / max(1, trainer.accumulate_grad_batches))

    def _epoch_position(self, trainer: pl.Trainer) -> tuple[int, int | None]:
        """(epoch, optimizer steps of it done). Lightning's current_epoch is 0-based like the protocol's;
        every epoch has the same number of optimizer steps (the last batch steps even mid-accumulation)."""
        epoch = trainer.current_epoch
        spe = self._steps_per_epoch(trainer)
        if spe is None:
            return epoch, None
        return epoch, trainer.global_step - epoch * spe

    def _save(self, trainer: pl.Trainer, epoch: int | None, step: int | None, request: CheckpointRequest | None):
        """trainer.save_checkpoint into a temp name, then fsync, rename and announce (rank 0). Every rank
        calls it: the save is collective under distributed strategies."""
        if self._saved == (epoch, step) and request is None:
            return  # e.g. the last step is also a periodic one
        self._saved = (epoch, step)
        path = self.sup.checkpoint_path(epoch, step) if not self.sup.step_run else self.sup.checkpoint_path(step=step)
        path = Path(path).absolute()
        token = None
        if trainer.world_size > 1:  # the same temp name on every rank
            token = trainer.strategy.broadcast(secrets.token_hex(4), src=0)
        tmp = temp_name(path, token)
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        try:
            trainer.save_checkpoint(tmp, weights_only=False)
            if not trainer.is_global_zero:
                return
            size = place(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        took = time.perf_counter() - t0
        self.sup.checkpoint_done(epoch, path, step=step, **announce_fields(request, took, took, size))

    def _check_limits(self, trainer: pl.Trainer) -> None:
        if self.sup.step_run and self.sup.steps and trainer.max_steps != self.sup.steps:
            have = f"steps = {self.sup.steps} but the Trainer has max_steps = {trainer.max_steps}"
        elif not self.sup.step_run and self.sup.epochs and trainer.max_epochs != self.sup.epochs:
            have = f"epochs = {self.sup.epochs} but the Trainer has max_epochs = {trainer.max_epochs}"
        else:
            return
        warnings.warn(f"supervisor: the run has {have}; pass **SupervisorCallback.trainer_limits()", stacklevel=2)
