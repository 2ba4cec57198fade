"""Pumps an attempt's stdout/stderr to the console and its log file, and hands lines to the watchdog."""

from __future__ import annotations

import collections
import queue
import sys
import threading
import time
from typing import IO


class OutputPump:
    """One reader thread per pipe. Lines go to the console at once (the watchdog's loop never delays
    them), to the attempt log, and into a queue the watchdog drains for classification. A failed write
    to the log never stops the pumping (a trainer blocked on a full pipe would look hung): the first
    error is kept in `write_error` for the watchdog to act on."""

    def __init__(self, log_path, tail_lines: int = 200, echo: bool = True):
        self.lines: queue.Queue[tuple[str, str, float]] = queue.Queue()
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._echo = echo
        self.write_error: OSError | None = None

    def attach(self, pipe: IO[bytes], name: str) -> None:
        t = threading.Thread(target=self._pump, args=(pipe, name), name=f"pump-{name}", daemon=True)
        t.start()
        self._threads.append(t)

    def _pump(self, pipe: IO[bytes], name: str) -> None:
        console = sys.stdout if name == "stdout" else sys.stderr
        for raw in iter(pipe.readline, b""):
            now = time.monotonic()
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            with self._lock:
                self.tail.append(line)
                if self.write_error is None:
                    try:
                        self._log.write(raw)
                        self._log.flush()
                    except (OSError, ValueError) as exc:  # disk full, run dir gone: keep the pipe flowing
                        self.write_error = exc if isinstance(exc, OSError) else OSError(str(exc))
            if self._echo:
                try:
                    console.write(line + "\n")
                    console.flush()
                except (OSError, ValueError):
                    pass
            self.lines.put((name, line, now))
        pipe.close()

    def drain(self) -> list[tuple[str, str, float]]:
        out = []
        while True:
            try:
                out.append(self.lines.get_nowait())
            except queue.Empty:
                return out

    def join(self, timeout: float = 2.0) -> None:
        """Wait for the pipes to reach EOF (after the process tree is gone)."""
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        with self._lock:
            try:
                self._log.close()
            except OSError as exc:
                self.write_error = self.write_error or exc
