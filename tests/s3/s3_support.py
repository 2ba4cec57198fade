"""Helpers of the storage tests: a SeaweedFS server process, settings for it, a cuttable TCP proxy.

`Weed.restart()` kills the server (SIGKILL, like a crash) and starts it again on the same dir and
ports. Weed binds each service's gRPC port at port + 10000, so both must be free.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

SERVICES = ("master", "volume", "filer", "s3", "admin")
GRPC_OFFSET = 10000  # weed also binds each service's gRPC port at port + 10000


def find_weed() -> str | None:
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    return shutil.which("weed")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """`count` ports p, each with p and p + 10000 free."""
    out: list[int] = []
    while len(out) < count:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + GRPC_OFFSET < 65536 and port not in out and _port_free(port) and _port_free(port + GRPC_OFFSET):
            out.append(port)
    return out


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll `predicate` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Weed:
    binary: str
    dir: Path
    ports: dict[str, int]
    access_key: str
    secret_key: str
    bucket: str = "ckpt-tests"
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        return env

    def start(self, timeout: float = 60) -> None:
        args = [
            self.binary,
            "mini",
            f"-dir={self.dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ] + [f"-{name}.port={port}" for name, port in self.ports.items()]
        log = open(self.dir / "weed.log", "ab")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True, cwd=self.dir
        )
        log.close()
        client = self.client()

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                tail = (self.dir / "weed.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"weed exited with {self.proc.returncode}:\n{tail}")
            try:
                client.list_buckets()
                return True
            except Exception:
                return False

        wait_for(ready, timeout, "SeaweedFS to answer S3 requests", interval=0.1)

    def kill(self) -> None:
        """SIGKILL, like a crash of the machine that runs the server."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "total_max_attempts": 2}),
        )


def storage_settings(weed: Weed, prefix: str | None = None, **overrides):
    from supervisor.store.settings import StorageSettings

    values = dict(
        url=f"s3://{weed.bucket}/{prefix or uuid.uuid4().hex[:10]}",
        endpoint_url=weed.endpoint,
        region="us-east-1",
        addressing_style="path",
        multipart_threshold=8 * 1024 * 1024,
        multipart_chunksize=8 * 1024 * 1024,
        max_concurrency=4,
        retry_attempts=4,
        lease_ttl_s=30.0,
    )
    values.update(overrides)
    return StorageSettings(**values)


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target port; cut() refuses and drops connections (a partition)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_ports(1)[0]
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.heal()

    def heal(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def make_checkpoint(run_dir: Path, epoch: int, size: int = 256 * 1024, step: int | None = None):
    """Write a checkpoint file of random bytes and return its CheckpointRecord: of epoch `epoch`'s end,
    or with `step` of a mid-epoch checkpoint (named as the trainer names them)."""
    import hashlib

    from supervisor.store.base import CheckpointRecord

    name = f"epoch-{epoch:04d}.pt" if step is None else f"epoch-{epoch:04d}-step-{step:08d}.pt"
    rel = f"checkpoints/{name}"
    path = run_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)
    path.write_bytes(data)
    return CheckpointRecord(epoch=epoch, path=rel, size=size, sha256=hashlib.sha256(data).hexdigest(), step=step)


@dataclass
class Remote:
    """One store location (s3 or file) and stores opened on it; raw access for tampering."""

    kind: str
    settings: object
    weed: Weed | None = None
    stores: list = field(default_factory=list)

    def store(self, run: str, run_dir: Path | None = None, **overrides):
        """A RemoteStore for `run` (not opened), closed at the end of the test."""
        from supervisor.store.factory import open_store

        # A new validated StorageSettings (model_copy would skip validation).
        settings = type(self.settings)(**{**self.settings.model_dump(), **overrides}) if overrides else self.settings
        store = open_store(settings, run, run_dir)
        self.stores.append(store)
        return store

    def backend(self, run: str):
        """A second backend on the run's root, for reading and tampering behind the store's back."""
        return self.store(run).backend

    def close_all(self) -> None:
        for store in reversed(self.stores):
            with contextlib.suppress(Exception):
                store.close()
