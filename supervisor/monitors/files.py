"""Zero-code mode: finds checkpoints a script writes by a file pattern, once they stop changing."""

from __future__ import annotations

import time
from pathlib import Path

from supervisor.durable import is_temp_name
from supervisor.protocol import checkpoint_regex

Signature = tuple[int, int, int]  # size, mtime_ns, inode


class CheckpointScanner:
    """Reports (position, path) for files matching the absolute path `pattern` (its {epoch}, or {step} in a
    run of steps: `field`) whose size and mtime have held still for `settle_s`; at once with `final=True` (the
    process has exited) or for positions below `finished_below` (the script's output has moved past them).

    Only this attempt's files count: `baseline()` (called at launch) remembers every matching file
    that already exists, and such a file is reported only once it changes (it was written again).
    Epochs outside `epochs` (the attempt's range) are never reported; each epoch is reported once.
    """

    def __init__(self, pattern: str, settle_s: float, epochs: range, field: str = "epoch"):
        parts = Path(pattern).parts
        depth = next((i for i, p in enumerate(parts) if "{" in p), len(parts) - 1)
        self.base = Path(*parts[:depth]) if depth else Path(".")  # the deepest folder without a placeholder
        self.regex = checkpoint_regex(pattern, field)  # group 'epoch': the position, an epoch or a step count
        self.settle_s = settle_s
        self.epochs = epochs
        self._before: dict[Path, Signature] = {}
        self._seen: dict[Path, tuple[Signature, float]] = {}
        self.reported: set[int] = set()

    def _candidates(self) -> list[tuple[int, Path]]:
        if not self.base.is_dir():
            return []
        out = []
        for path in self.base.rglob("*"):
            m = self.regex.match(path.as_posix())
            if m and not is_temp_name(path.name) and path.is_file():
                epoch = int(m.group("epoch"))
                if epoch in self.epochs:
                    out.append((epoch, path))
        return out

    @staticmethod
    def _signature(path: Path) -> Signature | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns, st.st_ino

    def baseline(self) -> None:
        """Remember the files that exist before the attempt starts: left by earlier attempts."""
        for _, path in self._candidates():
            if (sig := self._signature(path)) is not None:
                self._before[path] = sig

    def poll(self, final: bool = False, finished_below: int = -1) -> list[tuple[int, Path]]:
        now = time.monotonic()
        ready = []
        for epoch, path in sorted(self._candidates()):
            if epoch in self.reported:
                continue
            sig = self._signature(path)
            if sig is None or self._before.get(path) == sig:
                continue  # gone, or untouched since before this attempt
            done = final or epoch < finished_below
            prev = self._seen.get(path)
            if prev is None or prev[0] != sig:
                self._seen[path] = (sig, now)
                if not done:
                    continue
            if done or now - self._seen[path][1] >= self.settle_s:
                self.reported.add(epoch)
                ready.append((epoch, path))
        return ready
