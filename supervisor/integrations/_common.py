"""What the framework callbacks share: numbers out of metric dicts, atomic placement of a file a
framework wrote itself, the resume checkpoint's sha256 check."""

from __future__ import annotations

import math
import numbers
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from supervisor.client import CheckpointRequest, ChecksumMismatch, Supervised
from supervisor.durable import TMP_SUFFIX, fsync_dir, sha256_file


def to_float(value: Any) -> float | None:
    """A Python float from a number, a 0-d/1-element tensor or a NumPy scalar; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    numel = getattr(value, "numel", None)
    if callable(numel) and callable(getattr(value, "item", None)):
        try:
            return float(value.item()) if numel() == 1 else None
        except (TypeError, ValueError, RuntimeError):
            return None
    size = getattr(value, "size", None)
    if isinstance(size, int) and size == 1 and callable(getattr(value, "item", None)):  # NumPy scalar/array
        try:
            return float(value.item())
        except (TypeError, ValueError):
            return None
    return None


def scalar_metrics(metrics: Mapping[str, Any], keys: Iterable[str] | None = None) -> dict[str, float]:
    """The scalar numbers of `metrics` (all, or those named in `keys`) as floats. Non-finite values are
    kept: a NaN evaluation metric is what the watchdog calls `test nan`."""
    wanted = None if keys is None else set(keys)
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if wanted is not None and key not in wanted:
            continue
        x = to_float(value)
        if x is not None:
            out[str(key)] = x
    return out


def is_finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def temp_name(path: Path, token: str | None = None) -> Path:
    """`.<name>.<random>.tmp` beside `path`: the protocol's name for an unfinished write (the supervisor
    deletes such files before an attempt starts)."""
    return path.parent / f".{path.name}.{token or secrets.token_hex(4)}{TMP_SUFFIX}"


def place(tmp: Path, path: Path) -> int:
    """Make the complete file `tmp` durable and rename it to `path` (fsync file, rename, fsync dir).
    Returns its size."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return size


def verified_load_path(sup: Supervised) -> Path | None:
    """The checkpoint this attempt resumes from, its sha256 checked against the one the supervisor
    recorded (raises ChecksumMismatch); None on a fresh start."""
    path = sup.resume_path()
    if path is None:
        return None
    if sup.load_sha256:
        actual = sha256_file(path)
        if actual != sup.load_sha256:
            raise ChecksumMismatch(f"checkpoint {path} has sha256 {actual[:12]}..., expected {sup.load_sha256[:12]}...")
    return path


def announce_fields(request: CheckpointRequest | None, stall_s: float, write_s: float, size: int) -> dict[str, Any]:
    """The optional fields of a checkpoint event (request served, costs for the deadline plan)."""
    fields: dict[str, Any] = {"size": size, "stall_s": round(stall_s, 6), "write_s": round(write_s, 6)}
    if request is not None:
        fields["request"] = request  # Supervised.checkpoint_done writes its id and reason, and marks it served
    return fields
