"""The Lightning and Hugging Face callbacks (supervisor.integrations) with the real frameworks.

In-process tests check the events, the checkpoint files and request serving of one `fit`/`train`. The
end-to-end tests (marked slow) run scripts through the real CLI with faults injected (a NaN loss, a hang,
a kill -9 of the trainer from the test) and read the restart table back from `supervisor report`. Tiny
models built from a config: nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import tarfile
import warnings
from pathlib import Path

import psutil
import pytest
import torch
from conftest import cli, ledger, report, start_bg, toml_value, wait_for

from supervisor import protocol as P
from supervisor.client import CheckpointRequest, ChecksumMismatch, NonFiniteLoss, Supervised, atomic_write, sha256_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


# -- helpers ------------------------------------------------------------------------------------------


def _events(path: Path, kind: str | None = None) -> list[dict]:
    if not path.exists():
        return []
    out = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [e for e in out if kind is None or e["event"] == kind]


def _attempt_events(run_dir: Path, attempt: int, kind: str | None = None) -> list[dict]:
    return _events(run_dir / "attempts" / f"attempt-{attempt:04d}.events.jsonl", kind)


def _write_request(path: Path, request: CheckpointRequest) -> None:
    atomic_write(path, lambda f: f.write(request.to_json()))


def _write_toml(folder: Path, lines: list[str], tables: dict[str, dict]) -> Path:
    text = list(lines)
    for table, values in tables.items():
        text += ["", f"[{table}]"] + [f"{k} = {toml_value(v)}" for k, v in values.items()]
    path = folder / "run.toml"
    path.write_text("\n".join(text) + "\n")
    return path


def _kill_trainer_when_ready(run_dir: Path, proc, timeout: float = 240) -> int:
    """Wait for the trainer's `kill-me` marker (it waits there, printing), check that its pid is a descendant
    of the shim the ledger names for the running attempt, and SIGKILL it. Returns the pid."""
    marker = run_dir / "kill-me"
    wait_for(lambda: marker.exists() or proc.poll() is not None, timeout=timeout, what="the trainer's kill-me")
    assert proc.poll() is None, proc.communicate()
    pid = int(marker.read_text())
    started = [f for f in ledger(run_dir) if f["fact"] == "attempt_started"]
    shim = psutil.Process(started[-1]["pid"])
    assert pid in [c.pid for c in shim.children(recursive=True)], "the marker's pid is not the running trainer"
    os.kill(pid, signal.SIGKILL)
    marker.unlink()
    return pid


def _run_with_kill(toml: Path, run_dir: Path, timeout: float = 400) -> tuple[int, str]:
    proc = start_bg(toml)
    try:
        _kill_trainer_when_ready(run_dir, proc)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _print_restarts(rep: dict) -> None:
    """The restart table of a run (shown with pytest -s; the report's JSON rows)."""
    print(f"\nrestarts of {rep['name']} ({rep.get('unit', 'epochs')}):")
    for row in rep["restarts"]:
        print("  ", json.dumps(row))


# A fault switch shared by the test scripts: params `faults` = [{"kind", "attempt", "step"}], `step` the global
# optimizer step about to be trained (the first is 1). Kinds: nan (the loss becomes NaN), hang (sleep
# forever), kill_me (write <run_dir>/kill-me with the pid, then wait printing until the test kills us).
FAULTS = r"""
import os, sys, time

def fault(sup, step):
    for f in sup.params.get("faults", []):
        if f.get("attempt", sup.attempt) == sup.attempt and f["step"] == step:
            return f["kind"]
    return None

def act(sup, kind):
    if kind == "hang":
        time.sleep(3600)
    if kind == "kill_me":
        (sup.run_dir / "kill-me").write_text(str(os.getpid()))
        for _ in range(1200):
            print("waiting to be killed", flush=True)
            time.sleep(0.1)
        sys.exit(3)
"""

LIGHTNING_SCRIPT = (
    FAULTS
    + r"""
import json
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset
from supervisor.client import Supervised
from supervisor.integrations.lightning import SupervisorCallback

sup = Supervised.from_env()
cb = SupervisorCallback(sup, every_n_steps=sup.params.get("every_n_steps"))
step_s = float(sup.params.get("step_s", 0))


class Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(8, 1)

    def on_train_start(self):
        (sup.run_dir / f"start-{sup.attempt}.json").write_text(json.dumps(
            {"global_step": self.trainer.global_step, "epoch": self.trainer.current_epoch, "seed": sup.seed,
             "ckpt_path": CKPT}))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        kind = fault(sup, self.trainer.global_step + 1)
        if kind == "nan":
            loss = loss * float("nan")
        act(sup, kind)
        time.sleep(step_s)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


cb.seed_everything()
CKPT = cb.ckpt_path()
g = torch.Generator().manual_seed(0)
x = torch.randn(32, 8, generator=g)
data = TensorDataset(x, x.sum(1, keepdim=True))
trainer = pl.Trainer(callbacks=[cb], **cb.trainer_limits(), accelerator="cpu", devices=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(Model(), DataLoader(data, batch_size=8), DataLoader(data, batch_size=16), ckpt_path=CKPT)
(sup.run_dir / f"end-{sup.attempt}.json").write_text(json.dumps(
    {"global_step": trainer.global_step, "epoch": trainer.current_epoch}))
"""
)

HF_SCRIPT = (
    FAULTS
    + r"""
import json
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
from supervisor.integrations.transformers import SupervisorCallback

cb = SupervisorCallback()
sup = cb.sup


class Data(torch.utils.data.Dataset):
    def __init__(self, n):
        self.ids = torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(n))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class FaultyTrainer(Trainer):
    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        kind = fault(sup, self.state.global_step + 1)
        act(sup, kind)
        return loss * float("nan") if kind == "nan" else loss


class Record(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        (sup.run_dir / f"start-{sup.attempt}.json").write_text(json.dumps(
            {"global_step": state.global_step, "seed": sup.seed, "resume": RESUME}))


settings = dict(output_dir="out", per_device_train_batch_size=4, logging_steps=1, learning_rate=1e-3,
                save_steps=sup.params.get("save_steps", 4), report_to=[], use_cpu=True, dataloader_num_workers=0,
                disable_tqdm=True)
settings.update(sup.params.get("args", {}))
settings.update(cb.training_args())
args = TrainingArguments(**settings)
torch.manual_seed(args.seed)
model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=32))
trainer = FaultyTrainer(model=model, args=args, train_dataset=Data(32), eval_dataset=Data(8),
                        callbacks=[cb, Record()])
RESUME = cb.resume_from_checkpoint(args.output_dir)
trainer.train(resume_from_checkpoint=RESUME)
(sup.run_dir / f"end-{sup.attempt}.json").write_text(json.dumps(
    {"global_step": trainer.state.global_step, "epoch": trainer.state.epoch}))
"""
)


# -- Lightning, in process ------------------------------------------------------------------------------


def _lightning_fit(tmp_path: Path, sup: Supervised, faults: dict | None = None, **cb_kwargs):
    pl = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader, TensorDataset

    from supervisor.integrations.lightning import SupervisorCallback

    faults = faults or {}

    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.log("train_loss", loss)
            if faults.get("nan") == self.trainer.global_step + 1:
                loss = loss * float("nan")
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    cb = SupervisorCallback(sup, **cb_kwargs)
    cb.seed_everything()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=g)
    data = TensorDataset(x, x.sum(1, keepdim=True))
    trainer = pl.Trainer(callbacks=[cb], **cb.trainer_limits(), accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Model(), DataLoader(data, batch_size=4), DataLoader(data, batch_size=8), ckpt_path=cb.ckpt_path())
    return trainer


