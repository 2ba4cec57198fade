"""Progress lines for large transfers: at most one log line every few seconds, thread-safe."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

T = TypeVar("T")

log = logging.getLogger("supervisor.store")

LARGE = 64 * 1024 * 1024


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class ProgressLog:
    """A byte counter for one transfer; logs progress of transfers of at least LARGE bytes."""

    def __init__(self, label: str, total: int, every_s: float = 5.0) -> None:
        self.label = label
        self.total = total
        self.every_s = every_s
        self.done = 0
        self._started = self._last = time.monotonic()
        self._lock = threading.Lock()

    def __call__(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if self.total < LARGE or now - self._last < self.every_s:
                return
            self._last = now
            done, elapsed = self.done, now - self._started
        pct = 100.0 * done / self.total if self.total else 100.0
        log.info(
            "%s: %s of %s (%.0f%%), %s/s",
            self.label,
            human_bytes(done),
            human_bytes(self.total),
            pct,
            human_bytes(done / max(elapsed, 1e-6)),
        )


def log_retry(state: RetryCallState) -> None:
    """tenacity before_sleep hook: one line naming the fault and when the next try comes."""
    exc = state.outcome.exception() if state.outcome is not None else None
    wait = state.next_action.sleep if state.next_action is not None else 0.0
    log.warning("%s; try %d again in %.1fs", exc, state.attempt_number + 1, wait)


def retry_transient(once: Callable[[], T], attempts: int, multiplier: float, max_wait: float) -> T:
    """Call `once` until it stops raising TransientStoreError, at most `attempts` times, with
    exponential backoff and full jitter between tries (each retry logged)."""
    from supervisor.store.backend import TransientStoreError

    return Retrying(
        retry=retry_if_exception_type(TransientStoreError),
        stop=stop_after_attempt(attempts),
        wait=wait_random_exponential(multiplier=multiplier, max=max_wait),
        before_sleep=log_retry,
        reraise=True,
    )(once)
