"""Several nodes (docs/distributed.md): one supervisor per node, agreeing on every attempt through the run's store.

The supervisor of node_rank 0 is the leader: it holds the run's lease and ledger, decides every attempt as on
one node, and publishes it; the others (followers) take no lease, run each published attempt on their node,
and report how it ended. torchrun's c10d rendezvous joins the nodes' groups; each attempt has its own id.

Keys under the run's root in the store, beside lease.json and ledger.jsonl:

    nodes/session.json                     the leader's session: {"session", "status", "attempt", "t"}
    nodes/plan-NNNN.json                   attempt NNNN: seed, resume point and its checkpoint, batch divisor
    nodes/attempt-NNNN/stop.json           the leader ends attempt NNNN on every node ({"why", "pause"})
    nodes/attempt-NNNN/request.json        the leader's checkpoint request, for rank 0 wherever it runs
    nodes/attempt-NNNN/node-R.json         how attempt NNNN ended on node R (NodeEnd)
    nodes/attempt-NNNN/events/SSSSSSSS.jsonl  rank 0's events, relayed in order by the follower it runs on
    nodes/attempt-NNNN/files/<path>        a checkpoint rank 0 saved on a follower, for the leader to record

c10d places global rank 0 on whichever node its rendezvous sorts first, so rank 0 may run on a follower: the
follower then relays rank 0's events (checkpoint paths made relative to the run dir, each checkpoint's bytes
uploaded and hashed first) and the leader appends them to its own events file of the attempt, after
downloading and verifying each checkpoint into its run dir; from there everything is as on one node.

Nothing here runs on the watch loop's thread: the links poll the store on threads of their own, and the loop
reads what they concluded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from supervisor.checkpoints import hash_settled
from supervisor.durable import atomic_write, sha256_file
from supervisor.faults import Fault
from supervisor.store.backend import ObjectBackend
from supervisor.store.base import CheckpointRecord, StoreError

log = logging.getLogger("supervisor")

ROOT = "nodes"
SESSION_KEY = f"{ROOT}/session.json"
POLL_S = 0.5
RUNNING = "running"
# A rank that failed because a peer went away: the other node's fault is the cause, not this one.
PEER_LOSS = re.compile(
    r"Connection closed by peer|Connection reset by peer|ECONNRESET|Broken pipe|pair closure|"
    r"RendezvousClosedError|RendezvousConnectionError|remote process exited|NCCL communicator was aborted|"
    r"the leader ended the attempt",
)


def plan_key(attempt: int) -> str:
    return f"{ROOT}/plan-{attempt:04d}.json"


def attempt_root(attempt: int) -> str:
    return f"{ROOT}/attempt-{attempt:04d}"


@dataclass(frozen=True)
class Plan:
    """Attempt `attempt` as the leader decided it; every node runs exactly this."""

    session: str
    attempt: int
    seed: int
    load_epoch: int
    batch_divisor: int
    load_step: int | None = None
    checkpoint: dict[str, Any] | None = None  # the CheckpointRecord to load (path, size, sha256, epoch, step)

    @property
    def record(self) -> CheckpointRecord | None:
        c = self.checkpoint
        return None if c is None else CheckpointRecord(c["epoch"], c["path"], c["size"], c["sha256"], c.get("step"))


@dataclass(frozen=True)
class NodeEnd:
    """How an attempt ended on one node; `detected_at` is the unix time its fault was named."""

    node: int
    fault: str | None
    detail: str = ""
    rank: int | None = None
    exit: str = ""
    detected_at: float | None = None
    failed_epoch: int = 0
    steps: int = 0
    tail: list[str] = field(default_factory=list)

    @property
    def collateral(self) -> bool:
        """Failed because another node did (a peer gone, or stopped by the leader): not the attempt's cause."""
        text = " ".join([self.detail, *self.tail])
        return self.fault is None or (self.fault == Fault.STOPPED.value and "leader" in self.detail) or bool(
            self.fault == Fault.CRASH.value and PEER_LOSS.search(text))  # fmt: skip


def cause(ends: list[NodeEnd]) -> NodeEnd | None:
    """The node whose fault ended the attempt: the earliest named fault that is not collateral; None when every
    failure only followed another (or none failed)."""
    own = [e for e in ends if e.fault is not None and not e.collateral]
    return min(own, key=lambda e: (e.detected_at is None, e.detected_at or 0.0, e.node)) if own else None


def plain(end: NodeEnd) -> str:
    """A node's fault detail without the "rank R: " its own supervisor put first."""
    return end.detail.removeprefix(f"rank {end.rank}: ") if end.rank is not None else end.detail