def _sup(tmp_path: Path, **kw) -> Supervised:
    return Supervised(checkpoint_dir=tmp_path / "ckpt", events_path=tmp_path / "events.jsonl",
                      request_path=tmp_path / "request.json", **kw)  # fmt: skip


def test_lightning_epoch_run_reports_steps_evals_and_atomic_epoch_checkpoints(tmp_path):
    trainer = _lightning_fit(tmp_path, _sup(tmp_path, epochs=2))
    assert (trainer.current_epoch, trainer.global_step) == (2, 8)
    events = _events(tmp_path / "events.jsonl")
    assert events[0]["event"] == "heartbeat" and events[0][P.HANDLES] == [P.CAPABILITY_CHECKPOINT_REQUEST]
    steps = [(e["epoch"], e["step"]) for e in events if e["event"] == "step"]
    assert steps == [(e, s) for e in range(2) for s in range(4)]  # optimizer steps of each epoch, from 0
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["epoch"] for e in evals] == [0, 1] and all(set(e["metrics"]) == {"val_loss"} for e in evals)
    kinds = [e["event"] for e in events]
    assert kinds.index("eval") < kinds.index("checkpoint")  # an epoch's checkpoint comes after its eval
    ckpts = [e for e in events if e["event"] == "checkpoint"]
    assert [(e["epoch"], Path(e["path"]).name) for e in ckpts] == [(0, "epoch-0000.pt"), (1, "epoch-0001.pt")]
    for e in ckpts:
        assert "step" not in e and e["size"] == Path(e["path"]).stat().st_size
        state = torch.load(e["path"], weights_only=False)
        assert state["epoch"] == e["epoch"] and state["global_step"] == 4 * (e["epoch"] + 1)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch-0000.pt", "epoch-0001.pt"]  # no temp


