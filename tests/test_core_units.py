"""Small pure pieces: protocol parsing, the fault classifiers, the ledger fold, the shim."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys

import pytest

from supervisor import ledger as L
from supervisor import protocol as P
from supervisor.client import Supervised, atomic_write, sha256_file
from supervisor.faults import Fault, classify_exit, classify_line, classify_tail
from supervisor.monitors.events import EventTail


@pytest.mark.parametrize(
    "line, finite",
    [
        ('{"event":"step","epoch":1,"step":2,"loss":0.5}', True),
        ('{"event":"step","epoch":1,"step":2,"loss":NaN}', False),
        ('{"event":"step","epoch":1,"step":2,"loss":Infinity}', False),
        ('{"event":"step","epoch":1,"step":2,"loss":-Infinity}', False),
        ('{"event":"step","epoch":1,"step":2,"loss":"nan"}', False),
        ('{"event":"step","epoch":1,"step":2,"loss":"-inf"}', False),
        ('{"event":"step","epoch":1,"step":2,"loss":"0.25","extra":{"x":1}}', True),
    ],
)
def test_events_and_nonfinite_forms(line, finite):
    ev = P.parse_event(line)
    assert ev is not None and ev.kind == "step" and ev.epoch == 1
    assert P.is_finite(ev.data["loss"]) is finite


@pytest.mark.parametrize("line", ["", "garbage", "[1,2]", '{"event":"unknown"}', '{"no":"event"}'])
def test_unparseable_lines_are_ignored(line):
    assert P.parse_event(line) is None


def test_event_tail_waits_for_complete_lines(tmp_path):
    path = tmp_path / "e.jsonl"
    tail = EventTail(path)
    assert tail.poll() == []
    with open(path, "a") as f:
        f.write('{"event":"heartbeat"}\n{"event":"step","epoch":0,')
    assert [e.kind for e in tail.poll()] == ["heartbeat"]
    with open(path, "a") as f:
        f.write('"step":1,"loss":1.0}\n')
    assert [e.kind for e in tail.poll()] == ["step"]


def test_checkpoint_names_and_regex():
    assert P.checkpoint_name(7) == "epoch-0007.pt"
    rx = P.checkpoint_regex("ckpt/model_{epoch}.bin")
    assert rx.match("ckpt/model_12.bin").group("epoch") == "12"
    assert rx.match("ckpt/model_12.bin.tmp") is None
    with pytest.raises(ValueError):
        P.checkpoint_regex("model.pt")


@pytest.mark.parametrize(
    "line, fault",
    [
        ("RuntimeError: CUDA error: device-side assert triggered", Fault.CUDA_ERROR),
        ("torch.AcceleratorError: CUDA error: an illegal memory access was encountered", Fault.CUDA_ERROR),
        ("RuntimeError: CUDA error: unspecified launch failure", Fault.CUDA_ERROR),
        ("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, ...)`", Fault.CUDA_ERROR),
        ("RuntimeError: cuDNN error: CUDNN_STATUS_INTERNAL_ERROR", Fault.CUDA_ERROR),
        ("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=1580, ...)", Fault.CUDA_ERROR),
        ("RuntimeError: NCCL error in: ../torch/csrc/distributed/c10d/NCCLUtils.hpp:219", Fault.CUDA_ERROR),
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total", Fault.GPU_OOM),
        ("RuntimeError: CUDA error: out of memory", Fault.GPU_OOM),
        ("RuntimeError: DataLoader worker (pid 19597) is killed by signal: Killed.", Fault.CPU_OOM),
        ("RuntimeError: [enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory", Fault.CPU_OOM),
        ("OSError: [Errno 28] No space left on device", Fault.DISK_FULL),
        ("epoch 3 loss 0.25", None),
    ],
)
def test_classify_line(line, fault):
    assert classify_line(line) is fault


def test_the_code_a_traceback_quotes_is_not_evidence():
    quoted = [
        "Traceback (most recent call last):",
        '  File "/x/train.py", line 12, in step',
        "    except torch.OutOfMemoryError:  # CUDA out of memory",
        "ValueError: bad shape",
    ]
    assert classify_tail(quoted) is None
    real = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB"
    assert classify_tail([*quoted, real]) is Fault.GPU_OOM


def test_classify_exit():
    assert classify_exit(0, [], False) is None
    assert classify_exit(-signal.SIGKILL, [], True) is Fault.CPU_OOM
    assert classify_exit(137, [], True) is Fault.CPU_OOM
    assert classify_exit(-signal.SIGKILL, [], False) is Fault.CRASH
    assert classify_exit(1, ["x", "RuntimeError: CUDA error: misaligned address"], False) is Fault.CUDA_ERROR
    # GPU OOM wins over the CUDA error text that often follows it.
    assert classify_exit(1, ["CUDA out of memory.", "CUDA error: an illegal memory access"], False) is Fault.GPU_OOM
    assert classify_exit(-signal.SIGSEGV, ["Segmentation fault"], False) is Fault.CRASH


def test_ledger_fold_survives_a_torn_last_line(tmp_path):
    led = L.Ledger(tmp_path / "ledger.jsonl")
    led.append(L.ATTEMPT_STARTED, attempt=0, seed=29, load_epoch=-1, reason="normal start")
    led.append(L.CHECKPOINT, epoch=0, path="c/0", size=3, sha256="abc")
    with open(led.path, "a") as f:
        f.write('{"fact":"checkpoint","epoch":1,"pa')
    view = led and L.fold(led.facts())
    assert view.verified_epochs() == [0]
    assert view.restart_rows() == [
        {"epoch": 0, "load_epoch": -1, "load_step": None, "seed": 29, "reason": "normal start"}
    ]


def test_client_roundtrip(tmp_path):
    events = tmp_path / "not-yet" / "events.jsonl"  # the client makes the folder
    params = tmp_path / "params.json"
    params.write_text('{"lr": 0.1}')
    env = {P.ENV_EVENTS: str(events), P.ENV_SEED: "31", P.ENV_LOAD_EPOCH: "4", P.ENV_EPOCHS: "9",
           P.ENV_CHECKPOINT_DIR: str(tmp_path / "ck"), P.ENV_PARAMS: str(params), P.ENV_BATCH_DIVISOR: "2"}  # fmt: skip
    sup = Supervised.from_env(env)
    assert (sup.seed, sup.load_epoch, sup.start_epoch, sup.epochs, sup.batch_divisor) == (31, 4, 5, 9, 2)
    assert sup.params == {"lr": 0.1}
    assert sup.resume_path() == tmp_path / "ck" / "epoch-0004.pt"
    sup.step(5, 0, 0.5)
    with pytest.raises(Exception, match="non-finite"):
        sup.step(5, 1, math.nan)
    path = atomic_write(sup.checkpoint_path(5), lambda f: f.write(b"data"))
    sup.checkpoint_done(5, path)
    kinds = [P.parse_event(x).kind for x in events.read_text().splitlines()]
    assert kinds == ["step", "step", "checkpoint"]
    assert sha256_file(path) == "3a6eb0790f39ac87c94f3856b2dd2c5d110e6811602261a9a923d3bb23adc8b7"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_shim_mirrors_exit_codes_and_signals():
    def shim(code: str) -> int:
        return subprocess.run([sys.executable, "-m", "supervisor.shim", "--", sys.executable, "-c", code]).returncode

    assert shim("import sys; sys.exit(3)") == 3
    assert shim("import os, signal; os.kill(os.getpid(), signal.SIGKILL)") == -signal.SIGKILL
    assert shim("pass") == 0
    out = subprocess.run([sys.executable, "-m", "supervisor.shim", "--", "/nonexistent/binary"],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 127 and "cannot run" in out.stderr


def test_shim_forwards_sigterm():
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor.shim", "--", sys.executable, "-c",
         "import signal, sys, time\n"
         "signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))\n"
         "print('ready', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=10) == 42
