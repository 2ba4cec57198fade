"""Trackers written from the ledger, read back with the trackers' own readers: TensorBoard's EventAccumulator,
MLflow's client. The facts come from real runs through the real CLI with the fake trainer (a NaN, a crash);
the rewinding ledgers are built from those facts by hand."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import cli, ledger, write_run

from supervisor.trackers import open_trackers
from supervisor.trackers import sync as sync_module
from supervisor.trackers.events import FinalCurves, LiveCurves, Metrics, Purge, Scalar

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
pytest.importorskip("mlflow", reason="the mlflow extra is not installed")

from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.util.tensor_util import make_ndarray  # noqa: E402

PARAMS = {"lr": 0.01, "model": {"depth": 18}, "faults": ["nan"]}
FAULTS = [{"kind": "nan", "attempt": 0, "epoch": 2, "step": 1}, {"kind": "crash", "attempt": 1, "epoch": 3, "step": 2}]


def sync(run_dir: Path, names: list[str], **kwargs) -> None:
    """One TrackerSync over the run dir's ledger, on its thread: start, notify, close."""
    s = open_trackers(names, "run", run_dir, PARAMS, "epochs", **kwargs)
    assert s is not None
    s.start()
    s.notify(run_dir / "ledger.jsonl")
    assert s.close(timeout_s=180)


def write_ledger(run_dir: Path, facts: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "ledger.jsonl").write_text("".join(json.dumps(f) + "\n" for f in facts))


def tensorboard(run_dir: Path) -> dict[str, list[tuple[int, object]]]:
    """Every tag as TensorBoard serves it (the plugin accumulator, its purge rules applied): (step, value) for
    scalars, (step, text) for text, under "<plugin>:<tag>"."""
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0},
                           tensor_size_guidance={"scalars": 0, "text": 0, "hparams": 0})  # fmt: skip
    acc.Reload()
    out: dict[str, list[tuple[int, object]]] = {}
    for tag in acc.Tags()["tensors"]:
        plugin = acc.SummaryMetadata(tag).plugin_data.plugin_name
        if plugin == "scalars":
            out[tag] = [(e.step, round(float(make_ndarray(e.tensor_proto)), 6)) for e in acc.Tensors(tag)]
        else:
            out[f"{plugin}:{tag}"] = [(e.step, b"".join(e.tensor_proto.string_val).decode()) for e in acc.Tensors(tag)]
    return out


def mlflow_runs(uri: str) -> tuple[MlflowClient, list]:
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("supervisor")
    return client, client.search_runs([experiment.experiment_id])


def mlflow_run(run_dir: Path, uri: str | None = None) -> tuple[MlflowClient, object]:
    """The one MLflow run of the local store in the run dir (or of the store at `uri`)."""
    client, runs = mlflow_runs(uri or f"sqlite:///{run_dir.resolve()}/mlflow/mlflow.db")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def mlflow(run_dir: Path, uri: str | None = None) -> dict:
    """The run's metric histories (step, value, timestamp), params, tags (MLflow's own excluded), status."""
    client, run = mlflow_run(run_dir, uri)
    history = {k: [(m.step, round(m.value, 6), m.timestamp) for m in client.get_metric_history(run.info.run_id, k)]
               for k in run.data.metrics}  # fmt: skip
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
    return {"history": history, "params": run.data.params, "tags": tags, "status": run.info.status}


def clean_curves(points: list[tuple]) -> None:
    steps = [p[0] for p in points]
    assert steps == sorted(set(steps)), f"steps not strictly increasing (a zigzag or a repeat): {points}"


