"""Progress lines for large transfers: at most one log line every few seconds, thread-safe."""

from __future__ import annotations

import logging
import threading
import time

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
