"""Other runs beside this one: a parent to start from (`[init]`), baselines to compare with (`[record]`), and
every run of a store or folder (`report --all`). A run is found in the same store (the same prefix, another
run name) when the run has `[storage]`, else in the same runs folder (run_dir's pattern with the other name).

Reading another run never takes its lease and never writes to it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from supervisor import ledger as L
from supervisor.durable import sha256_file
from supervisor.store.base import CheckpointRecord
from supervisor.store.settings import StorageSettings

log = logging.getLogger("supervisor")


def parse_facts(data: bytes) -> list[dict[str, Any]]:
    """The facts of a ledger's bytes (a torn or foreign line is skipped, as the ledger's reader does)."""
    out = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            fact = json.loads(line)
        except ValueError:
            continue
        if isinstance(fact, dict) and isinstance(fact.get("fact"), str):
            out.append(fact)
    return out


class Runs:
    """The runs of one store prefix (`storage`) or of one folder (`folder`: a run dir per name, by `pattern`)."""

    def __init__(self, storage: StorageSettings | None = None, folder: Path | None = None,
                 pattern: str = "{name}"):  # fmt: skip
        self.storage = storage
        self.folder = folder
        self.pattern = pattern

    @classmethod
    def beside(cls, cfg: Any) -> Runs:
        """The runs next to the run of `cfg` (a RunConfig): its store's, and its runs folder's when run_dir names
        the run (`runs/{name}`: the folder `runs`, each run in `runs/<name>`)."""
        if "{name}" not in cfg.run_dir:
            return cls(cfg.storage)
        head, _, tail = cfg.run_dir.partition("{name}")
        base = Path(head or ".").expanduser()
        return cls(cfg.storage, (base if base.is_absolute() else cfg.base_dir / base).resolve(), "{name}" + tail)

    def describe(self) -> str:
        return self.storage.describe() if self.storage is not None else str(self.folder)

    def run_dir(self, name: str) -> Path | None:
        return None if self.folder is None else self.folder / self.pattern.replace("{name}", name)

    def _store(self, name: str):
        from supervisor.store.factory import open_store

        return open_store(self.storage, name)  # not opened: no lease, no threads; reads only

    def _prefix_backend(self):
        """A backend rooted at the store's prefix, above every run's root (listing only)."""
        assert self.storage is not None
        if self.storage.scheme == "s3":
            from supervisor.store.s3 import S3Backend

            return S3Backend(self.storage, self.storage.prefix)
        from supervisor.store.filebackend import FileBackend

        return FileBackend(Path(self.storage.prefix), retry_attempts=self.storage.retry_attempts)

    def facts(self, name: str) -> list[dict[str, Any]] | None:
        """The ledger facts of run `name`; None when there is no such run here. Raises StoreError when the store
        cannot be read."""
        if self.storage is not None:
            store = self._store(name)
            try:
                found = store.backend.get_bytes(L.LEDGER_NAME)
            finally:
                store.backend.close()
            if found is not None:
                return parse_facts(found[0])
        local = self.run_dir(name)
        if local is not None and (local / L.LEDGER_NAME).exists():
            return L.read_facts(local / L.LEDGER_NAME)
        return None

    def names(self) -> list[str]:
        """Every run here (a ledger in the store under <prefix>/<name>/, or a run dir with a ledger)."""
        found: set[str] = set()
        if self.storage is not None:
            backend = self._prefix_backend()
            try:
                for info in backend.list(""):
                    parts = info.key.split("/")
                    if len(parts) == 2 and parts[1] == L.LEDGER_NAME:
                        found.add(parts[0])
            finally:
                backend.close()
        if self.folder is not None and self.folder.is_dir() and self.pattern == "{name}":
            found |= {d.name for d in self.folder.iterdir() if (d / L.LEDGER_NAME).is_file()}
        return sorted(found)

    def fetch(self, name: str, record: CheckpointRecord, target: Path) -> bool:
        """Put run `name`'s checkpoint `record` at `target` (whole, its sha256 checked); False when it cannot be
        had whole. Raises StoreError when the store cannot be read."""
        target.parent.mkdir(parents=True, exist_ok=True)
        local = self.run_dir(name)
        if local is not None and (local / record.path).is_file():
            tmp = target.with_name(f".{target.name}.inherit")
            shutil.copyfile(local / record.path, tmp)
            if sha256_file(tmp) == record.sha256:
                tmp.replace(target)
                return True
            tmp.unlink(missing_ok=True)
        if self.storage is None:
            return False
        store = self._store(name)
        staging = target.parent / f".inherit-{name}"
        try:
            if not store.ensure_local(record, staging):
                return False
            (staging / record.path).replace(target)
            return True
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            store.backend.close()