def train_and_eval(facts: list[dict]) -> tuple[dict[int, float], dict[int, float]]:
    """The last train loss and AP50 the ledger holds per position (what a clean curve shows)."""
    loss = {f["epoch"]: round(f["loss"], 6) for f in facts if f["fact"] == "train" and f["epoch"] is not None}
    ap50 = {f["epoch"]: round(f["metrics"]["AP50"], 6) for f in facts if f["fact"] == "metrics"}
    return loss, ap50


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Path:
    """A real run through the CLI (NaN in attempt 0, crash in attempt 1), then both trackers synced once."""
    tmp = tmp_path_factory.mktemp("real")
    toml = write_run(tmp, epochs=5, params={"faults": FAULTS})
    out = cli("start", str(toml), timeout=180)
    assert out.returncode == 0, out.stderr
    run_dir = tmp / "runs" / "run"
    sync(run_dir, ["tensorboard", "mlflow"])
    return run_dir


def test_tensorboard_curves_restarts_and_params(real):
    facts = ledger(real)
    tb = tensorboard(real)
    for points in tb.values():
        clean_curves(points)
    loss, ap50 = train_and_eval(facts)
    assert tb["train/loss"] == sorted(loss.items())
    assert tb["eval/AP50"] == sorted(ap50.items())
    assert [s for s, _ in tb["restarts"]] == [2, 3] and [v for _, v in tb["restarts"]] == [1.0, 2.0]
    assert tb["work_lost/steps"] == [(2, 2.0), (3, 4.0)]
    (_, first), (_, second) = tb["text:restart_log"]
    assert "attempt 1 at epoch 2 from epoch 1, seed 28: nan (training loss nan at epoch 2 step 1); lost 2 steps" \
        in first
    assert "attempt 2 at epoch 3 from epoch 2, seed 31: crash" in second
    assert "| 3 | 2 | 31 | crash |" in second and "| 2 | 1 | 28 | nan | 2 |" in second  # the whole table
    assert tb["text:params"][0][0] == 0 and "| model.depth | 18 |" in tb["text:params"][0][1]
    assert [p.name for p in (real / "tensorboard").iterdir() if p.is_dir()] == []  # one TensorBoard run


def test_mlflow_one_run_final_curves_restarts_status(real):
    facts = ledger(real)
    ml = mlflow(real)
    for points in ml["history"].values():
        clean_curves(points)
    loss, ap50 = train_and_eval(facts)
    assert [(s, v) for s, v, _ in ml["history"]["train/loss"]] == sorted(loss.items())
    assert [(s, v) for s, v, _ in ml["history"]["eval/AP50"]] == sorted(ap50.items())
    assert [(s, v) for s, v, _ in ml["history"]["restarts"]] == [(1, 1.0), (2, 2.0)]
    assert ml["params"] == {"lr": "0.01", "model.depth": "18", "faults": '["nan"]'}
    assert ml["status"] == "FINISHED" and ml["tags"]["supervisor.status"] == "completed"
    assert ml["tags"]["supervisor.run"] == "run" and ml["tags"]["supervisor.restarts"] == "2"
    nan = ml["tags"]["supervisor.restart.001"]
    assert "seed 28" in nan and "nan (training loss nan" in nan and "lost 2 steps" in nan
    assert "seed 31: crash" in ml["tags"]["supervisor.restart.002"]
    client, run = mlflow_run(real)
    table = Path(client.download_artifacts(run.info.run_id, "restarts.md", str(real / "dl"))).read_text()
    assert "| epoch | load_epoch | seed | reason |" in table and "| 3 | 2 | 31 | crash |" in table


def test_a_second_sync_writes_nothing(real):
    tb_files = {p.name: p.stat().st_size for p in (real / "tensorboard").iterdir()}
    before = (tensorboard(real), mlflow(real), {p.name: p.read_text() for p in (real / "trackers").iterdir()})
    sync(real, ["tensorboard", "mlflow"])
    assert {p.name: p.stat().st_size for p in (real / "tensorboard").iterdir()} == tb_files
    after = (tensorboard(real), mlflow(real), {p.name: p.read_text() for p in (real / "trackers").iterdir()})
    assert after == before


