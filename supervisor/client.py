"""Trainer-side helper any script can use: read the attempt's environment, append events, save
checkpoints atomically (in the background), serve the watchdog's checkpoint requests and SIGTERM,
stop at the first non-finite loss, and capture/restore every random state for an exact resume.

Torch is imported lazily, only by the functions that save or load tensors, so the watchdog that
imports this package for the protocol never pulls torch in. The API and the recipe for exact
mid-epoch resume in any script are in docs/client.md.

Under torchrun every process builds its own `Supervised`: rank 0 writes the attempt's events and its
checkpoints; another rank R writes only its `step` events and heartbeats, to its own file
(`protocol.rank_events_path`), and saves nothing. `checkpoint_requested()` is then a collective: rank 0's
decision (and any rank's SIGTERM) reaches every rank at the same step.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from supervisor import protocol as P
from supervisor.durable import atomic_write, fsync_dir, sha256_file
from supervisor.protocol import CheckpointRequest

__all__ = [
    "DEFAULT_STEP_RUN_PATTERN",
    "SIGTERM_REQUEST_ID",
    "CheckpointRequest",
    "ChecksumMismatch",
    "NonFiniteLoss",
    "SkipBatches",
    "Supervised",
    "atomic_write",
    "capture_rng",
    "fsync_dir",
    "restore_rng",
    "sha256_file",
    "snapshot",
]

# The id of the stop request a SIGTERM turns into: negative, so it never collides with the watchdog's
# ids, and not announced as `request` (the announcement carries `"reason": "sigterm"` instead).
SIGTERM_REQUEST_ID = -1

# Under torchrun: a request is sent from rank 0 to the other ranks as int64 words, the reason as UTF-8 bytes
# packed 7 to a word (non-negative, so a MAX all-reduce keeps rank 0's). Longer reasons reach them truncated.
REASON_SYNC_BYTES = 126
_REASON_WORDS = REASON_SYNC_BYTES // 7
_INT64_MIN = -(2**63)

# Step-based runs (run.toml `steps = N`): the environment names and the default checkpoint name.
ENV_UNIT = P.ENV_UNIT
ENV_STEPS = P.ENV_STEPS
ENV_CHECKPOINT_PATTERN = P.ENV_CHECKPOINT_PATTERN
UNIT_EPOCHS = P.UNIT_EPOCHS
UNIT_STEPS = P.UNIT_STEPS
DEFAULT_STEP_RUN_PATTERN = P.DEFAULT_STEP_RUN_PATTERN  # the checkpoint after S global optimizer steps


class NonFiniteLoss(RuntimeError):
    """Raised by `Supervised.step` when the loss is NaN or infinite; the attempt should end."""


class ChecksumMismatch(RuntimeError):
    """A checkpoint file's sha256 differs from the one the supervisor recorded."""


def _env_int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    return int(raw)


def _dist_group() -> Any:
    """torch.distributed when a process group of more than one process is initialized, else None. Never imports
    torch: a process that did not import torch.distributed has no group."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist if dist.get_world_size() > 1 else None


def _pack_reason(reason: str) -> list[int]:
    data = reason.encode("utf-8")[:REASON_SYNC_BYTES].ljust(REASON_SYNC_BYTES, b"\0")
    return [int.from_bytes(data[i : i + 7], "big") for i in range(0, REASON_SYNC_BYTES, 7)]


def _unpack_reason(words: list[int]) -> str:
    data = b"".join(int(w).to_bytes(7, "big") for w in words)
    return data.rstrip(b"\0").decode("utf-8", errors="ignore")


def _now() -> float:
    """Unix time rounded to the millisecond: the `t` of every event."""
    return round(time.time(), 3)


def _read_bytes(path: Path) -> bytes | None:
    """The file's bytes, or None when it cannot be read (vanished between stat and open, ...)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


@dataclass
class _Save:
    """One checkpoint save: what to write where, and how to announce it."""

    state: Any
    path: Path
    epoch: int | None  # None in a step run: the checkpoint is named by its global step alone
    step: int | None
    request: CheckpointRequest | None
    announce: bool
    stall_s: float = 0.0
    pool: Any = None  # the snapshot's tensors, handed back for reuse once written


