"""The embedded default: the run dir is the store. Checkpoints stay where the trainer wrote them."""

from __future__ import annotations

from pathlib import Path

from supervisor.durable import sha256_file
from supervisor.store.base import CheckpointRecord, Store


class LocalStore(Store):
    """No copies are made; verification and deletion act on the run dir itself."""

    def describe(self) -> str:
        return "local run dir"

    def ensure_local(self, record: CheckpointRecord, run_dir: Path) -> bool:
        path = run_dir / record.path
        try:
            return path.stat().st_size == record.size and sha256_file(path) == record.sha256
        except OSError:
            return False

    def remove_checkpoint(self, record: CheckpointRecord, run_dir: Path) -> None:
        (run_dir / record.path).unlink(missing_ok=True)