def test_a_new_machine_replays_the_ledger_to_the_same_result(real, tmp_path):
    fresh = tmp_path / "restored"
    fresh.mkdir()
    shutil.copy(real / "ledger.jsonl", fresh / "ledger.jsonl")
    sync(fresh, ["tensorboard", "mlflow"])
    assert tensorboard(fresh) == tensorboard(real)
    ours, theirs = mlflow(fresh), mlflow(real)
    assert ours == theirs  # timestamps too: they are the facts' times


def test_another_machine_continues_the_same_mlflow_run(real, tmp_path):
    """Two machines, one tracking server: the second (run dir restored: the whole ledger, no cursor) finds the
    MLflow run by its tags and logs only what the server does not hold. A new run reusing the name gets its own."""
    facts = ledger(real)
    uri = f"sqlite:///{tmp_path / 'server.db'}"
    first, second = tmp_path / "first", tmp_path / "second"
    write_ledger(first, facts[:15])
    sync(first, ["mlflow"], mlflow_uri=uri)
    write_ledger(second, facts)
    sync(second, ["mlflow"], mlflow_uri=uri)
    assert mlflow(second, uri)["history"] == mlflow(real)["history"]
    assert list((tmp_path / "artifacts").glob("*/artifacts/restarts.md"))  # beside the database, not ./mlruns
    renamed = [{**f, "ts": f["ts"] + 1000} for f in facts]  # the same name, another ledger: another run
    write_ledger(tmp_path / "third", renamed)
    sync(tmp_path / "third", ["mlflow"], mlflow_uri=uri)
    client, runs = mlflow_runs(uri)
    assert sorted(r.data.tags["supervisor.ledger"] for r in runs) == sorted({str(facts[0]["ts"]),
                                                                             str(renamed[0]["ts"])})  # fmt: skip


def test_incremental_syncs_and_cut_short_writes_end_the_same(real, tmp_path, monkeypatch):
    """One supervisor after another, each with more of the ledger; some die after writing to the trackers but
    before saving the cursors (the cursor write fails): the next one writes nothing twice."""
    facts = ledger(real)
    run_dir = tmp_path / "run"
    save = sync_module.write_cursor
    for end, cut_short in ((4, False), (11, True), (19, False), (24, True), (len(facts), False)):
        write_ledger(run_dir, facts[:end])
        if cut_short:
            monkeypatch.setattr(sync_module, "write_cursor", lambda *a: (_ for _ in ()).throw(OSError("cut short")))
        sync(run_dir, ["tensorboard", "mlflow"])
        monkeypatch.setattr(sync_module, "write_cursor", save)
        if cut_short:
            assert json.loads((run_dir / "trackers" / "tensorboard.batch.json").read_text())["upto"] == end
    assert tensorboard(run_dir) == tensorboard(real)
    assert mlflow(run_dir) == mlflow(real)


