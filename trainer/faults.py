"""FAULT INJECTION, for the demo and the supervisor's end-to-end tests only.

The `inject_fault` parameter {"kind", "epoch", "step", "attempt"} (or a list of them) makes
attempt `attempt` (the SUPERVISOR_ATTEMPT value, default 0) fail on purpose at the start of
optimizer step `step` of epoch `epoch`. Every injection is announced by a log line starting with
"FAULT INJECTION".

On a CUDA device `cuda_error` is a real device-side assert and `gpu_oom` a real allocation beyond
the card's memory; on the CPU both print the error line PyTorch would print and exit 1.
`amp_overflow` makes every later gradient of the attempt infinite while the loss stays finite:
under AMP the GradScaler skips each step, which the trainer must report as a NaN.
"""

from __future__ import annotations

import logging
import sys
import time

import torch

log = logging.getLogger(__name__)

CUDA_ASSERT_TEXT = "RuntimeError: CUDA error: device-side assert triggered"


GPU_OOM_TEXT = "torch.OutOfMemoryError: CUDA out of memory."


def due(spec: object | None, attempt: int, epoch: int, step: int, rank: int = 0) -> str | None:
    """The fault kind to fire now, or None (`spec` is one FaultSpec, a list of them, or None). Under torchrun
    a spec with a `rank` fires in that global rank only; without one, in every rank."""
    specs = spec if isinstance(spec, list) else [] if spec is None else [spec]
    for one in specs:
        if (one.attempt, one.epoch, one.step) == (attempt, epoch, step) and getattr(one, "rank", None) in (None, rank):
            return one.kind
    return None


def poison_grads(params: list[torch.Tensor]) -> None:
    """kind "amp_overflow": one gradient becomes infinite after the backward pass."""
    for prm in params:
        if prm.grad is not None:
            prm.grad.fill_(float("inf"))
            return


def poison_loss(loss: torch.Tensor) -> torch.Tensor:
    """kind "nan": the loss becomes NaN through the real computation, so the NaN guard catches it."""
    log.warning("FAULT INJECTION (on purpose, inject_fault): multiplying the loss by NaN")
    return loss * float("nan")


def fire(kind: str, device: torch.device) -> None:
    """Carry out the kinds that end the attempt: crash, hang, cpu_oom, cuda_error, gpu_oom. Does not return."""
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
    if kind == "gpu_oom":
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            # Twice the card: the caching allocator raises its out-of-memory error. (No error name on the
            # line itself: a traceback quotes it, and the watchdog must judge by the error line.)
            torch.empty(2 * total, dtype=torch.uint8, device=device)
        print(f"{GPU_OOM_TEXT} (FAULT INJECTION on the CPU: the line PyTorch prints)", file=sys.stderr, flush=True)
        sys.exit(1)
    raise ValueError(f"unknown fault kind {kind!r}")
