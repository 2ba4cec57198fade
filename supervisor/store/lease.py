"""One writer per run: a lease object beside the run, taken and renewed with conditional writes.

take:      put lease.json only if absent (IfNoneMatch="*")
renew:     every ttl/3, put it again only if its etag is still ours (IfMatch)
take over: a lease not renewed for its ttl (by its holder's clock), a released one, or one left
           by a dead supervisor of this same run dir on this same machine, is replaced with
           IfMatch on the etag just read, so of two contenders exactly one wins
fencing:   a renewal refused because another holder wrote the lease makes `lost` True at once;
           `held()` is False from then on, and also while renewals have failed for most of the ttl
vanished:  a renewal that finds no lease object creates it again (IfNoneMatch="*"): still ours if
           that works, lost if another supervisor created it first, or if we were out of touch
           for most of the ttl (someone may have driven the run meanwhile)
release:   overwrite with a released marker (IfMatch), so the next start takes it at once
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from supervisor.store.backend import ObjectBackend, PreconditionFailed, TransientStoreError
from supervisor.store.base import LeaseHeld, StoreError

log = logging.getLogger(__name__)

LEASE_KEY = "lease.json"
# Fraction of the ttl after the last successful renewal until which we still count as holder;
# the margin covers clock skew between us and a machine that judges the lease stale.
HELD_FRACTION = 0.8


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class LeaseInfo:
    """The content of lease.json."""

    run: str
    holder: str
    pid: int
    host: str
    boot_id: str
    run_dir: str
    acquired_at: float
    renewed_at: float
    ttl_s: float
    released: bool = False

    @classmethod
    def parse(cls, data: bytes) -> LeaseInfo | None:
        try:
            raw = json.loads(data)
            return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})
        except (ValueError, TypeError, KeyError):
            return None

    def dump(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()


class Lease:
    """The lease of one run, held by this process while a supervisor drives the run."""

    def __init__(
        self,
        backend: ObjectBackend,
        run: str,
        ttl_s: float,
        run_dir: Path | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.run = run
        self.ttl_s = ttl_s
        self.run_dir = str(Path(run_dir).resolve()) if run_dir is not None else ""
        self.clock = clock
        self.holder = uuid.uuid4().hex[:12]
        self.host = socket.gethostname()
        self._boot_id = _boot_id()
        self._etag: str | None = None
        self._acquired_at = 0.0
        self._renewed_mono = float("-inf")
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- state --------------------------------------------------------------------------------

    @property
    def lost(self) -> bool:
        """True once another holder wrote the lease: stop writing at once."""
        return self._lost.is_set()

    def held(self) -> bool:
        """True while writes are safe: not lost, and renewed within most of the ttl."""
        with self._lock:
            fresh = time.monotonic() - self._renewed_mono < self.ttl_s * HELD_FRACTION
        return fresh and not self.lost

    def _document(self, released: bool = False) -> bytes:
        now = self.clock()
        return LeaseInfo(
            run=self.run,
            holder=self.holder,
            pid=os.getpid(),
            host=self.host,
            boot_id=self._boot_id,
            run_dir=self.run_dir,
            acquired_at=self._acquired_at or now,
            renewed_at=now,
            ttl_s=self.ttl_s,
            released=released,
        ).dump()

    def _mark_renewed(self, etag: str, started: float) -> None:
        with self._lock:
            self._etag = etag
            self._renewed_mono = started

    # -- take ---------------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lease or raise LeaseHeld naming the holder, its host and its last renewal."""
        for _ in range(5):
            started = time.monotonic()
            self._acquired_at = self.clock()
            try:
                self._mark_renewed(self.backend.put_bytes(LEASE_KEY, self._document(), if_none_match=True), started)
                log.info("took the lease of run %s (holder %s)", self.run, self.holder)
                return
            except PreconditionFailed:
                pass
            current = self.backend.get_bytes(LEASE_KEY)
            if current is None:
                continue  # released and deleted meanwhile: try again
            data, etag = current
            info = LeaseInfo.parse(data)
            if info is not None and info.holder == self.holder:  # our own write, answer lost
                self._mark_renewed(etag, started)
                return
            reason = self._stale_reason(info)
            if reason is None:
                assert info is not None
                raise LeaseHeld(self._held_message(info))
            try:
                self._mark_renewed(self.backend.put_bytes(LEASE_KEY, self._document(), if_match=etag), started)
            except PreconditionFailed:
                continue  # someone else moved first: look again
            log.warning("took over the lease of run %s from %s: %s", self.run, _who(info), reason)
            return
        raise StoreError(f"could not take the lease of run {self.run}: it keeps changing; try again")

    def _stale_reason(self, info: LeaseInfo | None) -> str | None:
        """Why the current lease may be taken over, or None if it is live."""
        if info is None:
            return "the lease object was unreadable"
        if info.released:
            return "it was released"
        age = self.clock() - info.renewed_at
        if age > info.ttl_s:
            return f"not renewed for {age:.0f}s (ttl {info.ttl_s:.0f}s)"
        same_dir = bool(self.run_dir) and info.run_dir == self.run_dir
        if same_dir and info.host == self.host and info.boot_id == self._boot_id and not _pid_alive(info.pid):
            return f"its supervisor (pid {info.pid}) on this machine is gone"
        return None

    def _held_message(self, info: LeaseInfo) -> str:
        age = max(0.0, self.clock() - info.renewed_at)
        left = max(0.0, info.ttl_s - age)
        return (
            f"run {self.run!r} is driven by another supervisor: {_who(info)}, lease renewed {age:.0f}s ago; "
            f"stop it there, or if that machine is gone start again in {left:.0f}s when the lease expires"
        )

    # -- keep ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Renew in a background thread every ttl/3 until stop()."""
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.run}", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        interval = self.ttl_s / 3
        while not self._stop.wait(interval):
            try:
                if not self.renew():
                    return
            except Exception:  # a bug must not end renewals silently: held() would fence us for good
                log.exception("renewing the lease of run %s failed unexpectedly; trying again", self.run)

    def renew(self) -> bool:
        """Renew once; False when the lease is lost (renewals end). Transient faults are logged.

        A lease object that vanished (deleted by hand or by a lifecycle rule) is created again if
        absent: that keeps it ours; if another supervisor created it first, the lease is lost.
        """
        started = time.monotonic()
        with self._lock:
            etag = self._etag
        refused: StoreError | None = None
        try:
            self._mark_renewed(self.backend.put_bytes(LEASE_KEY, self._document(), if_match=etag), started)
            return True
        except PreconditionFailed:
            pass
        except TransientStoreError as exc:
            log.warning("could not renew the lease of run %s: %s; trying again", self.run, exc)
            return True
        except StoreError as exc:
            refused = exc  # some servers answer IfMatch on a missing object with 404: look first
        try:
            current = self.backend.get_bytes(LEASE_KEY)
        except StoreError as exc:
            log.warning("could not read the lease of run %s: %s; trying again", self.run, exc)
            return True
        if current is None:
            if self.held():
                return self._recreate(started)
            # Out of touch for most of the ttl: another supervisor may have taken over meanwhile and
            # its lease object vanished too, so creating ours again could undo its work.
            self._lost.set()
            log.error(
                "lost the lease of run %s: its lease object vanished while this supervisor could not renew it; "
                "another one may have driven the run meanwhile, so this one stops writing",
                self.run,
            )
            return False
        if refused is not None:
            log.warning("could not renew the lease of run %s: %s; trying again", self.run, refused)
            return True
        info = LeaseInfo.parse(current[0])
        if info is not None and info.holder == self.holder:
            self._mark_renewed(current[1], started)  # our previous renewal landed, its answer did not
            return True
        self._lost.set()
        who = _who(info) if info else "a writer whose lease object is unreadable"
        log.error("lost the lease of run %s: now held by %s; this supervisor stops writing", self.run, who)
        return False

    def _recreate(self, started: float) -> bool:
        """The lease object is gone: create it again only if still absent; False if another won."""
        try:
            etag: str | None = self.backend.put_bytes(LEASE_KEY, self._document(), if_none_match=True)
        except PreconditionFailed:
            etag = None
        except StoreError as exc:
            log.warning("the lease object of run %s vanished; re-creating it failed: %s", self.run, exc)
            return True
        info = None
        if etag is None:
            try:
                current = self.backend.get_bytes(LEASE_KEY)
            except StoreError as exc:  # undecided: the next renewal looks again
                log.warning("could not read the lease of run %s: %s; trying again", self.run, exc)
                return True
            if current is None:
                return True  # gone again: the next renewal creates it
            info = LeaseInfo.parse(current[0])
            if info is not None and info.holder == self.holder:
                etag = current[1]  # an earlier try of our own create landed, its answer did not
        if etag is not None:
            self._mark_renewed(etag, started)
            log.warning("the lease object of run %s vanished from %s; re-created it", self.run, self.backend.describe())
            return True
        self._lost.set()
        who = _who(info) if info else "another supervisor"
        log.error(
            "lost the lease of run %s: its lease object vanished and %s created a new one first; "
            "this supervisor stops writing",
            self.run,
            who,
        )
        return False

    def stop(self, release: bool = True) -> None:
        """Stop renewing; with release, mark the lease free (only if it is still ours)."""
        self._stop.set()
        if self._thread is not None:  # a renewal stuck on a store that does not answer is abandoned (daemon)
            self._thread.join(timeout=5 if self.held() else 0.5)
        if not release or self.lost:
            return
        with self._lock:
            etag = self._etag
        if etag is None:
            return
        with contextlib.suppress(StoreError, PreconditionFailed):
            self.backend.put_bytes(LEASE_KEY, self._document(released=True), if_match=etag)
            log.info("released the lease of run %s", self.run)


def _who(info: LeaseInfo) -> str:
    return f"holder {info.holder} (pid {info.pid} on host {info.host})"