def rewinding_ledger(facts: list[dict]) -> list[dict]:
    """The real ledger cut after epoch 3's train fact, then by hand: epoch 4 evaluated but not verified, a crash,
    attempt 3 resuming at epoch 4 (a rewind of what was written), evaluating 4 again and crashing, then attempt 4
    rolling back to epoch 1 (start 2) and training 2..4 anew with other values."""
    cut = next(i for i, f in enumerate(facts) if f["fact"] == "train" and f["epoch"] == 3) + 1
    out = copy.deepcopy(facts[:cut])
    like = {kind: next(f for f in facts if f["fact"] == kind) for kind in
            ("metrics", "checkpoint", "train", "attempt_started", "attempt_ended", "work_lost", "run_ended")}
    ts = [out[-1]["ts"]]

    def add(kind: str, **fields) -> None:
        ts[0] += 0.5
        out.append({**copy.deepcopy(like[kind]), **fields, "ts": round(ts[0], 3)})

    def fail(attempt: int, epoch: int) -> None:
        add("attempt_ended", attempt=attempt, fault="crash", detail="exit 1", failed_epoch=epoch)
        add("work_lost", attempt=attempt, steps=3, seconds=1.5, resume_epoch=epoch - 1, resume_step=None)

    add("train", epoch=None, loss=5.0)  # a fact of the wrong shape: skipped, nothing else changes
    add("metrics", epoch=4, metrics={"AP50": 0.9, "VOCmAP": 0.9})  # never verified: must not stay
    fail(2, 4)
    add("attempt_started", attempt=3, seed=77, load_epoch=3, load_step=None, start_epoch=4, reason="crash")
    add("metrics", epoch=4, metrics={"AP50": 0.8, "VOCmAP": 0.8})  # never verified either
    fail(3, 4)
    add("attempt_started", attempt=4, seed=78, load_epoch=1, load_step=None, start_epoch=2, reason="crash")
    for epoch in (2, 3, 4):
        add("metrics", epoch=epoch, metrics={"AP50": 0.6 + epoch / 100, "VOCmAP": 0.6})
        add("checkpoint", epoch=epoch, attempt=4, sha256=f"{epoch:064d}")
        add("train", epoch=epoch, loss=0.1 / (epoch + 1), steps=3)
    add("attempt_ended", attempt=4, fault=None, detail="", failed_epoch=5)
    add("run_ended", status="completed", diagnosis="all epochs verified")
    return out


def test_a_rewinding_ledger_gives_no_zigzag(real, tmp_path):
    facts = rewinding_ledger(ledger(real))
    run_dir = tmp_path / "rewind"
    write_ledger(run_dir, facts)
    sync(run_dir, ["tensorboard", "mlflow"])
    original_loss, original_ap = train_and_eval(ledger(real))
    final_loss, final_ap = train_and_eval(facts)

    tb = tensorboard(run_dir)
    for points in tb.values():
        clean_curves(points)
    # TensorBoard discarded everything from each rewind's start: the curves are the final line of training.
    assert tb["train/loss"] == sorted(final_loss.items())
    assert tb["eval/AP50"] == sorted(final_ap.items()) and (4, 0.64) in tb["eval/AP50"]
    assert tb["restarts"][-1] == (2, 4.0)
    table = tb["text:restart_log"][-1][1]
    assert "attempt 4 at epoch 2 from epoch 1, seed 78: crash (exit 1); lost 3 steps" in table
    assert "| 4 | 3 | 77 | crash | 3 |" in table and "| 2 | 1 | 78 | crash |" in table

    ml = mlflow(run_dir)
    for points in ml["history"].values():
        clean_curves(points)
    # MLflow got only verified positions: the unverified evals of epoch 4 (0.9, 0.8) never; after the rollback
    # the positions already logged keep their first values and epoch 4 comes from the new line.
    assert [(s, v) for s, v, _ in ml["history"]["train/loss"]] == [*sorted(original_loss.items())[:4],
                                                                   (4, final_loss[4])]  # fmt: skip
    assert [(s, v) for s, v, _ in ml["history"]["eval/AP50"]] == [*sorted(original_ap.items())[:4], (4, 0.64)]
    assert [(s, v) for s, v, _ in ml["history"]["restarts"]] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    assert "seed 78: crash (exit 1); lost 3 steps" in ml["tags"]["supervisor.restart.004"]


