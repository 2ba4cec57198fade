"""FAULT INJECTION, for the demo and the supervisor's end-to-end tests only.

The `inject_fault` parameter {"kind", "epoch", "step", "attempt"} makes attempt `attempt` (the
SUPERVISOR_ATTEMPT value, default 0) fail on purpose at the start of optimizer step `step` of
epoch `epoch`. Every injection is announced by a log line starting with "FAULT INJECTION".
"""

from __future__ import annotations

import logging
import sys
import time

import torch

log = logging.getLogger(__name__)

CUDA_ASSERT_TEXT = "RuntimeError: CUDA error: device-side assert triggered"


def due(spec: object | None, attempt: int, epoch: int, step: int) -> str | None:
    """The fault kind to fire now, or None."""
    if spec is None:
        return None
    if (spec.attempt, spec.epoch, spec.step) != (attempt, epoch, step):  # type: ignore[attr-defined]
        return None
    return spec.kind  # type: ignore[attr-defined]


def poison_loss(loss: torch.Tensor) -> torch.Tensor:
    """kind "nan": the loss becomes NaN through the real computation, so the NaN guard catches it."""
    log.warning("FAULT INJECTION (on purpose, inject_fault): multiplying the loss by NaN")
    return loss * float("nan")


def fire(kind: str, device: torch.device) -> None:
    """Carry out the non-NaN kinds: crash, hang, cpu_oom, cuda_error. Does not return."""
    log.warning("FAULT INJECTION (on purpose, inject_fault): %s", kind)
    for h in logging.getLogger().handlers:
        h.flush()
    if kind == "crash":
        raise RuntimeError("FAULT INJECTION: crash requested by inject_fault")
    if kind == "hang":
        while True:  # no events, no output: only the watchdog's hang detector ends this
            time.sleep(3600)
    if kind == "cpu_oom":
        hog = []
        while True:  # touch every page so the memory is really committed
            hog.append(torch.ones(64 * 1024 * 1024, dtype=torch.uint8))
    if kind == "cuda_error":
        if device.type == "cuda":
            torch._assert_async(torch.tensor(0, device=device))
            torch.cuda.synchronize(device)
        print(CUDA_ASSERT_TEXT, file=sys.stderr, flush=True)
        sys.exit(1)
    raise ValueError(f"unknown fault kind {kind!r}")
