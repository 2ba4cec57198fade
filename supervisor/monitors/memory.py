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


def _cgroup_dir() -> Path | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hier, controllers, path = line.split(":", 2)
        if hier == "0" and Path("/sys/fs/cgroup/memory.events").exists():
            return Path("/sys/fs/cgroup") / path.lstrip("/") if (
                Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.events"
            ).exists() else Path("/sys/fs/cgroup")
        if "memory" in controllers.split(","):
            for base in (Path("/sys/fs/cgroup/memory") / path.lstrip("/"), Path("/sys/fs/cgroup/memory")):
                if (base / "memory.oom_control").exists():
                    return base
    return None


def cgroup_memory_limit() -> int | None:
    """The cgroup's hard memory limit in bytes (v2 memory.max or v1 limit_in_bytes), None if unlimited."""
    d = _cgroup_dir()
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


def oom_kill_count() -> int | None:
    """How many processes the OOM killer has killed in our cgroup (v2 memory.events, v1 oom_control)."""
    d = _cgroup_dir()
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