def test_a_failing_tracker_warns_once_and_stops_nothing(real, tmp_path, caplog):
    run_dir = tmp_path / "run"
    write_ledger(run_dir, ledger(real))
    (run_dir / "tensorboard").write_text("not a directory")  # the log dir cannot be made
    s = open_trackers(["tensorboard", "mlflow"], "run", run_dir, PARAMS, "epochs")
    assert s is not None
    with caplog.at_level(logging.WARNING, logger="supervisor.trackers"):
        s.sync(run_dir / "ledger.jsonl")
        s.sync(run_dir / "ledger.jsonl")
    warned = [r.getMessage() for r in caplog.records if "tracker tensorboard" in r.getMessage()]
    assert len(warned) == 1 and "cannot write (FileExistsError" in warned[0], warned
    assert mlflow(run_dir) == mlflow(real)  # the other tracker wrote everything
    assert not (run_dir / "trackers" / "tensorboard.json").exists()
    (run_dir / "tensorboard").unlink()
    s.start()
    s.notify(run_dir / "ledger.jsonl")
    assert s.close(timeout_s=180)
    assert tensorboard(run_dir) == tensorboard(real)


def test_open_trackers_names_the_problem(monkeypatch, tmp_path):
    assert open_trackers([], "run", tmp_path, {}, "epochs") is None
    with pytest.raises(ValueError, match="unknown tracker 'neptune': choose from tensorboard, mlflow, wandb"):
        open_trackers(["neptune"], "run", tmp_path, {}, "epochs")
    import importlib.util

    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real_find(name))
    with pytest.raises(ValueError, match=r"needs mlflow, not installed: pip install 'train-supervisor\[mlflow\]'"):
        open_trackers(["tensorboard", "mlflow"], "run", tmp_path, {}, "epochs")


def test_syncing_imports_no_torch(real, tmp_path):
    """The watchdog never imports torch: neither does a sync of both trackers (tensorboardX would)."""
    shutil.copy(real / "ledger.jsonl", tmp_path / "ledger.jsonl")
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from supervisor.trackers import open_trackers
        s = open_trackers(["tensorboard", "mlflow"], "run", Path({str(tmp_path)!r}), {{}}, "epochs")
        s.start(); s.notify(Path({str(tmp_path)!r}) / "ledger.jsonl"); assert s.close(180)
        assert "torch" not in sys.modules, "torch was imported"
        assert (Path({str(tmp_path)!r}) / "trackers" / "mlflow.json").exists()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]


# The translators alone (pure): the cases a real run rarely shows.

def fact(kind: str, ts: float = 0.0, **fields) -> dict:
    return {"fact": kind, "ts": ts, **fields}


def started(attempt: int, load: int, start: int, load_step: int | None = None) -> dict:
    return fact("attempt_started", attempt=attempt, seed=attempt, load_epoch=load, load_step=load_step,
                start_epoch=start, reason="crash" if attempt else "normal start")  # fmt: skip


def test_final_curves_wait_for_a_verified_checkpoint():
    curves = FinalCurves()
    out = []
    facts = [started(0, -1, 0), fact("metrics", epoch=0, metrics={"m": 1.0}),
             fact("metrics", epoch=1, metrics={"m": 2.0}),
             fact("checkpoint", epoch=0), fact("train", epoch=0, loss=0.5),
             # a mid-epoch checkpoint of epoch 1 makes only epoch 0 final; the resume from it drops epoch 1's eval
             fact("checkpoint", epoch=1, step=2), started(1, 1, 1, load_step=2),
             fact("metrics", epoch=1, metrics={"m": 3.0, "bad": float("nan")}), fact("checkpoint", epoch=1)]
    for f in facts:
        out += [p[:3] for op in curves.feed(f) if isinstance(op, Metrics) for p in op.points]
    assert out == [("eval/m", 0, 1.0), ("train/loss", 0, 0.5), ("eval/m", 1, 3.0)]


def test_live_curves_purge_at_a_rewind_and_keep_the_params():
    curves = LiveCurves({"lr": 1})
    ops = []
    for f in [started(0, -1, 0), fact("metrics", epoch=0, metrics={"m": 1.0}), started(1, -1, 0),
              fact("metrics", epoch=0, metrics={"m": 2.0})]:  # fmt: skip
        ops += curves.feed(f)
    kinds = [type(op).__name__ for op in ops]
    assert kinds == ["Params", "Scalar", "Purge", "Params", "Scalar", "Scalar", "Scalar", "Text", "Scalar"]
    assert ops[2] == Purge(0, 0.0) and ops[-1] == Scalar("eval/m", 0, 2.0, 0.0)