def test_lightning_resumes_from_the_epoch_checkpoint_and_checks_its_sha256(tmp_path):
    _lightning_fit(tmp_path / "a", _sup(tmp_path / "a", epochs=3))
    path = tmp_path / "a" / "ckpt" / "epoch-0000.pt"
    sup = _sup(tmp_path / "b", epochs=3, load_epoch=0, start_epoch=1, load_path=path, load_sha256=sha256_file(path))
    trainer = _lightning_fit(tmp_path / "b", sup)
    assert trainer.global_step == 12
    assert [e["epoch"] for e in _events(tmp_path / "b" / "events.jsonl", "checkpoint")] == [1, 2]
    assert {e["epoch"] for e in _events(tmp_path / "b" / "events.jsonl", "step")} == {1, 2}
    bad = _sup(tmp_path / "c", epochs=3, load_epoch=0, start_epoch=1, load_path=path, load_sha256="0" * 64)
    with pytest.raises(ChecksumMismatch):
        _lightning_fit(tmp_path / "c", bad)


def test_lightning_nan_is_reported_then_raised(tmp_path):
    with pytest.raises(NonFiniteLoss):
        _lightning_fit(tmp_path, _sup(tmp_path, epochs=2), faults={"nan": 6})
    steps = _events(tmp_path / "events.jsonl", "step")
    assert (steps[-1]["epoch"], steps[-1]["step"]) == (1, 1) and math.isnan(steps[-1]["loss"])
    assert [e["epoch"] for e in _events(tmp_path / "events.jsonl", "checkpoint")] == [0]


def test_lightning_serves_a_stop_request_with_a_mid_epoch_checkpoint_and_stops(tmp_path):
    sup = _sup(tmp_path, epochs=3)
    _write_request(sup.request_path, CheckpointRequest(4, "preempted", stop=True))
    trainer = _lightning_fit(tmp_path, sup)
    assert trainer.global_step == 1  # stopped after the first optimizer step
    events = _events(tmp_path / "events.jsonl")
    (ck,) = [e for e in events if e["event"] == "checkpoint"]
    assert (ck["epoch"], ck["step"], ck["request"], ck["reason"]) == (0, 1, 4, "preempted")
    assert Path(ck["path"]).name == "epoch-0000-step-00000001.pt"
    assert not [e for e in events if e["event"] == "eval"]  # the stop's validation is no epoch's eval


def test_lightning_step_run_saves_every_n_steps_and_the_last_step(tmp_path):
    sup = _sup(tmp_path, unit="steps", steps=10)
    trainer = _lightning_fit(tmp_path, sup, every_n_steps=4)
    assert trainer.global_step == 10
    events = _events(tmp_path / "events.jsonl")
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, 11))
    assert all("epoch" not in e for e in events if e["event"] in ("step", "checkpoint"))
    assert [(e["step"], Path(e["path"]).name) for e in events if e["event"] == "checkpoint"] == [
        (4, "step-00000004.pt"), (8, "step-00000008.pt"), (10, "step-00000010.pt")]  # fmt: skip
    assert [e["step"] for e in events if e["event"] == "eval"] == [4, 8]  # each epoch's end (not at max_steps)
    assert torch.load(tmp_path / "ckpt" / "step-00000008.pt", weights_only=False)["global_step"] == 8


# -- transformers, in process ---------------------------------------------------------------------------


