"""Trainer-side helper any script can use: read the attempt's environment, append events,
save checkpoints atomically, stop at the first non-finite loss.

Torch is imported lazily, only by the functions that save or load tensors, so the watchdog that
imports this package for the protocol never pulls torch in.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor import protocol as P
from supervisor.durable import atomic_write, fsync_dir, sha256_file

__all__ = ["ChecksumMismatch", "NonFiniteLoss", "Supervised", "atomic_write", "fsync_dir", "sha256_file"]


class NonFiniteLoss(RuntimeError):
    """Raised by `Supervised.step` when the loss is NaN or infinite; the attempt should end."""


class ChecksumMismatch(RuntimeError):
    """A checkpoint file's sha256 differs from the one the supervisor recorded."""


def _env_int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    return int(raw)


@dataclass
class Supervised:
    """The attempt as the supervisor launched it; works unsupervised too (events go nowhere)."""

    run_dir: Path | None = None
    checkpoint_dir: Path = Path("checkpoints")
    events_path: Path | None = None
    seed: int = 0
    load_epoch: int = -1
    start_epoch: int = 0
    epochs: int | None = None
    attempt: int = 0
    batch_divisor: int = 1
    params: dict[str, Any] = field(default_factory=dict)
    load_path: Path | None = None
    load_sha256: str | None = None
    checkpoint_pattern: str = P.DEFAULT_CHECKPOINT_PATTERN

    @property
    def supervised(self) -> bool:
        return self.events_path is not None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Supervised:
        """Read the SUPERVISOR_* variables; missing ones fall back to an unsupervised default."""
        env = dict(os.environ if env is None else env)
        params: dict[str, Any] = {}
        if env.get(P.ENV_PARAMS):
            params = json.loads(Path(env[P.ENV_PARAMS]).read_text(encoding="utf-8"))
        epochs = env.get(P.ENV_EPOCHS)
        load_epoch = _env_int(env, P.ENV_LOAD_EPOCH, -1)
        ckpt_dir = Path(env.get(P.ENV_CHECKPOINT_DIR) or "checkpoints")
        load_path = env.get(P.ENV_LOAD_PATH)
        return cls(
            run_dir=Path(env[P.ENV_RUN_DIR]) if env.get(P.ENV_RUN_DIR) else None,
            checkpoint_dir=ckpt_dir,
            events_path=Path(env[P.ENV_EVENTS]) if env.get(P.ENV_EVENTS) else None,
            seed=_env_int(env, P.ENV_SEED, 0),
            load_epoch=load_epoch,
            start_epoch=_env_int(env, P.ENV_START_EPOCH, load_epoch + 1),
            epochs=int(epochs) if epochs else None,
            attempt=_env_int(env, P.ENV_ATTEMPT, 0),
            batch_divisor=max(1, _env_int(env, P.ENV_BATCH_DIVISOR, 1)),
            params=params,
            load_path=Path(load_path) if load_path else None,
            load_sha256=env.get(P.ENV_LOAD_SHA256) or None,
        )

    # -- events -----------------------------------------------------------------------------

    def emit(self, kind: str, **fields: Any) -> None:
        """Append one event line and flush it, so the watchdog sees it within its poll interval."""
        if self.events_path is None:
            return
        line = P.format_event(kind, **fields)
        try:
            f = open(self.events_path, "a", encoding="utf-8")  # noqa: SIM115
        except FileNotFoundError:  # a script run by hand with SUPERVISOR_EVENTS set: make its folder
            self.events_path.parent.mkdir(parents=True, exist_ok=True)
            f = open(self.events_path, "a", encoding="utf-8")  # noqa: SIM115
        with f:
            f.write(line)
            f.flush()

    def step(self, epoch: int, step: int, loss: float, **extra: Any) -> None:
        """Report a training step; raises NonFiniteLoss (after reporting it) if `loss` is NaN/inf."""
        loss = float(loss)
        self.emit(P.EVENT_STEP, epoch=epoch, step=step, loss=loss, **extra)
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"non-finite training loss {loss} at epoch {epoch} step {step}")

    def eval(self, epoch: int, metrics: dict[str, Any]) -> None:
        """Report evaluation metrics of `epoch` (the watchdog turns a non-finite one into `test nan`)."""
        self.emit(P.EVENT_EVAL, epoch=epoch, metrics=metrics)

    def heartbeat(self, **extra: Any) -> None:
        self.emit(P.EVENT_HEARTBEAT, **extra)

    def checkpoint_path(self, epoch: int) -> Path:
        return self.checkpoint_dir / P.checkpoint_name(epoch, self.checkpoint_pattern)

    def checkpoint_done(self, epoch: int, path: str | os.PathLike[str] | None = None) -> None:
        """Announce that the checkpoint of `epoch` is complete: the end of that epoch, after its eval."""
        self.emit(P.EVENT_CHECKPOINT, epoch=epoch, path=str(path or self.checkpoint_path(epoch)))

    # -- checkpoints (torch imported lazily) ------------------------------------------------

    def save_checkpoint(self, state: Any, epoch: int, announce: bool = True) -> Path:
        """torch.save `state` atomically to the epoch's checkpoint path, then announce it."""
        import torch

        path = atomic_write(self.checkpoint_path(epoch), lambda f: torch.save(state, f))
        if announce:
            self.checkpoint_done(epoch, path)
        return path

    def resume_path(self) -> Path | None:
        """The checkpoint this attempt must load, or None for a fresh start."""
        if self.load_epoch < 0:
            return None
        return self.load_path or self.checkpoint_path(self.load_epoch)

    def load_checkpoint(self, map_location: Any = "cpu", weights_only: bool = True) -> Any:
        """Load the resume checkpoint after checking its sha256; None for a fresh start.

        Checkpoints may come from a bucket, so they are untrusted: weights_only=True by default.
        """
        path = self.resume_path()
        if path is None:
            return None
        if self.load_sha256:
            actual = sha256_file(path)
            if actual != self.load_sha256:
                raise ChecksumMismatch(
                    f"checkpoint {path} has sha256 {actual[:12]}..., expected {self.load_sha256[:12]}..."
                )
        import torch

        return torch.load(path, map_location=map_location, weights_only=weights_only)
