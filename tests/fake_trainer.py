"""A small pure-Python trainer that speaks the supervisor protocol and injects faults on command.

Params (from SUPERVISOR_PARAMS): steps_per_epoch, step_s (sleep per step), eval (bool),
ckpt_bytes (size of each checkpoint), faults: a list of
    {"kind": K, "attempt": A, "epoch": E, "step": S}
fired when this is attempt A (any attempt if absent) at epoch E, step S. Kinds:
    nan, test_nan, cuda_error, cuda_hang, gpu_oom, cpu_oom (allocate until stopped), oom_kill
    (SIGKILL itself, as the kernel would), hang, enospc, disk_fill (fill the run dir's disk with a
    file), crash, crash_quoting_oom (a crash whose traceback quotes OOM words), exit0 (exit 0 early),
    import_error (before the first step, every attempt),
    ignore_sigterm (keep running on SIGTERM), spawn_children (start a grandchild that outlives us),
    save_on_sigterm (on SIGTERM finish the epoch at full speed, save and announce it, exit 0),
    future_mtime (at the end of epoch E: save, set the file's mtime a minute ahead so the watchdog
    cannot hash it yet, announce it, then hang), in_place (at the end of epoch E: write the checkpoint
    in place, announce it a third of the way through, finish writing over ~2 s).
Checkpoint requests (`handles_requests`: true): the trainer declares it handles them, checks
$SUPERVISOR_CHECKPOINT_REQUEST after every step, and answers a new request with a mid-epoch checkpoint
(announced with step, sha256, size, request; `save_s` sleeps that long first, `stall_s` is reported);
with `stop` it exits 0 after it. `ignore_requests`: declares it but never answers. With
SUPERVISOR_START_STEP = S it resumes S steps into SUPERVISOR_START_EPOCH.
Also: extra_events, a list of {"after_epoch": E, "event": {...}} written as is after epoch E's
checkpoint ("{checkpoint_dir}" in a string value is filled in); raw_lines, strings appended to the
events file before the first step of attempt 0.
The checkpoint holds a "state" that depends on every (seed, epoch, step) it went through, so tests can
check that resumes load the right file and that a paused and resumed run ends where an uninterrupted
one does.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

from supervisor import protocol as P
from supervisor.client import NonFiniteLoss, Supervised, atomic_write, sha256_file


class Requests:
    """Reads the watchdog's checkpoint requests by hand (the protocol, not the client helper)."""

    def __init__(self, path: str | None):
        self.path = path
        self.served = 0
        self.signature = None

    def poll(self) -> P.CheckpointRequest | None:
        if not self.path:
            return None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        if signature == self.signature:
            return None
        self.signature = signature
        with open(self.path, "rb") as f:
            request = P.CheckpointRequest.from_json(f.read())
        if request is None or request.id <= self.served:
            return None
        self.served = request.id
        return request


def fault_at(faults: list[dict], attempt: int, epoch: int, step: int) -> str | None:
    for f in faults:
        if f.get("attempt", attempt) == attempt and f.get("epoch") == epoch and f.get("step", 0) == step:
            return f["kind"]
    return None


def evidence(sup: Supervised, kind: str) -> None:
    """Note when a fault's evidence appeared, for the detection-latency benchmark."""
    with open(sup.run_dir / "evidence.jsonl", "a") as f:
        f.write(json.dumps({"attempt": sup.attempt, "kind": kind, "t": time.time()}) + "\n")