def _hf_train(tmp_path: Path, sup: Supervised, callbacks: tuple = (), **settings):
    transformers = pytest.importorskip("transformers")
    from supervisor.integrations.transformers import SupervisorCallback

    class Data(torch.utils.data.Dataset):
        def __init__(self, n):
            self.ids = torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(n))

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    cb = SupervisorCallback(sup)
    args = transformers.TrainingArguments(**{
        "output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 3,
        "report_to": [], "use_cpu": True, "dataloader_num_workers": 0, "disable_tqdm": True,
        **cb.training_args(), **settings})  # fmt: skip
    torch.manual_seed(args.seed)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_positions=32)
    trainer = transformers.Trainer(model=transformers.GPT2LMHeadModel(config), args=args, train_dataset=Data(16),
                                   eval_dataset=Data(4), callbacks=[cb, *callbacks])  # fmt: skip
    resume = cb.resume_from_checkpoint(args.output_dir)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, resume


def test_transformers_step_run_packs_each_checkpoint_folder_into_one_announced_file(tmp_path):
    sup = _sup(tmp_path, unit="steps", steps=5, seed=7)
    trainer, _ = _hf_train(tmp_path, sup, eval_strategy="steps", eval_steps=2)
    assert trainer.state.global_step == 5
    events = _events(tmp_path / "events.jsonl")
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4, 5]
    assert [e["step"] for e in events if e["event"] == "eval"] == [2, 4, 5]
    assert set(next(e for e in events if e["event"] == "eval")["metrics"]) == {"eval_loss"}  # no timings
    ckpts = [e for e in events if e["event"] == "checkpoint"]
    assert [(e["step"], Path(e["path"]).name) for e in ckpts] == [(3, "step-00000003.pt"), (5, "step-00000005.pt")]
    for e in ckpts:
        path = Path(e["path"])
        assert "epoch" not in e and e["sha256"] == sha256_file(path) and e["size"] == path.stat().st_size
        with tarfile.open(path) as tar:
            names = tar.getnames()
            meta = json.load(tar.extractfile("supervisor.json"))
        assert meta["global_step"] == e["step"] and meta["seed"] == 7
        assert "checkpoint/trainer_state.json" in names and "checkpoint/model.safetensors" in names
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")]


def test_transformers_resume_unpacks_the_checkpoint_and_keeps_rng_only_with_the_same_seed(tmp_path):
    _hf_train(tmp_path / "a", _sup(tmp_path / "a", unit="steps", steps=4, seed=7), save_steps=2)
    packed = tmp_path / "a" / "ckpt" / "step-00000002.pt"
    for seed, rng in ((7, True), (8, False)):
        where = tmp_path / f"seed{seed}"
        (where / "out" / "checkpoint-2").mkdir(parents=True)
        (where / "out" / "checkpoint-2" / "half-written").write_text("x")  # left by a killed attempt: replaced
        sup = _sup(where, unit="steps", steps=4, seed=seed, start_step=2, load_path=packed,
                   load_sha256=sha256_file(packed))  # fmt: skip
        trainer, resume = _hf_train(where, sup, save_steps=2)
        assert resume == str(where / "out" / "checkpoint-2") and trainer.state.global_step == 4
        files = {p.name for p in Path(resume).iterdir()}
        assert "half-written" not in files and "trainer_state.json" in files
        assert ("rng_state.pth" in files) is rng  # a new seed after a fault: the old random states stay out
        resumed = _events(where / "events.jsonl", "step")
        assert [e["step"] for e in resumed] == [3, 4]
        if rng:  # a pause: the same seed and random states, the same losses as the uninterrupted run
            original = _events(tmp_path / "a" / "events.jsonl", "step")[2:]
            assert [e["loss"] for e in resumed] == [e["loss"] for e in original]
    bad = _sup(tmp_path / "bad", unit="steps", steps=4, start_step=2, load_path=packed, load_sha256="0" * 64)
    with pytest.raises(ChecksumMismatch):
        _hf_train(tmp_path / "bad", bad)


def test_transformers_serves_a_stop_request_and_stops_without_an_epoch_end_save(tmp_path):
    sup = _sup(tmp_path, epochs=2)
    _write_request(sup.request_path, CheckpointRequest(2, "stopped", stop=True))
    trainer, _ = _hf_train(tmp_path, sup, eval_strategy="epoch")
    assert trainer.state.global_step == 1
    events = _events(tmp_path / "events.jsonl")
    (ck,) = [e for e in events if e["event"] == "checkpoint"]
    assert (ck["epoch"], ck["step"], ck["request"], ck["reason"]) == (0, 1, 2, "stopped")
    assert Path(ck["path"]).name == "epoch-0000-step-00000001.pt"
    assert not [e for e in events if e["event"] == "eval"]


