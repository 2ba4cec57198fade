"""The Store interface the watchdog talks to. Backends: local.py (the run dir is the store) and,
for checkpoints that must outlive the machine, remote backends (s3://, file:// elsewhere).

The watchdog calls these at fixed points of a run:
  open()                  once, before anything is written (checks access, takes the run's lease)
  restore()               once, when the local run dir has no ledger: pull the remote one
  resume_uploads()        once, with the verified checkpoints: upload what an earlier session could not
  resume_removals()       once, right after: remove remotely what retention removed in an earlier session
  ensure_local()          before an attempt resumes from a checkpoint the local disk may lack
  checkpoint_verified()   each time a checkpoint is verified
  ledger_changed()        after every ledger append
  remove_checkpoint()     retention decided the checkpoint can go
  lost_lease()            polled by the watchdog; True means stop writing at once (fencing)
  writable()              asked before a ledger write (fencing after a freeze or partition)
  permanent_error()       polled by the watchdog; a reason means pause the run with it
  upload_rate()           how fast recent checkpoint uploads went (plans a final checkpoint before a deadline)
  backlog_bytes()         how much checkpoint upload is still to send (bounds a drain)
  drain()                 on pause and completion: wait for pending work within a budget
  close()                 release the lease, stop background threads

checkpoint_verified, ledger_changed, remove_checkpoint, resume_uploads, resume_removals, lost_lease,
permanent_error, upload_rate and backlog_bytes run on the watchdog's thread: they return at once and
never wait on the network; the work they start happens in the background. writable(wait_s) waits
at most wait_s, never on I/O.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path


class StoreError(RuntimeError):
    """A problem with the store a user can fix; the message is one line and holds no secret."""


class LeaseHeld(StoreError):
    """Another supervisor drives this run."""


# The step of an epoch's end in a position: after every mid-epoch checkpoint of that epoch.
END_OF_EPOCH = 1 << 62


@dataclass(frozen=True)
class CheckpointRecord:
    """A verified checkpoint: its epoch, its path relative to the run dir, its size and sha256; `step` is
    the number of optimizer steps of `epoch` it holds for a mid-epoch checkpoint, None for the epoch's end."""

    epoch: int
    path: str
    size: int
    sha256: str
    step: int | None = None

    @property
    def position(self) -> tuple[int, int]:
        """Training order: (E, S) for S steps into epoch E, (E, END_OF_EPOCH) for its end."""
        return (self.epoch, END_OF_EPOCH if self.step is None else self.step)

    @property
    def label(self) -> str:
        return f"epoch {self.epoch}" if self.step is None else f"epoch {self.epoch} step {self.step}"


class Store(ABC):
    """Keeps verified checkpoints and the ledger safe. Implementations never log credentials."""

    @abstractmethod
    def describe(self) -> str:
        """Where this store keeps things, fit for logs (no credentials)."""

    def open(self) -> None:
        """Check access and take the run's lease; raise StoreError / LeaseHeld with one clear line."""

    def restore(self, run_dir: Path) -> bool:
        """Fill an empty local run dir from the store; True when a remote run was found."""
        return False

    @abstractmethod
    def ensure_local(self, record: CheckpointRecord, run_dir: Path) -> bool:
        """Make `record` present under run_dir with its sha256; False if it cannot be had whole."""

    def checkpoint_verified(self, record: CheckpointRecord, run_dir: Path) -> None:
        """A checkpoint was verified locally: make it durable (in the background)."""

    def ledger_changed(self, ledger_path: Path) -> None:
        """The ledger grew: mirror it (in the background)."""

    def remove_checkpoint(self, record: CheckpointRecord, run_dir: Path) -> None:
        """Retention let `record` go: delete it wherever this store keeps it."""

    def resume_uploads(self, records: list[CheckpointRecord], run_dir: Path) -> None:
        """At start: make durable any verified checkpoint an earlier session could not upload."""

    def resume_removals(self, removed: list[tuple[int, str]], run_dir: Path) -> None:
        """At start: `removed` holds the (epoch, sha256) of every checkpoint the ledger says retention
        removed; delete any of them an earlier session left in the store (in the background)."""

    def permanent_error(self) -> str | None:
        """A one-line reason background work stopped for good (bad credentials...), else None."""
        return None

    def lost_lease(self) -> bool:
        """True once another supervisor has taken the run over; the caller must stop writing."""
        return False

    def upload_rate(self) -> float | None:
        """Bytes per second of recent completed checkpoint uploads (the median of the last few); None
        until one completed, and always for a store that uploads nothing. Never waits."""
        return None

    def backlog_bytes(self) -> int:
        """Bytes of checkpoint uploads queued or in flight (of one in flight, what it has still to send);
        0 when idle, and always for a store that uploads nothing. Never waits."""
        return 0

    def writable(self, wait_s: float) -> bool:
        """False once this supervisor is known to have lost the run (fencing); asked before every
        ledger write. May wait up to wait_s for a late lease renewal to settle the question."""
        return not self.lost_lease()

    def drain(self, timeout_s: float) -> list[str]:
        """Wait up to timeout_s for pending uploads; return what did not make it (empty: all done)."""
        return []

    def close(self) -> None:
        """Release the lease and stop background work."""
