"""open_store: the Store a run uses, chosen by the `[storage]` settings."""

from __future__ import annotations

from pathlib import Path

from supervisor.store.base import Store, StoreError
from supervisor.store.local import LocalStore
from supervisor.store.settings import StorageSettings


def run_root(settings: StorageSettings, run_name: str) -> str:
    """The run's root inside the bucket (s3) or folder (file): <prefix>/<run name>."""
    if not run_name or "/" in run_name or run_name in (".", ".."):
        raise StoreError(f"run name {run_name!r} cannot name a folder in the store: use letters, digits, -_.")
    if settings.scheme == "file":
        return str(Path(settings.prefix) / run_name)
    return f"{settings.prefix}/{run_name}" if settings.prefix else run_name


def open_store(settings: StorageSettings | None, run_name: str, run_dir: Path | None = None) -> Store:
    """LocalStore without settings; otherwise a RemoteStore rooted at <url>/<run_name>/.

    Nothing is contacted yet: the caller calls open() (after taking the run dir lock). run_dir,
    when given, lets open() take over at once a lease left by a dead supervisor of that same
    run dir on this machine. boto3 is imported only for s3:// urls.
    """
    if settings is None:
        return LocalStore()
    from supervisor.store.remote import RemoteStore

    root = run_root(settings, run_name)
    if settings.scheme == "s3":
        from supervisor.store.s3 import S3Backend

        backend = S3Backend(settings, root)
    else:
        from supervisor.store.filebackend import FileBackend

        backend = FileBackend(Path(root), retry_attempts=settings.retry_attempts)
    return RemoteStore(backend, run_name, lease_ttl_s=settings.lease_ttl_s, run_dir=run_dir)