def test_transformers_nan_is_reported_and_raised_even_with_the_trainers_nan_filter_on(tmp_path):
    transformers = pytest.importorskip("transformers")

    class PoisonAfter2(transformers.TrainerCallback):  # weights turn NaN: every later loss is NaN
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(float("nan"))

    sup = _sup(tmp_path, unit="steps", steps=4)
    # The Trainer's logging_nan_inf_filter (on here) would log the mean of earlier losses instead: the callback
    # turns it off when training starts.
    with pytest.raises(NonFiniteLoss):
        _hf_train(tmp_path, sup, callbacks=(PoisonAfter2(),), logging_nan_inf_filter=True)
    steps = _events(tmp_path / "events.jsonl", "step")
    assert [e["step"] for e in steps] == [1, 2, 3] and math.isnan(steps[-1]["loss"])


# -- end to end, through the real CLI -------------------------------------------------------------------

QUICK_RESTART = {"backoff_initial_s": 0.05, "backoff_max_s": 0.2}
# Importing torch and a framework takes ~10 s on a slow machine; after the first sign of life, 6 s of silence
# is a hang.
WATCH = {"heartbeat_timeout_s": 6.0, "startup_timeout_s": 180.0}


def _script_run(tmp_path: Path, script: str, unit: str, params: dict, **tables: dict) -> tuple[Path, Path]:
    (tmp_path / "train.py").write_text(script)
    tables = {"trainer": {"command": ["python", "train.py"]}, "trainer.params": params,
              "watch": {**WATCH, **tables.pop("watch", {})}, "restart": {**QUICK_RESTART, **tables.pop("restart", {})},
              **tables}  # fmt: skip
    return _write_toml(tmp_path, ['name = "run"', unit], tables), tmp_path / "runs" / "run"


def _starts(run_dir: Path) -> list[dict]:
    return [_json(p) for p in sorted(run_dir.glob("start-*.json"), key=lambda p: int(p.stem.split("-")[1]))]


def _ledger_commands(run_dir: Path) -> list[list[str]]:
    return [f["command"] for f in ledger(run_dir) if f["fact"] == "attempt_started"]


@pytest.mark.slow
def test_lightning_epoch_run_survives_a_nan_a_hang_and_a_kill(tmp_path):
    pytest.importorskip("lightning")
    faults = [{"kind": "nan", "attempt": 0, "step": 6},  # epoch 1 (4 steps per epoch)
              {"kind": "hang", "attempt": 1, "step": 10},  # epoch 2
              {"kind": "kill_me", "attempt": 2, "step": 14}]  # epoch 3: SIGKILLed by the test  # fmt: skip
    toml, run_dir = _script_run(tmp_path, LIGHTNING_SCRIPT, "epochs = 4", {"faults": faults})
    code, err = _run_with_kill(toml, run_dir)
    assert code == 0, err
    rep = report(toml)
    _print_restarts(rep)
    assert rep["status"] == "completed" and rep["checkpoints"][-1] == 3
    rows = rep["restarts"]
    assert [(r["epoch"], r["load_epoch"], r["reason"]) for r in rows] == [
        (0, -1, "normal start"), (1, 0, "nan"), (2, 1, "hang"), (3, 2, "crash")]  # fmt: skip
    assert len({r["seed"] for r in rows}) == 4  # a new seed after every fault
    # Each attempt resumed from the checkpoint: Lightning restored the global step and the epoch.
    starts = _starts(run_dir)
    assert [(s["global_step"], s["epoch"]) for s in starts] == [(0, 0), (4, 1), (8, 2), (12, 3)]
    assert [s["seed"] for s in starts] == [r["seed"] for r in rows]
    assert starts[0]["ckpt_path"] is None and starts[3]["ckpt_path"].endswith("epoch-0002.pt")
    assert _json(run_dir / "end-3.json") == {"global_step": 16, "epoch": 4}
    nan_steps = [e for e in _attempt_events(run_dir, 0, "step") if not math.isfinite(e["loss"])]
    assert [(e["epoch"], e["step"]) for e in nan_steps] == [(1, 1)]