def wandb_records(run_dir: Path) -> list:
    """The records of the offline W&B run files under the run dir (LevelDB log blocks of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2

    records = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, buf = path.read_bytes(), 7, b""  # a 7-byte header: ":W&B", magic, version
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:  # a block's tail too short for a record header is padding
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            buf += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a full record, or the last part of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(buf)
                records.append(record)
                buf = b""
    return records


def test_wandb_offline_run_of_a_rewinding_ledger(real, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp_path / "cfg"),
                       "WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_DATA_DIR": str(tmp_path / "data")}.items():
        monkeypatch.setenv(var, value)
    facts = rewinding_ledger(ledger(real))
    run_dir = tmp_path / "rewind"
    write_ledger(run_dir, facts[:20])  # one supervisor, then the next one with the rest of the ledger
    sync(run_dir, ["wandb"])
    write_ledger(run_dir, facts)
    sync(run_dir, ["wandb"])
    sync(run_dir, ["wandb"])  # nothing new: not even a W&B run
    runs = list(run_dir.glob("wandb/offline-run-*"))
    assert len(runs) == 2, runs
    records = wandb_records(run_dir)
    curves: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        if r.WhichOneof("record_type") != "history":
            continue
        row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        axis = "position" if "position" in row else "attempt"
        for key, value in row.items():
            if key != axis and not key.startswith("_") and isinstance(value, (int, float)):
                curves.setdefault(key, []).append((row[axis], round(value, 6)))
    for points in curves.values():
        clean_curves(points)
    original_loss, _ = train_and_eval(ledger(real))
    final_loss, _ = train_and_eval(facts)
    assert curves["train/loss"] == [*sorted(original_loss.items())[:4], (4, final_loss[4])]
    assert curves["restarts"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    summary = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "summary"
               for item in r.summary.update if item.key}  # fmt: skip
    assert "seed 78: crash (exit 1); lost 3 steps" in summary["supervisor/restart_004"]
    assert summary["supervisor/status"] == "completed" and summary["supervisor/facts"] == len(facts)
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert {(r.run_id, r.display_name, r.project) for r in runs} == {(runs[0].run_id, "run", "supervisor")}
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [0, 0]


def test_the_supervisor_writes_its_trackers_while_the_run_goes_and_a_second_start_adds_nothing(tmp_path):
    """[record] trackers in run.toml: `supervisor start` writes both trackers itself (the trainer logs nothing),
    one tracker run across the attempts; the run's params are the trainer's [trainer.params]."""
    toml = write_run(tmp_path, epochs=4, params={"faults": [FAULTS[0]]}, record={"trackers": ["tensorboard", "mlflow"]})
    out = cli("start", "-q", str(toml), timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "writing the run to tensorboard, mlflow" in out.stderr
    run_dir = tmp_path / "runs" / "run"
    facts = ledger(run_dir)
    loss, ap50 = train_and_eval(facts)
    tb, ml = tensorboard(run_dir), mlflow(run_dir)
    assert tb["train/loss"] == sorted(loss.items()) and tb["eval/AP50"] == sorted(ap50.items())
    assert [(s, v) for s, v, _ in ml["history"]["eval/AP50"]] == sorted(ap50.items())
    assert ml["params"]["steps_per_epoch"] == "3" and ml["status"] == "FINISHED"
    assert "seed 28" in ml["tags"]["supervisor.restart.001"]
    again = cli("start", "-q", str(toml), timeout=120)  # completed: nothing new but its own session facts
    assert again.returncode == 0, again.stderr[-2000:]
    assert mlflow(run_dir)["history"] == ml["history"] and tensorboard(run_dir)["train/loss"] == tb["train/loss"]
