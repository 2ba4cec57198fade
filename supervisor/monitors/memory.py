"""Host memory of a process tree, the memory budget, and the kernel OOM killer's counters."""

from __future__ import annotations

import re
from pathlib import Path

import psutil


def tree_memory(pid: int) -> int:
    """Bytes held by `pid` and its descendants: summed PSS where readable (shared pages of forked
    DataLoader workers are counted once), else RSS."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            info = p.memory_full_info()
            total += getattr(info, "pss", 0) or info.rss
        except psutil.AccessDenied:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        except psutil.Error:
            pass
    return total


def cgroup_dir(pid: int | str = "self") -> Path | None:
    """The memory cgroup directory of a process (cgroup v2 unified, or the v1 memory controller)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    root = Path("/sys/fs/cgroup")
    for line in lines:
        hier, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if hier == "0" and (root / "cgroup.controllers").exists():
            for d in (root / rel, root):
                if (d / "memory.events").exists():
                    return d
        if "memory" in controllers.split(","):
            for d in (root / "memory" / rel, root / "memory"):
                if (d / "memory.oom_control").exists():
                    return d
    return None


def cgroup_memory_limit() -> int | None:
    """Our cgroup's hard memory limit in bytes (v2 memory.max or v1 limit_in_bytes); None if unlimited."""
    d = cgroup_dir()
    if d is None:
        return None
    for name in ("memory.max", "memory.limit_in_bytes"):
        try:
            raw = (d / name).read_text().strip()
        except OSError:
            continue
        if raw == "max":
            return None
        value = int(raw)
        return value if value < (1 << 60) else None
    return None


def oom_kill_count(d: Path | None) -> int | None:
    """How many processes the OOM killer has killed in cgroup `d` (v2 memory.events, v1 oom_control)."""
    if d is None:
        return None
    for name in ("memory.events", "memory.oom_control"):
        try:
            text = (d / name).read_text()
        except OSError:
            continue
        m = re.search(r"^oom_kill (\d+)$", text, re.MULTILINE)
        if m:
            return int(m.group(1))
    return None


class OomKillWatch:
    """Remembers the oom_kill counter of every cgroup the trainer's processes were seen in, so a
    SIGKILL can be told apart: the kernel OOM killer raises a counter, a plain `kill -9` does not."""

    def __init__(self) -> None:
        self._base: dict[Path, int] = {}
        self.sample("self")

    def sample(self, *pids: int | str) -> None:
        for pid in pids:
            d = cgroup_dir(pid)
            if d is not None and d not in self._base and (n := oom_kill_count(d)) is not None:
                self._base[d] = n

    def sample_tree(self, root: int) -> None:
        try:
            procs = [root, *(p.pid for p in psutil.Process(root).children(recursive=True))]
        except psutil.Error:
            return
        self.sample(*procs)

    def fired(self) -> bool:
        return any((oom_kill_count(d) or 0) > n for d, n in self._base.items())


def memory_budget(limit: int | float | None) -> int | None:
    """Bytes allowed to the trainer's tree: a byte count as is, a fraction of RAM (or of the cgroup limit)."""
    if limit is None:
        return None
    if isinstance(limit, float) and limit <= 1.0:
        total = psutil.virtual_memory().total
        cg = cgroup_memory_limit()
        if cg is not None:
            total = min(total, cg)
        return int(total * limit)
    return int(limit)