@pytest.mark.slow
def test_transformers_step_run_survives_a_nan_a_hang_and_a_kill(tmp_path):
    pytest.importorskip("transformers")
    faults = [{"kind": "nan", "attempt": 0, "step": 6}, {"kind": "hang", "attempt": 1, "step": 10},
              {"kind": "kill_me", "attempt": 2, "step": 14}]  # fmt: skip
    toml, run_dir = _script_run(tmp_path, HF_SCRIPT, "steps = 16", {"faults": faults, "save_steps": 4})
    code, err = _run_with_kill(toml, run_dir)
    assert code == 0, err
    rep = report(toml)
    _print_restarts(rep)
    assert rep["status"] == "completed" and rep["checkpoints"][-1] == 16
    rows = rep["restarts"]
    assert [(r["step"], r["load_step"], r["reason"]) for r in rows] == [
        (1, -1, "normal start"), (5, 4, "nan"), (9, 8, "hang"), (13, 12, "crash")]  # fmt: skip
    assert len({r["seed"] for r in rows}) == 4
    starts = _starts(run_dir)
    assert [s["global_step"] for s in starts] == [0, 4, 8, 12]  # the Trainer resumed from the unpacked folder
    assert starts[0]["resume"] is None and starts[3]["resume"] == "out/checkpoint-12"
    assert _json(run_dir / "end-3.json")["global_step"] == 16
    assert [e["step"] for e in _attempt_events(run_dir, 3, "step")] == [13, 14, 15, 16]


@pytest.mark.slow
def test_transformers_epoch_run_restarts_from_the_previous_epoch_after_a_nan(tmp_path):
    pytest.importorskip("transformers")
    params = {"faults": [{"kind": "nan", "attempt": 0, "step": 11}], "args": {"eval_strategy": "epoch"}}
    toml, run_dir = _script_run(tmp_path, HF_SCRIPT, "epochs = 2", params)  # 8 optimizer steps per epoch
    out = cli("start", "-q", str(toml), timeout=300)
    assert out.returncode == 0, out.stderr
    rep = report(toml)
    _print_restarts(rep)
    assert [(r["epoch"], r["load_epoch"], r["reason"]) for r in rep["restarts"]] == [(0, -1, "normal start"),
                                                                                      (1, 0, "nan")]  # fmt: skip
    assert rep["checkpoints"] == [0, 1] and set(rep["metrics"]["0"]) == {"eval_loss"}
    assert [s["global_step"] for s in _starts(run_dir)] == [0, 8]
    assert [(e["epoch"], e["step"]) for e in _attempt_events(run_dir, 1, "step")][:2] == [(1, 0), (1, 1)]


@pytest.mark.slow
def test_lightning_step_run_pauses_on_stop_and_resumes_with_the_same_seed(tmp_path):
    pytest.importorskip("lightning")
    params = {"every_n_steps": 8, "step_s": 0.25}
    toml, run_dir = _script_run(tmp_path, LIGHTNING_SCRIPT, "steps = 24", params)
    proc = start_bg(toml)
    try:
        wait_for(lambda: len(_attempt_events(run_dir, 0, "step")) >= 3, timeout=240, what="a few steps")
        proc.send_signal(signal.SIGTERM)  # supervisor stop: a stop request to a trainer that handles them
        assert proc.wait(timeout=120) == 75
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    (served,) = [e for e in _attempt_events(run_dir, 0, "checkpoint") if "request" in e]
    paused_at = served["step"]
    assert served["reason"] == "stopped" and Path(served["path"]).name == f"step-{paused_at:08d}.pt"
    out = cli("start", "-q", str(toml), timeout=300)
    assert out.returncode == 0, out.stderr
    rep = report(toml)
    _print_restarts(rep)
    rows = rep["restarts"]
    expected = [(1, -1, "normal start"), (paused_at + 1, paused_at, "stopped")]
    assert [(r["step"], r["load_step"], r["reason"]) for r in rows] == expected
    assert rows[1]["seed"] == rows[0]["seed"]  # a pause keeps the seed
    assert [s["global_step"] for s in _starts(run_dir)] == [0, paused_at]
    assert _attempt_events(run_dir, 1, "step")[0]["step"] == paused_at + 1
    assert rep["checkpoints"][-1] == 24 and _json(run_dir / "end-1.json")["global_step"] == 24


# -- the examples, through the CLI ----------------------------------------------------------------------