def main() -> int:
    sup = Supervised.from_env()
    p = sup.params
    steps = int(p.get("steps_per_epoch", 3))
    step_s = float(p.get("step_s", 0.01))
    faults = list(p.get("faults", []))
    epochs = sup.epochs or int(p.get("epochs", 3))
    if any(f["kind"] == "import_error" for f in faults):
        sys.stderr.write("ModuleNotFoundError: No module named 'missing_dependency'\n")
        return 1
    if any(f["kind"] == "ignore_sigterm" for f in faults):
        signal.signal(signal.SIGTERM, lambda *a: sys.stderr.write("fake trainer: ignoring SIGTERM\n"))
    asked_to_stop = []
    if any(f["kind"] == "save_on_sigterm" for f in faults):
        signal.signal(signal.SIGTERM, lambda *a: asked_to_stop.append(True))
    if p.get("raw_lines") and sup.events_path is not None and sup.attempt == 0:
        with open(sup.events_path, "a") as f:
            f.write("".join(line + "\n" for line in p["raw_lines"]))
    with open(sup.run_dir / "pids.txt", "a") as f:
        f.write(f"{os.getpid()}\n")
    if any(f["kind"] == "spawn_children" for f in faults):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
        with open(sup.run_dir / "pids.txt", "a") as f:
            f.write(f"{child.pid}\n")

    state = "init"
    start_step = int(os.environ.get(P.ENV_START_STEP) or 0)
    if sup.load_epoch >= 0:
        path = sup.load_path or sup.checkpoint_path(sup.load_epoch)
        if sup.load_sha256 and sha256_file(path) != sup.load_sha256:
            sys.stderr.write(f"checksum mismatch for {path}\n")
            return 4
        ckpt = json.loads(path.read_text())
        assert ckpt["epoch"] == sup.load_epoch, (ckpt["epoch"], sup.load_epoch)
        assert ckpt.get("step", 0) == start_step, (ckpt.get("step"), start_step)
        state = ckpt["state"]
    requests = Requests(os.environ.get(P.ENV_CHECKPOINT_REQUEST)) if p.get("handles_requests") else Requests(None)
    if p.get("handles_requests") or p.get("ignore_requests"):
        sup.emit(P.EVENT_HEARTBEAT, handles=[P.CAPABILITY_CHECKPOINT_REQUEST])
    print(f"fake trainer: attempt {sup.attempt} seed {sup.seed} from epoch {sup.start_epoch} step {start_step} "
          f"divisor {sup.batch_divisor}", flush=True)  # fmt: skip
    hog = []
    for epoch in range(sup.start_epoch, epochs):
        for step in range(start_step if epoch == sup.start_epoch else 0, steps):
            kind = fault_at(faults, sup.attempt, epoch, step)
            loss = 1.0 / (1 + epoch + step / steps)
            if kind and kind not in ("hang", "cpu_oom", "disk_fill"):
                evidence(sup, kind)
            if kind == "nan":
                loss = float("nan")
            elif kind == "crash":
                raise RuntimeError("fake trainer: injected crash")
            elif kind == "crash_quoting_oom":  # the traceback quotes this line: code, not evidence
                raise ValueError("fake trainer: injected crash")  # not a torch.OutOfMemoryError: CUDA out of memory
            elif kind == "exit0":
                return 0
            elif kind in ("cuda_error", "cuda_hang"):
                sys.stderr.write("RuntimeError: CUDA error: device-side assert triggered\n")
                sys.stderr.write("CUDA kernel errors might be asynchronously reported at some other API call\n")
                sys.stderr.flush()
                if kind == "cuda_hang":
                    time.sleep(3600)
                return 1
            elif kind == "gpu_oom":
                sys.stderr.write("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. "
                                 f"GPU 0 has a total capacity of 15.77 GiB (divisor {sup.batch_divisor})\n")
                return 1
            elif kind == "enospc":
                sys.stderr.write("OSError: [Errno 28] No space left on device\n")
                return 1
            elif kind == "disk_fill":
                with open(sup.run_dir / "filler.bin", "wb") as f:
                    f.truncate(0)
                    f.write(b"\0" * (64 << 20))
                time.sleep(3600)
            elif kind == "cpu_oom":
                while True:
                    hog.append(bytearray(32 << 20))
                    time.sleep(0.01)
            elif kind == "oom_kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif kind == "hang":
                time.sleep(3600)
            if not asked_to_stop:
                time.sleep(step_s)
            state = hashlib.sha256(f"{state}|{sup.seed}|{epoch}|{step}".encode()).hexdigest()[:16]
            try:
                sup.step(epoch, step, loss, t=time.time())
            except NonFiniteLoss as exc:
                sys.stderr.write(f"fake trainer: {exc}\n")
                return 3
            if (request := requests.poll()) is not None:
                save_mid_epoch(sup, p, epoch, step + 1, state, request)
                if request.stop:
                    print(f"fake trainer: stopped at epoch {epoch} step {step + 1} on request", flush=True)
                    return 0
        if p.get("eval", True):
            value = 0.5 + epoch / 100
            if fault_at(faults, sup.attempt, epoch, -1) == "test_nan":
                value = float("nan")
                evidence(sup, "test_nan")
            sup.eval(epoch, {"AP50": value, "VOCmAP": value - 0.01})
        body = json.dumps({"epoch": epoch, "seed": sup.seed, "state": state}).encode()
        pad = b" " * max(0, int(p.get("ckpt_bytes", 0)) - len(body))
        kind = fault_at(faults, sup.attempt, epoch, -1)
        if kind == "in_place":
            write_in_place(sup, epoch, body + pad)
        else:
            path = atomic_write(sup.checkpoint_path(epoch), lambda f, b=body + pad: f.write(b))
            if kind == "future_mtime":
                ahead = time.time() + 60
                os.utime(path, (ahead, ahead))
            sup.checkpoint_done(epoch, path)
            if kind == "future_mtime":
                time.sleep(3600)
        for extra in p.get("extra_events", []):
            if extra.get("after_epoch") == epoch:
                event = {k: v.replace("{checkpoint_dir}", str(sup.checkpoint_dir)) if isinstance(v, str) else v
                         for k, v in extra["event"].items()}  # fmt: skip
                with open(sup.events_path, "a") as f:
                    f.write(json.dumps(event) + "\n")
        if asked_to_stop:
            print(f"fake trainer: saved epoch {epoch} after SIGTERM", flush=True)
            return 0
    return 0


def save_mid_epoch(sup: Supervised, p: dict, epoch: int, step: int, state: str, request: P.CheckpointRequest) -> None:
    """The checkpoint `step` steps into `epoch`, written atomically, announced with its sha256."""
    t0 = time.time()
    time.sleep(float(p.get("save_s", 0.0)))
    body = json.dumps({"epoch": epoch, "step": step, "seed": sup.seed, "state": state}).encode()
    data = body + b" " * max(0, int(p.get("ckpt_bytes", 0)) - len(body))
    path = atomic_write(sup.checkpoint_dir / P.checkpoint_name(epoch, step=step), lambda f: f.write(data))
    digest = hashlib.sha256(data).hexdigest()
    sup.emit(P.EVENT_CHECKPOINT, epoch=epoch, step=step, path=str(path), sha256=digest, size=len(data),
             request=request.id, stall_s=round(time.time() - t0, 4), write_s=0.0, t=time.time())  # fmt: skip


def write_in_place(sup: Supervised, epoch: int, data: bytes) -> None:
    """Against the protocol: announce a checkpoint while it is still being written in place."""
    path = sup.checkpoint_path(epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    third = len(data) // 3
    with open(path, "wb") as f:
        f.write(data[:third])
        f.flush()
        sup.checkpoint_done(epoch, path)
        for i in range(10):
            time.sleep(0.2)
            f.write(data[third + i * (len(data) - third) // 10 : third + (i + 1) * (len(data) - third) // 10])
            f.flush()


if __name__ == "__main__":
    sys.exit(main())
