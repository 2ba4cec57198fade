"""Zero-code mode: finds checkpoints a script writes by a file pattern, once they stop changing."""

from __future__ import annotations

import time
from pathlib import Path

from supervisor.protocol import checkpoint_regex


class CheckpointScanner:
    """Reports (epoch, path) for files matching `pattern` under `root` whose size and mtime have held
    still for `settle_s`; at once with `final=True` (the process has exited) or for epochs below
    `finished_below` (the script's output has moved on to a later epoch)."""

    def __init__(self, root: Path, pattern: str, settle_s: float):
        self.root = root
        self.regex = checkpoint_regex(pattern)
        self.settle_s = settle_s
        self._seen: dict[Path, tuple[int, int, float]] = {}
        self._prefix_parts = Path(pattern).parts[:-1]

    def _candidates(self) -> list[tuple[int, Path]]:
        base = self.root.joinpath(*[p for p in self._prefix_parts if "{" not in p])
        if not base.is_dir():
            return []
        out = []
        for path in base.rglob("*"):
            rel = path.relative_to(self.root).as_posix()
            m = self.regex.match(rel)
            if m and path.is_file():
                out.append((int(m.group("epoch")), path))
        return out

    def poll(self, known: set[int], final: bool = False, finished_below: int = -1) -> list[tuple[int, Path]]:
        now = time.monotonic()
        ready = []
        for epoch, path in sorted(self._candidates()):
            if epoch in known or path.name.startswith("."):
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            sig = (st.st_size, st.st_mtime_ns)
            done = final or epoch < finished_below
            prev = self._seen.get(path)
            if prev is None or prev[:2] != sig:
                self._seen[path] = (*sig, now)
                if not done:
                    continue
            if done or now - self._seen[path][2] >= self.settle_s:
                ready.append((epoch, path))
        return ready
