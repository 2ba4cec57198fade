"""The thread that copies a run's ledger into its trackers, and the cursor that makes the copy resumable.

Each tracker keeps a cursor in `<run_dir>/trackers/<name>.json`: how many facts of the ledger it has written,
for which target (log dir, tracking server) and which ledger (the first fact's time). A restarted supervisor
writes only what is new; a new machine (a run dir restored from the store: ledger, no cursor) replays the
whole ledger. A tracker that fails is warned about once per kind of error and tried again at the next
notify; it never stops the run, and nothing but close() ever waits on it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from supervisor.durable import atomic_write
from supervisor.ledger import read_facts

log = logging.getLogger(__name__)

CURSOR_DIR = "trackers"  # <run_dir>/trackers/<name>.json


@dataclass(frozen=True)
class RunInfo:
    """What every tracker is told about the run it writes."""

    name: str
    run_dir: Path
    params: dict[str, Any]
    unit: str  # "epochs" or "steps": what positions count
    mlflow_uri: str | None = None
    experiment: str = "supervisor"


@dataclass
class Problems:
    """One warning per (tracker, kind of error): a tracker that keeps failing does not flood the log."""

    seen: set[tuple[str, str]] = field(default_factory=set)

    def warn(self, tracker: str, kind: str, message: str) -> None:
        if (tracker, kind) in self.seen:
            log.debug("tracker %s: %s", tracker, message)
            return
        self.seen.add((tracker, kind))
        log.warning("tracker %s: %s", tracker, message)


class Tracker(ABC):
    """One tracker of a run. The sync calls open() once (again after a failure), then write() with the facts
    that follow those it holds, in ledger order; any exception means "try again from the cursor"."""

    name: ClassVar[str]
    extra: ClassVar[str]  # the pip extra that installs it: train-supervisor[<extra>]
    module: ClassVar[str]  # the import that must work

    def __init__(self, run: RunInfo, problems: Problems):
        self.run = run
        self.problems = problems

    @abstractmethod
    def target(self) -> str:
        """Where this tracker writes (no I/O): a cursor written for another target does not count here."""

    @abstractmethod
    def open(self, facts: list[dict[str, Any]], done: int) -> int:
        """Get ready to write (imports, find or create the run). The cursor says facts[:done] are written;
        returns how many of them the tracker really holds (0: replay all), after rebuilding its state from them."""

    @abstractmethod
    def write(self, facts: list[dict[str, Any]]) -> None:
        """Write the facts that follow those already held, in order, and make them durable before returning."""

    def close(self) -> None:
        """Release files and connections; also called after a failure, so it must tolerate a half-open tracker."""

    def replay(self, curves: Any, facts: list[dict[str, Any]]) -> None:
        """Rebuild `curves` (events.LiveCurves or FinalCurves) from facts already written; one of the wrong shape
        was skipped, and said, when it was written."""
        for f in facts:
            with contextlib.suppress(KeyError, TypeError, ValueError):
                curves.feed(f)

    def translate(self, curves: Any, facts: list[dict[str, Any]]) -> list[Any]:
        """What `facts` make this tracker write, through `curves`; a fact of the wrong shape is not written, and
        said once per tracker."""
        ops: list[Any] = []
        for f in facts:
            try:
                ops += curves.feed(f)
            except (KeyError, TypeError, ValueError) as exc:
                self.problems.warn(self.name, "shape", f"a {f.get('fact')!r} fact of the wrong shape ({exc!r}) is "
                                                      "not written")  # fmt: skip
        return ops


def cursor_path(run_dir: Path, name: str) -> Path:
    return run_dir / CURSOR_DIR / f"{name}.json"


def read_cursor(run_dir: Path, tracker: Tracker, facts: list[dict[str, Any]]) -> int:
    """How many facts the cursor says are written: 0 without one, or for another target or another ledger."""
    try:
        saved = json.loads(cursor_path(run_dir, tracker.name).read_text())
        done = int(saved["facts"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    if saved.get("target") != tracker.target() or not 0 <= done <= len(facts):
        return 0
    if done and saved.get("first_ts") != facts[0].get("ts"):
        return 0
    return done


def write_cursor(run_dir: Path, tracker: Tracker, facts: list[dict[str, Any]], done: int) -> None:
    body = {"facts": done, "target": tracker.target(), "first_ts": facts[0].get("ts") if facts else None}
    atomic_write(cursor_path(run_dir, tracker.name), lambda f: f.write(json.dumps(body).encode() + b"\n"))


class TrackerSync:
    """Copies the ledger into the trackers on a daemon thread: notify() returns at once, the thread re-reads
    the ledger and writes what is new; close() does a last sync and stops."""

    def __init__(self, trackers: list[Tracker], run_dir: Path):
        self.trackers = trackers
        self.run_dir = run_dir
        self._done: dict[str, int | None] = {t.name: None for t in trackers}  # None: not open
        self._first: dict[str, Any] = {}  # per tracker: the first fact's time of the ledger it holds
        self._failing: set[str] = set()
        self._ledger: Path | None = None
        self._wake = threading.Event()
        self._stopping = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.trackers]

    def start(self) -> None:
        """Start the thread (once)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="tracker-sync", daemon=True)
                self._thread.start()

    def notify(self, ledger_path: Path) -> None:
        """The ledger at `ledger_path` has new facts: sync soon. Never blocks."""
        with self._lock:
            self._ledger = ledger_path
        self._wake.set()

    def close(self, timeout_s: float = 30.0) -> bool:
        """A last sync, then stop; waits at most timeout_s. False when the trackers were still writing."""
        self.start()
        with self._lock:
            self._stopping = True
        self._wake.set()
        assert self._thread is not None
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("trackers %s still writing after %.0fs: not waiting for them", ", ".join(self.names),
                        timeout_s)  # fmt: skip
            return False
        return True

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                path, stopping = self._ledger, self._stopping
            if path is not None:
                self.sync(path)
            if stopping:
                break
        for tracker in self.trackers:
            self._close(tracker)

    def sync(self, ledger_path: Path) -> None:
        """Write the facts each tracker does not hold yet: the thread's work (call it directly only when no thread
        runs, as tests do)."""
        facts = read_facts(ledger_path)
        for tracker in self.trackers:
            try:
                self._sync_one(tracker, facts)
            except Exception as exc:  # a tracker never stops the run: say so and retry from its cursor next time
                tracker.problems.warn(tracker.name, type(exc).__name__,
                                      f"cannot write ({type(exc).__name__}: {str(exc)[:300]}); "
                                      "trying again at the next fact")  # fmt: skip
                self._close(tracker)
                self._done[tracker.name] = None
                self._failing.add(tracker.name)
                continue
            if tracker.name in self._failing:
                self._failing.discard(tracker.name)
                log.info("tracker %s: writing again", tracker.name)

    def _sync_one(self, tracker: Tracker, facts: list[dict[str, Any]]) -> None:
        done = self._done[tracker.name]
        first = facts[0].get("ts") if facts else None
        if done is not None and (done > len(facts) or first != self._first.get(tracker.name)):
            self._close(tracker)  # another ledger took this one's place: start over
            done = None
        self._first[tracker.name] = first
        if done is None:
            cursor = read_cursor(self.run_dir, tracker, facts)
            if cursor == len(facts):
                return  # nothing new: not even a connection (a restarted supervisor writes nothing twice)
            done = tracker.open(facts, cursor)
            self._done[tracker.name] = done
            if done < cursor:
                log.info("tracker %s: holds %d of the %d facts its cursor names: writing the rest again",
                         tracker.name, done, cursor)  # fmt: skip
        if done < len(facts):
            tracker.write(facts[done:])
            self._done[tracker.name] = len(facts)
            write_cursor(self.run_dir, tracker, facts, len(facts))

    @staticmethod
    def _close(tracker: Tracker) -> None:
        try:
            tracker.close()
        except Exception as exc:  # closing what already failed may fail again: nothing more to do
            log.debug("tracker %s: close failed: %r", tracker.name, exc)
