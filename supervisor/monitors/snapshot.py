"""Zero-code mode for scripts that keep ONE checkpoint file (`[checkpoints] file`): every complete save of
that file becomes a checkpoint of the run, copied into the checkpoint dir under `[checkpoints] pattern`.

    script overwrites out/ckpt.pt --> settled (held still settle_s, or the script exited 0)
        --> copied (sha256 while copying; the source must not change meanwhile) --> named by the run's position

In a run of steps, a torch checkpoint that records its own step (a top-level whole number under one of
STEP_KEYS: nanoGPT's `iter_num`, Lightning's `global_step`) is named by it; read without torch and without running
any of the pickle's code. Otherwise the position (epoch or step) of a save is the last one the script's output
named before the save's mtime (`note_key`), else the order of saves. In a run of steps the copy is a checkpoint
at once. In a run of epochs a script may save several times per epoch, so the copy of epoch E counts only once
the output has moved past E (or the script exited 0); a later save of E replaces it, and one still pending when
the script dies is dropped.
Copies run on one worker thread: the watch loop never waits on a large file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import pickle
import shutil
import tempfile
import time
import zipfile
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from supervisor.durable import TMP_SUFFIX, atomic_write, fsync_dir

log = logging.getLogger("supervisor")

Signature = tuple[int, int, int]  # size, mtime_ns, inode
# A file's mtime comes from the kernel's coarse clock (up to a tick, 4-10 ms, behind the time) and a line is stamped
# when our pump reads it: when no line before the save's mtime names a new position, one read up to this long after
# it is taken as the save's own (read late). Short: a fast loop prints its next steps within tens of ms.
LINE_SLACK_S = 0.02
# Top-level keys of a checkpoint dict that hold the number of optimizer steps done (first found wins).
STEP_KEYS = ("global_step", "iter_num", "step", "iteration", "num_updates")
MAX_PICKLE_BYTES = 64 << 20  # a data.pkl larger than this is not read for a step


class Changed(OSError):
    """The source file changed while it was copied: a newer save is on its way."""


def signature(path: Path) -> Signature | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def looks_complete(path: Path) -> bool:
    """False for a zip archive (torch.save's format) without its central directory: a save cut short.
    Files in other formats cannot be judged and pass."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                return True
        return zipfile.is_zipfile(path)
    except OSError:
        return False


class _Opaque:
    """Whatever a checkpoint's pickle names (tensors, classes, functions) becomes this: inert, never imported."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass

    def __setitem__(self, key, value) -> None:  # an OrderedDict's items (a state_dict)
        pass

    def append(self, value) -> None:
        pass

    def extend(self, values) -> None:
        pass


class _Inert(pickle.Unpickler):
    """Unpickles the plain containers and numbers of a checkpoint; every global is _Opaque and every stored tensor
    None, so nothing is imported or run (the pattern of the pickle docs' "Restricting Globals")."""

    def find_class(self, module: str, name: str):
        return _Opaque

    def persistent_load(self, pid):
        return None


def recorded_step(path: Path) -> int | None:
    """The step a torch zip checkpoint records of itself (STEP_KEYS at the top level of its dict), else None."""
    try:
        with zipfile.ZipFile(path) as z:
            info = next((i for i in z.infolist() if i.filename.endswith("data.pkl")
                         and i.filename.count("/") <= 1), None)  # fmt: skip
            if info is None or info.file_size > MAX_PICKLE_BYTES:
                return None
            state = _Inert(io.BytesIO(z.read(info))).load()
    except Exception:  # any file that is no readable torch checkpoint: not named by its content
        return None
    if not isinstance(state, dict):
        return None
    for key in STEP_KEYS:
        value = state.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def copy_settled(source: Path, folder: Path, sig: Signature) -> tuple[Path, int, str]:
    """Copy `source` (expected at signature `sig`) to a temp file in `folder`, hashing as it goes; fsynced.
    Raises Changed when the source is not at `sig` after the copy (the temp file is removed)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{source.name}.snapshot.", suffix=TMP_SUFFIX, dir=folder)
    h, size = hashlib.sha256(), 0
    try:
        with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
            while block := src.read(1 << 20):
                h.update(block)
                dst.write(block)
                size += len(block)
            dst.flush()
            os.fsync(dst.fileno())
        if signature(source) != sig or size != sig[0]:
            raise Changed(f"{source} changed while it was copied")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return Path(tmp), size, h.hexdigest()


@dataclass(frozen=True)
class Snapshot:
    """A complete save of the script's file, copied to `path` (final name) with its size and sha256."""

    key: int
    path: Path
    size: int
    sha256: str


@dataclass(frozen=True)
class _Copy:
    mtime: float  # unix time of the save
    tmp: Path
    size: int
    sha256: str
    recorded: int | None = None  # the step the checkpoint records of itself (runs of steps)


class FileSnapshots:
    """Turns the saves of one checkpoint file into checkpoints of the run (see the module doc).

    `dest(key)` is the checkpoint path of a position; `keys` the positions this attempt may produce (a save
    named outside it, such as the script saving again the point it resumed from, is skipped). `by_epoch`: the
    run counts epochs (copies of an epoch count once the output moved past it).

    The position of a save: in a run of steps the step it records of itself (`recorded_step`), if any; else the
    last one the output named before the save's mtime; in a run of steps, when that one is held already, the
    first new one named within LINE_SLACK_S after it (the save's own line, read late), else it repeats the held
    position (a script that saves again the step it resumed from) and is skipped.
    """

    def __init__(self, source: Path, settle_s: float, dest: Callable[[int], Path], keys: range, by_epoch: bool):
        self.source = source
        self.settle_s = settle_s
        self.dest = dest
        self.keys = keys
        self.by_epoch = by_epoch
        self._baseline: Signature | None = None
        self._taken: set[Signature] = set()  # signatures copied or being copied
        self._seen: tuple[Signature, float] | None = None  # a changed signature and when it was first seen
        self._history: deque[tuple[float, int]] = deque(maxlen=4096)  # (unix time, position) the output named
        self._order = keys.start - 1  # the position of the last save
        self._done: set[int] = set()
        self._copies: list[_Copy] = []  # copied, position not yet known
        self._pending: dict[int, tuple[_Copy, float]] = {}  # by_epoch: copies awaiting the next epoch
        self._jobs: list[tuple[float, Future]] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot")

    def baseline(self) -> None:
        """The file as it is before the attempt starts (restored for a resume, or left by earlier work)."""
        self._baseline = signature(self.source)

    def note_key(self, key: int, at: float) -> None:
        """The script's output named position `key` at unix time `at` (when the line was read)."""
        if not self._history or key != self._history[-1][1]:
            self._history.append((at, key))

    def poll(self, final: bool = False, alive: bool = True, cutoff: float | None = None) -> list[Snapshot]:
        """Snapshots ready now. `final`: the script exited 0 (nothing it wrote is still being written). `alive`
        False: it is gone (every line it printed was read; a save that merely holds still may be one cut short by
        its death, so only saves the output moved past count). `cutoff`: the unix time a fault of the script was
        named; saves after it do not count."""
        ended = final or not alive
        self._watch(final, alive, cutoff)
        self._harvest(wait=ended)
        ready = []
        while self._copies:
            copy = self._copies[0]
            key = copy.recorded if copy.recorded is not None else self._key_for(copy.mtime, ended)
            if key is None:
                break  # the output has not named it yet
            self._copies.pop(0)
            if key not in self.keys or (not self.by_epoch and key <= self._order) or key in self._done:
                log.info("%s saved at %s %d, not after this attempt's start or the previous save: not a new "
                         "checkpoint", self.source, "epoch" if self.by_epoch else "step", key)  # fmt: skip
                _unlink(copy.tmp)
                continue
            self._order = max(self._order, key)
            if self.by_epoch and self._history:  # named by the output: wait until it moves past the epoch
                if key in self._pending:  # a later save of the same epoch replaces the earlier one
                    _unlink(self._pending[key][0].tmp)
                self._pending[key] = (copy, copy.mtime)
            else:
                ready.append(self._place(key, copy))
        for key in sorted(self._pending):
            copy, mtime = self._pending[key]
            if final or any(k > key and at > mtime + LINE_SLACK_S for at, k in self._history):  # moved past it
                del self._pending[key]
                ready.append(self._place(key, copy))
        return ready

    def _key_for(self, mtime: float, ended: bool) -> int | None:
        """The position of a save written at `mtime`; None while the output has not named it yet."""
        before = near = after = None
        for at, k in self._history:
            if at <= mtime:
                before = k
            elif at <= mtime + LINE_SLACK_S:
                near = k if near is None else near
            elif after is None:
                after = k
        if self.by_epoch:
            if near is not None and (before is None or near > before):
                return near  # the save's own line ("epoch 3: ...", then the save) read a little late
            return next((k for k in (before, after) if k is not None), self._order + 1 if ended else None)
        if before is not None and before > self._order:
            return before
        if near is not None and near > self._order:
            return near  # the save's own line, read a little late
        if before is not None:
            return before  # the position held already (the point it resumed from, the last save): a repeat
        if after is not None and after > self._order:
            return after  # no line before the save at all: the first position named after it
        if ended or not self._history:
            return self._order + 1  # the output names no position: the order of saves
        return None

    def _moved_past(self, mtime: float) -> bool:
        """The output named a later position after the save: a script that saves synchronously finished it."""
        named = None
        for at, k in self._history:
            if at <= mtime + LINE_SLACK_S:
                named = k
            elif named is None or k > named:
                return True
        return False

    def _watch(self, final: bool, alive: bool, cutoff: float | None) -> None:
        sig = signature(self.source)
        if sig is None or sig == self._baseline or sig in self._taken:
            return
        if self.source.is_dir():
            self._taken.add(sig)
            log.error("%s is a folder, not a file: [checkpoints] file takes the one file a script overwrites (a "
                      "script that saves folders needs protocol mode or an integration, docs/your-script.md)",
                      self.source)  # fmt: skip
            return
        mtime = sig[1] / 1e9
        if cutoff is not None and mtime >= cutoff:
            return  # written after the script's fault: does not count
        now = time.monotonic()
        if self._seen is None or self._seen[0] != sig:
            self._seen = (sig, now)
        settled = alive and now - self._seen[1] >= self.settle_s
        if not (final or settled or self._moved_past(mtime)):
            return
        if not looks_complete(self.source):
            if final:
                self._taken.add(sig)
                log.warning("%s is not a complete archive (a save cut short?): not taken as a checkpoint",
                            self.source)  # fmt: skip
            return
        self._taken.add(sig)
        folder = self.dest(self.keys.start).parent
        folder.mkdir(parents=True, exist_ok=True)
        self._jobs.append((mtime, self._pool.submit(self._copy, folder, sig)))

    def _copy(self, folder: Path, sig: Signature) -> tuple[Path, int, str, int | None]:
        tmp, size, digest = copy_settled(self.source, folder, sig)
        return tmp, size, digest, None if self.by_epoch else recorded_step(tmp)

    def _harvest(self, wait: bool) -> None:
        while self._jobs and (wait or self._jobs[0][1].done()):
            mtime, job = self._jobs.pop(0)
            try:
                tmp, size, digest, recorded = job.result()
            except Changed:
                log.info("%s changed while it was copied: waiting for the newer save", self.source)
                continue
            except OSError as exc:
                log.error("cannot copy %s into the checkpoint dir (%s): this save is not a checkpoint", self.source,
                          exc.strerror or exc)  # fmt: skip
                continue
            self._copies.append(_Copy(mtime, tmp, size, digest, recorded))

    def _place(self, key: int, copy: _Copy) -> Snapshot:
        self._done.add(key)
        path = self.dest(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(copy.tmp, path)
        fsync_dir(path.parent)
        return Snapshot(key, path, copy.size, copy.sha256)

    def close(self) -> None:
        """Stop copying; copies not placed are removed (a save of an epoch the output never moved past)."""
        self._pool.shutdown(wait=True)
        self._harvest(wait=True)
        for copy in [*self._copies, *(c for c, _ in self._pending.values())]:
            _unlink(copy.tmp)
        self._copies.clear()
        self._pending.clear()


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def restore(snapshot: Path, target: Path) -> None:
    """Put a verified checkpoint back where the script expects its file (atomically: a reader sees the old file
    or the whole snapshot)."""
    with open(snapshot, "rb") as src:
        atomic_write(target, lambda dst: shutil.copyfileobj(src, dst, 1 << 20))