def _example(tmp_path: Path, name: str) -> Path:
    dest = tmp_path / name
    shutil.copytree(EXAMPLES / name, dest, ignore=shutil.ignore_patterns("runs", "out", "__pycache__"))
    return dest


def _slow_down(toml: Path, sleep_s: float) -> None:
    """Each step of the example sleeps `sleep_s` (a bigger model): room to kill it mid-run."""
    text = toml.read_text()
    text = text.replace('"train.py", ', f'"train.py", "--sleep_s", "{sleep_s}", ', 1)
    toml.write_text(text)


def _kill_after_checkpoint(toml: Path, run_dir: Path, epoch: int) -> tuple[int, str]:
    """Start the run, SIGKILL the trainer (the shim's child, as the ledger names the shim) once the checkpoint
    of `epoch` is verified, and let the supervisor finish the run."""
    proc = start_bg(toml)

    def verified() -> bool:
        assert proc.poll() is None, proc.communicate()
        return any(f["fact"] == "checkpoint" and f["epoch"] == epoch for f in ledger(run_dir))

    try:
        wait_for(verified, timeout=240, what=f"the checkpoint of epoch {epoch}")
        shim = psutil.Process([f for f in ledger(run_dir) if f["fact"] == "attempt_started"][-1]["pid"])
        (trainer,) = shim.children()
        os.kill(trainer.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err


@pytest.mark.slow
def test_lightning_example_protocol_mode_survives_a_kill(tmp_path):
    pytest.importorskip("lightning")
    folder = _example(tmp_path, "lightning")
    toml = folder / "run.toml"
    _slow_down(toml, 0.04)  # 32 steps per epoch: about 1.3 s each
    run_dir = folder / "runs" / "lightning-example"
    code, err = _kill_after_checkpoint(toml, run_dir, epoch=1)
    assert code == 0, err
    rep = report(toml)
    _print_restarts(rep)
    rows = rep["restarts"]
    assert rep["status"] == "completed" and rep["checkpoints"][-1] == 3 and len(rows) == 2
    assert rows[1]["reason"] == "crash" and rows[1]["load_epoch"] >= 1 and rows[1]["epoch"] == rows[1]["load_epoch"] + 1
    # The second attempt trained only the epochs after its checkpoint.
    assert {e["epoch"] for e in _attempt_events(run_dir, 1, "step")} == set(range(rows[1]["epoch"], 4))
    assert set(rep["metrics"]["3"]) == {"val_loss"}


@pytest.mark.slow
def test_lightning_example_zero_code_mode_survives_a_kill(tmp_path):
    pytest.importorskip("lightning")
    folder = _example(tmp_path, "lightning")
    toml = folder / "run-zero-code.toml"
    _slow_down(toml, 0.04)
    run_dir = folder / "runs" / "lightning-zero-code"
    code, err = _kill_after_checkpoint(toml, run_dir, epoch=1)
    assert code == 0, err
    rep = report(toml)
    _print_restarts(rep)
    rows = rep["restarts"]
    assert rep["status"] == "completed" and rep["checkpoints"][-1] == 3 and len(rows) == 2
    assert rows[1]["reason"] == "crash" and rows[1]["load_epoch"] >= 1
    first, second = _ledger_commands(run_dir)
    assert "--ckpt_path" not in first and second[-2:] == ["--ckpt_path", "out/last.ckpt"]  # resume_args
    # The resumed script went on from the restored out/last.ckpt: its first epoch is the one after it.
    log = (run_dir / "attempts" / "attempt-0001.log").read_text()
    printed = [int(line.split()[1].rstrip(":")) for line in log.splitlines() if line.startswith("epoch ")]
    assert printed == list(range(rows[1]["load_epoch"] + 1, 4))
    assert rep["best"]["val_loss"]["mode"] == "min"


@pytest.mark.slow
def test_transformers_example_runs_through_the_cli(tmp_path):
    pytest.importorskip("transformers")
    folder = _example(tmp_path, "transformers")
    out = cli("start", "-q", str(folder / "run.toml"), timeout=300)
    assert out.returncode == 0, out.stderr
    rep = report(folder / "run.toml")
    _print_restarts(rep)
    assert rep["status"] == "completed" and rep["checkpoints"] == [20, 40, 60]
    assert rep["best"]["eval_loss"]["mode"] == "min"
