"""One vocabulary for every way an attempt ends: the Fault enum and the classifiers that name it.

The enum's values are the reason strings of the restart table, the ledger and reports (fixed surface).
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from enum import Enum

NORMAL_START = "normal start"


class Fault(str, Enum):
    """Why an attempt ended without completing the run."""

    NAN = "nan"
    TEST_NAN = "test nan"
    CUDA_ERROR = "cuda error"
    GPU_OOM = "gpu oom"
    CPU_OOM = "cpu oom"
    HANG = "hang"
    DISK_FULL = "disk full"
    CRASH = "crash"
    INCOMPLETE = "incomplete"  # exited 0 before the run's last checkpoint was verified
    TIME_LIMIT = "time limit"
    PREEMPTED = "preempted"
    SESSION_LOST = "session lost"
    STOPPED = "stopped"

    def __str__(self) -> str:
        return self.value

    @property
    def rule(self) -> FaultRule:
        return RULES[self]

    @property
    def pauses(self) -> bool:
        """Faults after which the run pauses (exit 75) instead of restarting on this machine."""
        return RULES[self].pauses

    @property
    def external(self) -> bool:
        """Not the trainer's doing: spends no restart budget, and the trainer's work up to it counts."""
        return RULES[self].external


@dataclass(frozen=True)
class FaultRule:
    """How the supervisor treats one fault.

    pauses:   the run pauses (exit 75) and a later `start` resumes it, instead of restarting here
    external: not caused by the trainer; checkpoints the trainer completes after it still count
    grace:    how long the trainer may take to exit once the fault is named: "stop" ([watch]
              stop_grace_s, to save), "cuda" (cuda_error_grace_s), "short" (min(5 s, stop grace):
              it usually exits by itself) or "none" (killed at once)
    """

    pauses: bool
    external: bool
    grace: str


# The one table of faults: every other place derives from it.
RULES: dict[Fault, FaultRule] = {
    Fault.NAN: FaultRule(pauses=False, external=False, grace="short"),
    Fault.TEST_NAN: FaultRule(pauses=False, external=False, grace="short"),
    Fault.CUDA_ERROR: FaultRule(pauses=False, external=False, grace="cuda"),
    Fault.GPU_OOM: FaultRule(pauses=False, external=False, grace="cuda"),
    Fault.CPU_OOM: FaultRule(pauses=False, external=False, grace="none"),
    Fault.HANG: FaultRule(pauses=False, external=False, grace="none"),
    Fault.DISK_FULL: FaultRule(pauses=False, external=False, grace="short"),
    Fault.CRASH: FaultRule(pauses=False, external=False, grace="short"),
    Fault.INCOMPLETE: FaultRule(pauses=False, external=False, grace="short"),
    Fault.TIME_LIMIT: FaultRule(pauses=True, external=True, grace="stop"),
    Fault.PREEMPTED: FaultRule(pauses=True, external=True, grace="stop"),
    Fault.STOPPED: FaultRule(pauses=True, external=True, grace="stop"),
    Fault.SESSION_LOST: FaultRule(pauses=False, external=True, grace="none"),
}


def grace_s(fault: Fault, stop_grace_s: float, cuda_error_grace_s: float) -> float:
    """Seconds the trainer gets to exit on its own once `fault` is named (SIGKILL after)."""
    return {
        "stop": stop_grace_s,
        "cuda": cuda_error_grace_s,
        "short": min(5.0, stop_grace_s),
        "none": 0.0,
    }[RULES[fault].grace]


# Order matters: the first matching rule wins, so specific strings come before general ones.
# Sources: docs/platforms.md (CUDA, cuBLAS, cuDNN, NCCL error strings; host OOM).
_STDERR_RULES: tuple[tuple[Fault, re.Pattern[str]], ...] = (
    (
        Fault.GPU_OOM,
        re.compile(
            r"CUDA out of memory|torch\.(cuda\.)?OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED"
            r"|cudaErrorMemoryAllocation|CUDA error: out of memory",
        ),
    ),
    (
        Fault.CUDA_ERROR,
        re.compile(
            r"CUDA error: |AcceleratorError|device-side assert|an illegal memory access was encountered"
            r"|unspecified launch failure|misaligned address|an illegal instruction was encountered"
            r"|CUBLAS_STATUS_(EXECUTION_FAILED|NOT_INITIALIZED|INTERNAL_ERROR)"
            r"|CUDNN_STATUS_(EXECUTION_FAILED|INTERNAL_ERROR|MAPPING_ERROR)|cuDNN error"
            r"|NCCL error|Watchdog caught collective operation timeout|ProcessGroupNCCL's watchdog"
            r"|uncorrectable ECC error|uncorrectable NVLink error|GPU has fallen off the bus"
            r"|CUDA driver error|cudaError\w+",
        ),
    ),
    (
        Fault.CPU_OOM,
        re.compile(
            r"DefaultCPUAllocator: (can't|not enough memory)|MemoryError\b"
            r"|DataLoader worker \(pid \d+\) is killed by signal: Killed",
        ),
    ),
    (Fault.DISK_FULL, re.compile(r"No space left on device|ENOSPC|Disk quota exceeded|EDQUOT")),
)


_TRACEBACK_FILE = re.compile(r'^\s+File "[^"]*", line \d+')


def _quotes_source(previous: str | None) -> bool:
    """True for the line after a traceback's `File "...", line N`: the code it quotes, not an error.

    Seen on an H200: `torch.empty(...)  # raises torch.OutOfMemoryError` quoted in a traceback
    matched the GPU OOM rule before the real error line came; `except torch.OutOfMemoryError:` in
    a user's crash traceback would name the wrong fault the same way.
    """
    return previous is not None and _TRACEBACK_FILE.match(previous) is not None


def classify_line(line: str, previous: str | None = None) -> Fault | None:
    """The fault a single stdout/stderr line is evidence of, or None; `previous` is the line before
    it on the same stream (the code a traceback quotes is not evidence)."""
    if _quotes_source(previous):
        return None
    for fault, pattern in _STDERR_RULES:
        if pattern.search(line):
            return fault
    return None


def classify_tail(lines: list[str]) -> Fault | None:
    """The most specific fault named anywhere in an output tail (GPU OOM beats CUDA error, etc.)."""
    found = {classify_line(x, lines[i - 1] if i else None) for i, x in enumerate(lines)}
    for fault, _ in _STDERR_RULES:
        if fault in found:
            return fault
    return None


def describe_exit(returncode: int) -> str:
    """'exit 3' or 'signal SIGKILL' for a Popen returncode."""
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit {returncode}"


def classify_exit(returncode: int, tail: list[str], oom_killed: bool) -> Fault | None:
    """Name the fault of an attempt that exited on its own; None for a clean exit 0.

    `oom_killed` is the cgroup's oom_kill counter having grown during the attempt. A SIGKILL nobody
    sent, with that evidence, is the kernel OOM killer; without it the tail decides, else `crash`.
    """
    from_tail = classify_tail(tail)
    if returncode == 0:
        return None
    killed = returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)
    if killed and oom_killed:
        return Fault.CPU_OOM
    if from_tail is not None:
        return from_tail
    if oom_killed:
        return Fault.CPU_OOM
    return Fault.CRASH
