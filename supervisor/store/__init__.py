"""Where verified checkpoints and the ledger are kept: the run dir itself, or a remote store."""

from supervisor.store.base import CheckpointRecord, Store, StoreError
from supervisor.store.local import LocalStore

__all__ = ["CheckpointRecord", "LocalStore", "Store", "StoreError"]