class _HashingWriter:
    """The file object torch.save writes into: every byte goes to `f` and into a sha256 on the way,
    so the digest and size of the file come for free, without reading it back."""

    def __init__(self, f: io.BufferedIOBase) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha256.update(view)  # hashlib releases the GIL for large buffers
        self._f.write(view)
        self.size += view.nbytes
        return view.nbytes

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        # torch's writer only ever skips forward (metadata-only records); write the gap as zeros so
        # the hash and size stay those of the bytes on disk.
        target = offset if whence == io.SEEK_SET else self.size + offset if whence == io.SEEK_CUR else -1
        if target < self.size:
            raise io.UnsupportedOperation("a checkpoint stream only moves forward")
        gap = target - self.size
        while gap:
            n = min(gap, 1 << 20)
            self.write(bytes(n))
            gap -= n
        return self.size

    def tell(self) -> int:
        return self.size

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        self._f.flush()


@dataclass
class Supervised:
    """The attempt as the supervisor launched it; works unsupervised too (events go nowhere)."""

    run_dir: Path | None = None
    checkpoint_dir: Path = Path("checkpoints")
    events_path: Path | None = None
    seed: int = 0
    load_epoch: int = -1
    start_epoch: int = 0
    epochs: int | None = None
    attempt: int = 0
    batch_divisor: int = 1
    params: dict[str, Any] = field(default_factory=dict)
    load_path: Path | None = None
    load_sha256: str | None = None
    checkpoint_pattern: str = P.DEFAULT_CHECKPOINT_PATTERN
    # Mid-epoch resume: optimizer steps of `start_epoch` already trained (0: start at the epoch's beginning).
    start_step: int = 0
    # The file the watchdog writes checkpoint requests into (None: no requests but SIGTERM's).
    request_path: Path | None = None
    step_pattern: str = P.DEFAULT_STEP_PATTERN
    # Background saves copy into the previous snapshot's host buffers (no page faults, no new pinned
    # memory), at the cost of keeping one snapshot of host memory between saves. False: freed after each write.
    reuse_buffers: bool = True
    # "epochs" (run.toml `epochs = N`) or "steps" (`steps = N`: the run counts global optimizer steps; then
    # `steps` is N, `start_step` the global steps already done, and checkpoints are named by step alone).
    unit: str = UNIT_EPOCHS
    steps: int | None = None
    # Under torchrun (RANK, WORLD_SIZE): this process's global rank and the number of processes. Rank 0 writes
    # the attempt's events and checkpoints; the others their own step events and heartbeats only.
    rank: int = 0
    world_size: int = 1

    # Runtime state (not part of the attempt's description; `dataclasses.replace` starts it afresh).
    _emit_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)
    _save_thread: threading.Thread | None = field(default=None, init=False, repr=False, compare=False)
    _save_error: BaseException | None = field(default=None, init=False, repr=False, compare=False)
    _declared: bool = field(default=False, init=False, repr=False, compare=False)
    _sigterm: bool = field(default=False, init=False, repr=False, compare=False)  # a SIGTERM not yet served
    _sigterms: int = field(default=0, init=False, repr=False, compare=False)  # SIGTERMs received
    _served_id: int = field(default=-1, init=False, repr=False, compare=False)
    _request_sig: tuple[int, ...] | None = field(default=None, init=False, repr=False, compare=False)
    _request: CheckpointRequest | None = field(default=None, init=False, repr=False, compare=False)
    _buffers: dict | None = field(default=None, init=False, repr=False, compare=False)  # host buffers to reuse

    def __post_init__(self) -> None:
        if self.unit not in (UNIT_EPOCHS, UNIT_STEPS):
            raise ValueError(f"unit must be {UNIT_EPOCHS!r} or {UNIT_STEPS!r}, not {self.unit!r}")
        if self.unit == UNIT_STEPS and self.checkpoint_pattern == P.DEFAULT_CHECKPOINT_PATTERN:
            self.checkpoint_pattern = DEFAULT_STEP_RUN_PATTERN  # the epoch default names nothing in a step run

    @property
    def supervised(self) -> bool:
        return self.events_path is not None

    @property
    def is_main(self) -> bool:
        """True on rank 0 (and in a single process): the process that writes events and checkpoints."""
        return self.rank == 0

    @property
    def rank_events_path(self) -> Path | None:
        """The file this process appends to: `events_path` on rank 0, `<name>.rank-R.events.jsonl` on rank R."""
        if self.events_path is None:
            return None
        return P.rank_events_path(self.events_path, self.rank)

    @property
    def step_run(self) -> bool:
        """True in a step-based run (`unit == "steps"`): checkpoints and events count global steps."""
        return self.unit == UNIT_STEPS

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Supervised:
        """Read the SUPERVISOR_* variables; missing ones fall back to an unsupervised default."""
        env = dict(os.environ if env is None else env)
        params: dict[str, Any] = {}
        if env.get(P.ENV_PARAMS):
            params = json.loads(Path(env[P.ENV_PARAMS]).read_text(encoding="utf-8"))
        unit = (env.get(ENV_UNIT) or UNIT_EPOCHS).strip().lower()
        epochs = env.get(P.ENV_EPOCHS)
        steps = env.get(ENV_STEPS)
        load_epoch = _env_int(env, P.ENV_LOAD_EPOCH, -1)
        start_step = max(0, _env_int(env, P.ENV_START_STEP, 0))
        ckpt_dir = Path(env.get(P.ENV_CHECKPOINT_DIR) or "checkpoints")
        load_path = env.get(P.ENV_LOAD_PATH)
        request = env.get(P.ENV_CHECKPOINT_REQUEST)
        if unit == UNIT_STEPS:  # no epochs: start_step counts global steps done, the loaded checkpoint's step
            default_start = 0
            pattern = env.get(ENV_CHECKPOINT_PATTERN) or DEFAULT_STEP_RUN_PATTERN
        else:  # a mid-epoch checkpoint continues its own epoch; an epoch-end one starts the next
            default_start = load_epoch if start_step > 0 else load_epoch + 1
            pattern = env.get(ENV_CHECKPOINT_PATTERN) or P.DEFAULT_CHECKPOINT_PATTERN
        return cls(
            run_dir=Path(env[P.ENV_RUN_DIR]) if env.get(P.ENV_RUN_DIR) else None,
            checkpoint_dir=ckpt_dir,
            events_path=Path(env[P.ENV_EVENTS]) if env.get(P.ENV_EVENTS) else None,
            seed=_env_int(env, P.ENV_SEED, 0),
            load_epoch=load_epoch,
            start_epoch=_env_int(env, P.ENV_START_EPOCH, default_start),
            epochs=int(epochs) if epochs else None,
            attempt=_env_int(env, P.ENV_ATTEMPT, 0),
            batch_divisor=max(1, _env_int(env, P.ENV_BATCH_DIVISOR, 1)),
            params=params,
            step_pattern=env.get(P.ENV_STEP_PATTERN) or P.DEFAULT_STEP_PATTERN,
            load_path=Path(load_path) if load_path else None,
            load_sha256=env.get(P.ENV_LOAD_SHA256) or None,
            checkpoint_pattern=pattern,
            start_step=start_step,
            request_path=Path(request) if request else None,
            unit=unit,
            steps=int(steps) if steps else None,
            rank=max(0, _env_int(env, P.ENV_RANK, 0)),
            world_size=max(1, _env_int(env, P.ENV_WORLD_SIZE, 1)),
        )

    # -- events -----------------------------------------------------------------------------

    def emit(self, kind: str, **fields: Any) -> None:
        """Append one event line and flush it, so the watchdog sees it within its poll interval.

        Every event carries `t`, the unix time in ms (a caller's own `t` wins). Safe to call from the
        background save thread and the training thread at once: lines never interleave.
        On a rank other than 0 the line goes to that rank's own file (`rank_events_path`), and only `step`
        and `heartbeat` events are written: eval and checkpoint events of another rank are dropped.
        """
        path = self.rank_events_path
        if path is None:
            return
        if self.rank != 0 and kind not in (P.EVENT_STEP, P.EVENT_HEARTBEAT):
            return
        fields.setdefault("t", _now())
        line = P.format_event(kind, **fields)
        with self._emit_lock:
            try:
                f = open(path, "a", encoding="utf-8")  # noqa: SIM115
            except FileNotFoundError:  # a script run by hand with SUPERVISOR_EVENTS set: make its folder
                path.parent.mkdir(parents=True, exist_ok=True)
                f = open(path, "a", encoding="utf-8")  # noqa: SIM115
            with f:
                f.write(line)
                f.flush()

    def step(self, epoch: int | None = None, step: int | None = None, loss: float | None = None, **extra: Any) -> None:
        """Report a training step; raises NonFiniteLoss (after reporting it) if `loss` is NaN/inf.

        Epoch run: `step(epoch, step, loss)`, `step` the optimizer steps of `epoch` done before this one.
        Step run: `step(step=S, loss=L)`, S the global optimizer steps done counting this one (the first
        is 1); an `epoch=` given as well is written too (informational, ignored by the watchdog).
        Before reporting a non-finite loss it lets an in-flight checkpoint save finish and announce
        itself: a checkpoint announced after the fault would not count.
        """
        if step is None or loss is None:
            raise TypeError("step() needs step= and loss= (and the epoch in an epoch run: step(epoch, step, loss))")
        loss = float(loss)
        if not math.isfinite(loss):
            self._join_save()
        fields: dict[str, Any] = {} if epoch is None else {"epoch": epoch}
        self.emit(P.EVENT_STEP, **fields, step=step, loss=loss, **extra)
        if not math.isfinite(loss):
            where = f"step {step}" if epoch is None else f"epoch {epoch} step {step}"
            raise NonFiniteLoss(f"non-finite training loss {loss} at {where}")

    def eval(
        self, epoch: int | dict[str, Any] | None = None, metrics: dict[str, Any] | None = None, *,
        step: int | None = None,
    ) -> None:  # fmt: skip
        """Report evaluation metrics (the watchdog turns a non-finite one into `test nan`).

        Epoch run: `eval(epoch, metrics)`, measured at the end of `epoch`. Step run: `eval(metrics, step=S)`,
        measured after S global steps.
        """
        if isinstance(epoch, dict) and metrics is None:
            epoch, metrics = None, epoch
        if metrics is None:
            raise TypeError("eval() needs the metrics: eval(epoch, metrics) or eval(metrics, step=S)")
        fields: dict[str, Any] = {}
        if epoch is not None:
            fields["epoch"] = epoch
        if step is not None:
            fields["step"] = step
        self.emit(P.EVENT_EVAL, **fields, metrics=metrics)

    def heartbeat(self, **extra: Any) -> None:
        self.emit(P.EVENT_HEARTBEAT, **extra)

    def checkpoint_path(self, epoch: int | None = None, step: int | None = None) -> Path:
        """Epoch run: the end-of-epoch checkpoint of `epoch`, or the one `step` optimizer steps into it.
        Step run: `checkpoint_path(step=S)`, the checkpoint after S global steps (`checkpoint_pattern`)."""
        keys = {"checkpoint_dir": self.checkpoint_dir, "run_dir": self.run_dir or self.checkpoint_dir.parent}
        if self.step_run:
            if step is None:
                raise TypeError("checkpoint_path() in a step run needs step=S (global optimizer steps)")
            if epoch is not None:
                keys["epoch"] = epoch
            name = self.checkpoint_pattern.format(step=step, **keys)
        else:
            if epoch is None:
                raise TypeError("checkpoint_path() in an epoch run needs the epoch")
            pattern = self.checkpoint_pattern if step is None else self.step_pattern
            name = pattern.format(epoch=epoch, step=step, **keys)
        return self.checkpoint_dir / name  # an absolute name stays itself

    def checkpoint_done(
        self, epoch: int | None = None, path: str | os.PathLike[str] | None = None, step: int | None = None,
        **extra: Any,
    ) -> None:  # fmt: skip
        """Announce a complete checkpoint: the end of `epoch` (after its eval), or `step` optimizer steps
        into it; in a step run `checkpoint_done(step=S)`, the state after S global steps (no epoch is
        written). `extra` adds keys (sha256, size, stall_s, ...). `request=` a CheckpointRequest marks it
        served and writes its id and reason (a SIGTERM's stop: the reason alone), as `save_checkpoint` does
        for the files it writes itself."""
        request = extra.get("request")
        if isinstance(request, CheckpointRequest):
            del extra["request"]
            if request.id >= 0:
                extra["request"] = request.id
            extra.setdefault("reason", request.reason)
            self._mark_served(request)
        fields: dict[str, Any] = {}
        if not self.step_run:
            if epoch is None:
                raise TypeError("checkpoint_done() in an epoch run needs the epoch")
            fields["epoch"] = epoch
        elif step is None:
            raise TypeError("checkpoint_done() in a step run needs step=S")
        if step is not None:
            fields["step"] = step
        fields["path"] = str(path or self.checkpoint_path(epoch, step))
        self.emit(P.EVENT_CHECKPOINT, **fields, **extra)

    # -- checkpoint requests and SIGTERM ----------------------------------------------------

    def handles_requests(self) -> None:
        """Tell the watchdog, once, that this trainer serves checkpoint requests."""
        if not self._declared:
            self._declared = True
            self.heartbeat(**{P.HANDLES: [P.CAPABILITY_CHECKPOINT_REQUEST]})

    def checkpoint_requested(self, sync: bool | None = None) -> CheckpointRequest | None:
        """The checkpoint request to serve now, or None. Call it at every optimizer step.

        Cheap: one os.stat of the request file when nothing changed; the file is read and parsed only
        when its stat signature (inode, size, mtime, ctime) changed. A request counts when its id is
        newer than the last one served (by `save_checkpoint(..., request=req)`); a half-written or
        malformed file is no request. A SIGTERM caught by `install_sigterm_handler` is a stop request
        (id SIGTERM_REQUEST_ID, reason "sigterm"); with a watchdog request pending too, that request is
        returned with stop=True, so one checkpoint serves both.

        Several processes (`sync` None: when torch.distributed is initialized with more than one process;
        True: required; False: never): a collective, so every rank must call it at the same points. Rank 0
        alone reads the file; one all-reduce (MAX) of a few int64 words carries its request and every
        rank's SIGTERM flag, so all ranks get the same answer at the same step (a SIGTERM on any rank stops
        them all). The reason reaches the other ranks cut to REASON_SYNC_BYTES bytes of UTF-8.
        """
        dist = _dist_group() if sync is not False else None
        if sync and dist is None:
            raise RuntimeError("checkpoint_requested(sync=True) needs an initialized process group of 2+ processes")
        if dist is not None:
            return self._synced_request(dist)
        return self._merge_sigterm(self._poll_request_file(), self._sigterm)

    @staticmethod
    def _merge_sigterm(pending: CheckpointRequest | None, sigterm: bool) -> CheckpointRequest | None:
        if sigterm:
            if pending is not None:
                return dataclasses.replace(pending, stop=True)
            return CheckpointRequest(SIGTERM_REQUEST_ID, "sigterm", stop=True)
        return pending

    def _synced_request(self, dist: Any) -> CheckpointRequest | None:
        """One all-reduce (MAX) of [sigterm, has request, id, stop, reason words...]: rank 0 fills the request
        words, the others the lowest values, and every rank its SIGTERM flag."""
        import torch

        main = dist.get_rank() == 0
        pending = self._poll_request_file() if main else None
        words = [int(self._sigterm), 0, _INT64_MIN, 0] + [0] * _REASON_WORDS
        if pending is not None:
            words[1:] = [1, pending.id, int(pending.stop), *_pack_reason(pending.reason)]
        device = "cpu"
        if dist.get_backend() == "nccl":  # NCCL moves CUDA tensors only: the device this process drives
            device = torch.device("cuda", torch.cuda.current_device())
        t = torch.tensor(words, dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out = t.tolist()
        if out[1]:  # rank 0 keeps its own request (its whole reason goes into the announcement)
            request = pending if main else CheckpointRequest(out[2], _unpack_reason(out[4:]), bool(out[3]))
        else:
            request = None
        return self._merge_sigterm(request, bool(out[0]))

    def _poll_request_file(self) -> CheckpointRequest | None:
        if self.request_path is None:
            return None
        try:
            st = os.stat(self.request_path)
        except OSError:
            sig = None
        else:
            sig = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if sig != self._request_sig:
            self._request_sig, self._request = sig, None
            if sig is not None:
                data = _read_bytes(self.request_path)
                if data is None:  # replaced or removed between stat and open: look again next time
                    self._request_sig = None
                else:
                    self._request = CheckpointRequest.from_json(data)
        req = self._request
        return req if req is not None and req.id > self._served_id else None

    def _mark_served(self, request: CheckpointRequest) -> None:
        if request.id >= 0:
            self._served_id = max(self._served_id, request.id)
        if request.stop:  # a stop served also answers a SIGTERM
            self._sigterm = False

    def install_sigterm_handler(self) -> Any:
        """Turn the first SIGTERM into a stop request, served (checkpoint, then exit) at the next step.

        A second SIGTERM restores the default action and re-raises it: the process dies at once. Only
        the process that installed it handles it (a forked DataLoader worker dies as usual). Call it
        from the main thread (signal.signal's rule); it replaces the SIGTERM handler the script had and
        returns it.
        """
        owner = os.getpid()

        def on_sigterm(signum: int, frame: Any) -> None:
            if os.getpid() != owner or self._sigterms:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            self._sigterms += 1
            self._sigterm = True
            with contextlib.suppress(OSError):
                os.write(2, b"SIGTERM: checkpoint at the next optimizer step, then exit (again to die now)\n")

        return signal.signal(signal.SIGTERM, on_sigterm)

    # -- checkpoints (torch imported lazily) ------------------------------------------------

    def save_checkpoint(
        self,
        state: Any,
        epoch: int | None = None,
        step: int | None = None,
        request: CheckpointRequest | None = None,
        background: bool = True,
        announce: bool = True,
    ) -> Path:
        """Save `state` as the checkpoint of `epoch` (its end), or `step` optimizer steps into it (in a
        step run: `save_checkpoint(state, step=S)`, after S global steps), then announce it (with sha256,
        size, step, request, stall_s, write_s). Returns its path.

        background=True: `state` is first copied to host memory (`snapshot`: the caller may go on
        training right away), then a background thread writes it atomically (temp file, fsync,
        rename, fsync dir), hashing while writing, and announces it. At most one save is in flight:
        this call first waits for the previous one and raises its error, if any. `wait()` (or leaving
        the `with Supervised...` block) waits for the last one. background=False does it all here.
        `request` marks that request served (its id goes into the announcement).

        On a rank other than 0 nothing is saved or announced (rank 0 saves; the other ranks need not
        branch): it returns the path rank 0 writes, and marks `request` served on this rank too.
        """
        t0 = time.perf_counter()
        path = self.checkpoint_path(epoch, step)  # a missing epoch/step is a TypeError before anything happens
        if not self.is_main:
            if request is not None:
                self._mark_served(request)
            return path
        self.wait()
        job = _Save(state, path, epoch, step, request, announce)
        if not background:  # torch.save copies device tensors itself: no snapshot needed
            self._write(job, t0)
            if request is not None:
                self._mark_served(request)
            return job.path
        spare, self._buffers = self._buffers, None
        job.state, pool = _snapshot(state, spare)
        job.pool = pool if self.reuse_buffers else None
        job.stall_s = time.perf_counter() - t0
        if request is not None:  # the state it asked for is taken: served (the write's error comes at wait)
            self._mark_served(request)
        thread = threading.Thread(target=self._write_in_background, args=(job,), name="checkpoint-save")
        thread.start()  # not a daemon: the interpreter finishes the write before it exits
        self._save_thread = thread
        return job.path

    def _write(self, job: _Save, t0: float | None = None) -> None:
        """Write the job's state atomically, hashing on the way, then announce it."""
        import torch

        t_write = time.perf_counter()
        hashed: list[_HashingWriter] = []

        def write(f: io.BufferedIOBase) -> None:
            hashed.append(_HashingWriter(f))
            torch.save(job.state, hashed[-1])

        atomic_write(job.path, write)
        done = time.perf_counter()
        job.state = None  # free the snapshot now, not when the thread object goes ...
        if job.pool is not None:  # ... but for its tensors, kept for the next snapshot
            self._buffers, job.pool = job.pool, None
        if t0 is not None:  # synchronous: the caller was blocked all along
            job.stall_s = done - t0
        if job.announce:
            extra: dict[str, Any] = {"sha256": hashed[-1].sha256.hexdigest(), "size": hashed[-1].size}
            if job.request is not None:
                if job.request.id >= 0:
                    extra["request"] = job.request.id
                extra["reason"] = job.request.reason
            extra.update(stall_s=round(job.stall_s, 6), write_s=round(done - t_write, 6))
            self.checkpoint_done(job.epoch, job.path, step=job.step, **extra)

    def _write_in_background(self, job: _Save) -> None:
        try:
            self._write(job)
        except BaseException as exc:  # kept for wait(); said at once too, in case nobody waits
            self._save_error = exc
            with contextlib.suppress(Exception):
                sys.stderr.write(f"checkpoint save of {job.path} failed: {exc!r} (raised at the next wait)\n")
                sys.stderr.flush()

    def _join_save(self) -> None:
        """Wait for the in-flight save without raising its error (kept for the next `wait`)."""
        thread = self._save_thread
        if thread is not None:
            thread.join()
            self._save_thread = None

    def wait(self) -> None:
        """Wait for the in-flight background save; raise its error (an OSError naming the file, ...)."""
        self._join_save()
        error, self._save_error = self._save_error, None
        if error is not None:
            raise error

    def __enter__(self) -> Supervised:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.wait()
        else:  # let the save finish, but do not hide the exception that is leaving the block
            self._join_save()

    def resume_path(self) -> Path | None:
        """The checkpoint this attempt must load, or None for a fresh start."""
        if self.step_run:
            if self.load_path:
                return self.load_path
            return self.checkpoint_path(step=self.start_step) if self.start_step > 0 else None
        if self.load_epoch < 0:
            return None
        if self.load_path:
            return self.load_path
        return self.checkpoint_path(self.load_epoch, self.start_step or None)

    def load_checkpoint(self, map_location: Any = "cpu", weights_only: bool = True) -> Any:
        """Load the resume checkpoint after checking its sha256; None for a fresh start.

        Checkpoints may come from a bucket, so they are untrusted: weights_only=True by default.
        """
        path = self.resume_path()
        if path is None:
            return None
        if self.load_sha256:
            actual = sha256_file(path)
            if actual != self.load_sha256:
                raise ChecksumMismatch(
                    f"checkpoint {path} has sha256 {actual[:12]}..., expected {self.load_sha256[:12]}..."
                )
        import torch

        return torch.load(path, map_location=map_location, weights_only=weights_only)


# -- host snapshot ------------------------------------------------------------------------------


def snapshot(state: Any) -> Any:
    """A copy of `state` that later training cannot change: every tensor copied to host memory.

    Dicts (their type and attributes kept: a state_dict's `_metadata`), lists and tuples are walked;
    a tensor that appears twice is copied once. CUDA tensors go to pinned memory with non-blocking
    copies and one synchronize per device at the end; CPU tensors are cloned. Other values: numbers,
    strings and None are kept, anything else is deep-copied.
    """
    return _snapshot(state, None)[0]


_Pool = dict[tuple[Any, ...], list[Any]]


def _snapshot(state: Any, spare: _Pool | None) -> tuple[Any, _Pool]:
    """`snapshot`, copying into the tensors of `spare` (a previous snapshot's, same dtype, shape,
    strides and kind of memory) where it can instead of allocating: fresh host memory costs a page
    fault per 4 KiB page, which made most of the stall (0.2 s per 100 MB on a VM), and pinned memory
    is slow to allocate. Returns the copy and the pool of its tensors, for the next snapshot."""
    import torch

    spare = spare or {}
    made: _Pool = {}
    copies: dict[int, Any] = {}
    devices: set[Any] = set()

    def buffer(t: torch.Tensor, pinned: bool) -> torch.Tensor:
        key = (t.dtype, tuple(t.shape), t.stride(), pinned)
        dense = t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
        if dense and spare.get(key):
            out = spare[key].pop()
        elif pinned:
            try:
                out = torch.empty_like(t, device="cpu", pin_memory=True)
            except RuntimeError:  # no pinned memory to be had: pageable memory, still correct
                out = torch.empty_like(t, device="cpu")
        else:
            out = torch.empty_like(t, device="cpu")  # same strides as `t` when it is dense
        if dense and out.stride() == t.stride():
            made.setdefault(key, []).append(out)
        return out

    def copy_tensor(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if t.layout != torch.strided or t.device.type not in ("cpu", "cuda"):
            return t.to("cpu", copy=True)  # sparse, other devices: a plain blocking copy
        if t.device.type == "cpu":
            return buffer(t, pinned=False).copy_(t)
        devices.add(t.device)
        return buffer(t, pinned=True).copy_(t, non_blocking=True)

    def walk(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            if id(obj) not in copies:
                copies[id(obj)] = copy_tensor(obj)
            return copies[id(obj)]
        if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, torch.dtype, torch.device)):
            return obj
        if isinstance(obj, dict):
            out = copy.copy(obj)  # same type; attributes copied shallowly, walked below
            for k, v in getattr(obj, "__dict__", {}).items():
                setattr(out, k, walk(v))
            for k, v in obj.items():
                out[k] = walk(v)
            return out
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        if isinstance(obj, tuple):
            items = [walk(v) for v in obj]
            return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
        return copy.deepcopy(obj)

    out = walk(state)
    for device in devices:
        torch.cuda.synchronize(device)
    return out, made


# -- random states ------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """Every global random state: Python `random`, NumPy's legacy global generator (if NumPy is
    importable), torch's CPU generator and the generators of every CUDA device (when CUDA was
    initialised: before that, nothing has drawn from them).

    Only tensors, ints, floats, strings, None, lists and dicts: it loads with torch.load(weights_only=True).
    """
    import torch

    version, mt, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss},
        "torch": torch.get_rng_state(),
    }
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the random states `capture_rng` captured (the parts present; others are left alone)."""
    import torch

    if "python" in state:
        py = state["python"]
        random.setstate((int(py["version"]), tuple(int(x) for x in py["mt"].tolist()), py["gauss_next"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        npst = state["numpy"]
        keys = npst["keys"].numpy().astype(np.uint32)
        np.random.set_state((npst["kind"], keys, npst["pos"], npst["has_gauss"], npst["cached_gaussian"]))
    if state.get("cuda") and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


# -- resumable data order -----------------------------------------------------------------------


class SkipBatches:
    """A batch sampler for `DataLoader(batch_sampler=...)` that can start an epoch `skip` batches in.

    It wraps a batch sampler whose order is a function of (seed, epoch) only, such as
    `BatchSampler(DistributedSampler(data, num_replicas=1, rank=0, seed=seed), batch_size, drop_last)`;
    `set_epoch` is passed on to it (or to its `.sampler`). Skipped batches are skipped as lists of
    indices: no sample is loaded. `len()` is the number of batches this pass yields.
    """

    def __init__(self, batch_sampler: Any) -> None:
        self.batch_sampler = batch_sampler
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select `epoch`, whose next pass starts after its first `skip` batches."""
        for target in (self.batch_sampler, getattr(self.batch_sampler, "sampler", None)):
            if callable(getattr(target, "set_epoch", None)):
                target.set_epoch(epoch)
                break
        self.skip = max(0, skip)

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)

    def __iter__(self) -> Any:
        return itertools.islice(iter(self.batch_sampler), self.skip, None)