def _load(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class Coordination:
    """The `nodes/` keys of one run in its store (see the module doc)."""

    def __init__(self, backend: ObjectBackend):
        self.backend = backend

    def _get(self, key: str) -> dict[str, Any] | None:
        found = self.backend.get_bytes(key)
        return None if found is None else _load(found[0])

    def _put(self, key: str, value: dict[str, Any]) -> None:
        self.backend.put_bytes(key, json.dumps(value, sort_keys=True).encode())

    def session(self) -> dict[str, Any] | None:
        return self._get(SESSION_KEY)

    def set_session(self, session: str, status: str, attempt: int | None = None) -> None:
        self._put(SESSION_KEY, {"session": session, "status": status, "attempt": attempt, "t": time.time()})

    def plan(self, attempt: int) -> Plan | None:
        raw = self._get(plan_key(attempt))
        if raw is None:
            return None
        try:
            return Plan(**{k: raw[k] for k in Plan.__dataclass_fields__ if k in raw})
        except TypeError:
            return None

    def put_plan(self, plan: Plan) -> None:
        self._put(plan_key(plan.attempt), asdict(plan))

    def stop(self, attempt: int) -> dict[str, Any] | None:
        return self._get(f"{attempt_root(attempt)}/stop.json")

    def put_stop(self, attempt: int, why: str, pause: bool) -> None:
        self._put(f"{attempt_root(attempt)}/stop.json", {"why": why, "pause": pause, "t": time.time()})

    def ends(self, attempt: int) -> dict[int, NodeEnd]:
        out = {}
        for info in self.backend.list(f"{attempt_root(attempt)}/node-"):
            raw = self._get(info.key)
            if raw is None:
                continue
            with contextlib.suppress(TypeError, KeyError):
                end = NodeEnd(**{k: raw[k] for k in NodeEnd.__dataclass_fields__ if k in raw})
                out[end.node] = end
        return out

    def put_end(self, attempt: int, end: NodeEnd) -> None:
        self._put(f"{attempt_root(attempt)}/node-{end.node}.json", asdict(end))

    def request(self, attempt: int) -> bytes | None:
        found = self.backend.get_bytes(f"{attempt_root(attempt)}/request.json")
        return None if found is None else found[0]

    def put_request(self, attempt: int, data: bytes) -> None:
        self.backend.put_bytes(f"{attempt_root(attempt)}/request.json", data)

    def put_events(self, attempt: int, seq: int, lines: list[str]) -> None:
        self.backend.put_bytes(f"{attempt_root(attempt)}/events/{seq:08d}.jsonl", "".join(lines).encode())

    def events_since(self, attempt: int, after: int) -> list[tuple[int, list[str]]]:
        """The relayed event chunks numbered above `after`, in order (a gap stops the list: it is still coming)."""
        out = []
        prefix = f"{attempt_root(attempt)}/events/"
        for info in self.backend.list(prefix):
            name = info.key[len(prefix):].removesuffix(".jsonl")
            if not name.isdigit() or int(name) <= after:
                continue
            if int(name) != (out[-1][0] if out else after) + 1:
                break
            found = self.backend.get_bytes(info.key)
            if found is None:
                break
            out.append((int(name), found[0].decode(errors="replace").splitlines(keepends=True)))
        return out

    def put_file(self, attempt: int, rel: str, path: Path, sha256: str) -> None:
        self.backend.put_file(f"{attempt_root(attempt)}/files/{rel}", path, sha256)

    def get_file(self, attempt: int, rel: str, target: Path) -> bool:
        return self.backend.get_file(f"{attempt_root(attempt)}/files/{rel}", target)


class _Link(threading.Thread):
    """A thread that calls `step()` every POLL_S until closed; a store error is logged once per kind and tried
    again at the next round (the watch loop goes on meanwhile)."""

    def __init__(self, name: str):
        super().__init__(name=name, daemon=True)
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._said: set[str] = set()

    def step(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        while not self._closed.is_set():
            self.guarded()
            self._closed.wait(POLL_S)

    def guarded(self) -> None:
        with self._lock:
            try:
                self.step()
            except (StoreError, OSError, ValueError) as exc:
                kind = type(exc).__name__
                if kind not in self._said:
                    self._said.add(kind)
                    log.warning("%s: %s (trying again)", self.name, exc)

    def close(self) -> None:
        """Stop the thread, then run one last round on the caller's thread (what was written last is passed on)."""
        self._closed.set()
        self.join(timeout=30)
        self.guarded()


class LeaderLink(_Link):
    """The leader's side of one attempt: the followers' end records, rank 0's events relayed by a follower
    (appended to the attempt's own events file once their checkpoints are downloaded and verified), and the
    leader's checkpoint requests passed on."""

    def __init__(self, coord: Coordination, attempt: int, run_dir: Path, events_path: Path, request_path: Path):
        super().__init__(f"nodes (attempt {attempt})")
        self.coord, self.attempt, self.run_dir = coord, attempt, run_dir
        self.events_path, self.request_path = events_path, request_path
        self._ends: dict[int, NodeEnd] = {}
        self._seq = 0
        self._request: bytes | None = None
        self._stop_wanted: tuple[str, bool] | None = None
        self._stop_sent = False

    @property
    def ends(self) -> dict[int, NodeEnd]:
        return dict(self._ends)

    def stop_all(self, why: str, pause: bool) -> None:
        """End the attempt on every node (`pause`: their groups save first, as for a pause); sent by the thread."""
        self._stop_wanted = self._stop_wanted or (why, pause)

    def step(self) -> None:
        if self._stop_wanted is not None and not self._stop_sent:
            self.coord.put_stop(self.attempt, *self._stop_wanted)
            self._stop_sent = True
        with contextlib.suppress(FileNotFoundError):
            request = self.request_path.read_bytes()
            if request != self._request:
                self.coord.put_request(self.attempt, request)
                self._request = request
        for seq, lines in self.coord.events_since(self.attempt, self._seq):
            out = [self._localize(line) for line in lines]
            with open(self.events_path, "a", encoding="utf-8") as f:
                f.writelines(line for line in out if line)
            self._seq = seq
        self._ends = self.coord.ends(self.attempt)

    def _localize(self, line: str) -> str:
        """A relayed event as if rank 0 ran here: a checkpoint's path in this run dir, its bytes there first."""
        event = _load(line.encode())
        if event is None or event.get("event") != "checkpoint" or not isinstance(event.get("path"), str):
            return line
        rel, digest = event["path"], event.get("sha256")
        target = self.run_dir / rel
        if not (target.exists() and isinstance(digest, str) and sha256_file(target) == digest):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.relay")
            try:
                if not self.coord.get_file(self.attempt, rel, tmp) or sha256_file(tmp) != digest:
                    log.error("attempt %d: the checkpoint %s relayed by a follower is missing or does not match its "
                              "sha256: not recorded", self.attempt, rel)  # fmt: skip
                    return ""
                tmp.replace(target)
            finally:
                tmp.unlink(missing_ok=True)
        event["path"] = str(target)
        return json.dumps(event) + "\n"


class FollowerLink(_Link):
    """A follower's side of one attempt: the leader's stop and checkpoint requests, and rank 0's events when rank
    0 runs on this node (relayed in order; a checkpoint's bytes are uploaded before the event that names it)."""

    def __init__(self, coord: Coordination, attempt: int, run_dir: Path, events_path: Path, request_path: Path,
                 resolve: Any):  # fmt: skip
        super().__init__(f"nodes (attempt {attempt})")
        self.coord, self.attempt, self.run_dir = coord, attempt, run_dir
        self.events_path, self.request_path, self.resolve = events_path, request_path, resolve
        self._offset = 0
        self._seq = 0
        self._request: bytes | None = None
        self.stop: dict[str, Any] | None = None

    def step(self) -> None:
        self.stop = self.stop or self.coord.stop(self.attempt)
        request = self.coord.request(self.attempt)
        if request is not None and request != self._request:
            atomic_write(self.request_path, lambda f: f.write(request))
            self._request = request
        self._relay()

    def _relay(self) -> None:
        try:
            with open(self.events_path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1  # whole lines only: the last may still be being written
        if end == 0:
            return
        lines = [self._portable(raw) for raw in data[:end].decode(errors="replace").splitlines(keepends=True)]
        self.coord.put_events(self.attempt, self._seq + 1, [line for line in lines if line])
        self._seq += 1
        self._offset += end

    def _portable(self, line: str) -> str:
        """A checkpoint event with its path relative to the run dir, after its bytes are in the store."""
        event = _load(line.encode())
        if event is None or event.get("event") != "checkpoint" or not isinstance(event.get("path"), str):
            return line
        path = self.resolve(event["path"])
        try:
            rel = path.resolve().relative_to(self.run_dir.resolve()).as_posix()
        except ValueError:
            log.error("attempt %d: checkpoint %s is outside the run dir: it cannot be passed to the leader",
                      self.attempt, path)  # fmt: skip
            return ""
        size, digest = hash_settled(path, 0.0 if event.get("sha256") else 0.5)
        self.coord.put_file(self.attempt, rel, path, digest)
        event.update(path=rel, sha256=digest, size=size)
        return json.dumps(event) + "\n"


class Signals:
    """SIGTERM/SIGINT counted while a follower runs (the watch loop reads them)."""

    def __init__(self) -> None:
        self.count = 0
        self.first: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Signals:
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._on)
        return self

    def _on(self, signum: int, frame: object) -> None:
        self.count += 1
        self.first = self.first or signum
        log.warning("received %s: stopping this node's group, then pausing", signal.Signals(signum).name)

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def new_session() -> str:
    return uuid.uuid4().hex[:12]
