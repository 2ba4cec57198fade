"""The experiment record, through the real CLI with the fake trainer: a baseline, a run that starts from the
baseline's checkpoint ([init]) with other parameters and a NaN restart, notes, an early stop, more epochs for a
finished run, `report --all`, and the record read from the store alone. The markdown and JSON records are
checked field by field (the fake trainer's AP50 is 0.5 + epoch / 100, VOCmAP 0.01 below it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import FAKE, cli, ledger, toml_value

pytestmark = pytest.mark.slow


def run_toml(home: Path, runs: Path, name: str, epochs: int, params: dict | None = None, top: str = "",
             **tables: dict) -> Path:  # fmt: skip
    """A run.toml of run `name` with its run dir in the shared folder `runs` (so runs find each other)."""
    home.mkdir(parents=True, exist_ok=True)
    lines = [f'name = "{name}"', f"epochs = {epochs}", f"run_dir = {toml_value(str(runs / '{name}'))}", top, "",
             "[trainer]", f"command = {toml_value(['python', str(FAKE)])}", "", "[trainer.params]"]  # fmt: skip
    lines += [f"{k} = {toml_value(v)}" for k, v in {"steps_per_epoch": 3, "step_s": 0.01, **(params or {})}.items()]
    tables = {"restart": {"backoff_initial_s": 0.05, "backoff_max_s": 0.2}, **tables}
    for table, values in tables.items():
        lines += ["", f"[{table}]"] + [f"{k} = {toml_value(v)}" for k, v in values.items()]
    path = home / "run.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def start(toml: Path, code: int = 0):
    out = cli("start", "-q", str(toml), timeout=180)
    assert out.returncode == code, out.stderr[-3000:]
    return out


def report(target: str | Path, *more: str) -> dict:
    out = cli("report", str(target), "--format", "json", *more)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_run_from_a_baseline_records_its_parent_params_changes_deltas_notes_and_restarts(tmp_path):
    runs = tmp_path / "runs"
    base = run_toml(tmp_path / "base", runs, "base", 4, {"lr": 0.1, "lambda_obj": 50.0})
    start(base)
    child = run_toml(tmp_path / "child", runs, "child", 6, {"lr": 0.05, "lambda_obj": 50.0, "cycles": 2,
                     "faults": [{"kind": "nan", "attempt": 0, "epoch": 4, "step": 1}]},  # fmt: skip
                     record={"purpose": "a second cosine cycle from epoch 2", "notes": ["from the log"],
                             "baselines": ["base"]},
                     init={"from_run": "base", "epoch": 2})  # fmt: skip
    out = start(child)
    assert "starting from run 'base' at epoch 2" in out.stderr
    assert cli("note", str(child), "flat after the restart,", "as before").returncode == 0

    rep = report(child)
    base_ckpt = next(f for f in ledger(runs / "base") if f["fact"] == "checkpoint" and f["epoch"] == 2)
    assert rep["parent"] == {"run": "base", "epoch": 2, "sha256": base_ckpt["sha256"]}
    assert [(r["epoch"], r["load_epoch"], r["reason"]) for r in rep["restarts"]] == [
        (3, 2, "normal start"), (4, 3, "nan")]  # the epoch count goes on from the parent's epoch 2
    assert rep["params"]["lr"] == 0.05 and rep["param_changes"] == {
        "against": "base", "changes": {"cycles": {"from": None, "to": 2}, "faults": rep["param_changes"]["changes"][
            "faults"], "lr": {"from": 0.1, "to": 0.05}}}  # fmt: skip
    assert rep["purpose"] == "a second cosine cycle from epoch 2"
    assert rep["notes"] == ["from the log", "flat after the restart, as before"]
    assert rep["best"]["AP50"]["value"] == pytest.approx(0.55) and rep["best"]["AP50"]["epoch"] == 5
    (b,) = rep["baselines"]
    assert b["run"] == "base" and b["best"]["AP50"]["value"] == pytest.approx(0.53) and b["best"]["AP50"]["epoch"] == 3
    assert b["deltas"]["AP50"]["delta"] == pytest.approx(2.0) and b["deltas"]["AP50"]["unit"] == "points"
    assert b["deltas"]["VOCmAP"]["delta"] == pytest.approx(2.0)
    assert rep["early_stop"] is None and rep["work_lost"]["nan"]["attempts"] == 1

    md = cli("report", str(child)).stdout
    for line in ("* purpose: a second cosine cycle from epoch 2", "* from: `base` @ epoch 2",
                 "* note: flat after the restart, as before", "* max AP50: 55.00% @ epoch 5, + 2.00% [base]",
                 "* max VOCmAP: 54.00% @ epoch 5, + 2.00% [base]",
                 "* significant parameter changes against `base`:", "  lr = 0.05  # was 0.1",
                 "  cycles = 2  # was null", "| 3 | 2 | 29 | normal start |", "| 4 | 3 | 28 | nan |"):  # fmt: skip
        assert line in md, (line, md)
    assert "lambda_obj" not in md.split("parameters</summary>")[0]  # unchanged: not a change

    # the whole log: an index table first, then every run
    whole = cli("report", "--all", str(runs))
    assert whole.returncode == 0, whole.stderr
    assert "| [base](#base) |" in whole.stdout and "| [child](#child) |" in whole.stdout
    assert "| 53.00% @ 3 | 52.00% @ 3 | 4 epochs | 0 | completed |" in whole.stdout
    assert "| 55.00% @ 5 | 54.00% @ 5 | 6 epochs | 1 | completed |" in whole.stdout
    assert whole.stdout.index("# base") < whole.stdout.index("# child")
    assert [r["name"] for r in json.loads(cli("report", "--all", str(runs), "--format", "json").stdout)["runs"]] == [
        "base", "child"]


def test_an_early_stop_rule_ends_the_run_early_stopped_and_the_record_names_it(tmp_path):
    runs = tmp_path / "runs"
    rule = 'early_stop = [{metric = "AP50", below = 0.53, at = 2}]'
    toml = run_toml(tmp_path / "es", runs, "es", 8, {"step_s": 0.05}, top=rule)
    out = start(toml)
    assert "early stop: AP50 below 0.53 at epoch 2" in out.stderr
    rep = report(toml)
    assert rep["status"] == "early stopped"
    assert rep["early_stop"] == {"rule": "AP50 below 0.53 at epoch 2", "metric": "AP50", "value": pytest.approx(0.52),
                                 "epoch": 2}  # fmt: skip
    assert max(rep["checkpoints"], default=-1) < 7
    assert "* early stop: AP50 below 0.53 at epoch 2 (AP50 52.00% at epoch 2)" in cli("report", str(toml)).stdout
    attempts = len(rep["attempts"])
    start(toml)  # the rule still fires on the record: no new attempt
    assert len(report(toml)["attempts"]) == attempts and report(toml)["status"] == "early stopped"


def test_a_finished_run_given_more_epochs_goes_on_from_its_last_one(tmp_path):
    runs = tmp_path / "runs"
    toml = run_toml(tmp_path / "more", runs, "more", 3)
    start(toml)
    toml.write_text(toml.read_text().replace("epochs = 3", "epochs = 5"))
    start(toml)
    rep = report(toml)
    assert [(r["epoch"], r["load_epoch"], r["reason"]) for r in rep["restarts"]] == [
        (0, -1, "normal start"), (3, 2, "extended")]
    assert rep["status"] == "completed" and 4 in rep["checkpoints"]


def test_the_record_is_read_from_the_store_alone(tmp_path):
    runs = tmp_path / "runs"
    store = {"url": f"file://{tmp_path / 'bucket'}"}
    base = run_toml(tmp_path / "b", runs, "base", 3, storage=store)
    start(base)
    child = run_toml(tmp_path / "c", runs, "child", 4, storage=store, record={"baselines": ["base"]},
                     init={"from_run": "base", "epoch": 1})  # fmt: skip
    shutil.rmtree(runs / "base")  # the parent's run dir is gone: its checkpoint comes from the store
    start(child)
    shutil.rmtree(runs)  # nothing local: every record from the store
    rep = report(child)
    assert rep["parent"]["run"] == "base" and rep["baselines"][0]["deltas"]["AP50"]["delta"] == pytest.approx(1.0)
    by_url = report(f"file://{tmp_path / 'bucket'}/child")
    assert by_url["restarts"] == rep["restarts"]
    whole = cli("report", "--all", f"file://{tmp_path / 'bucket'}")
    assert whole.returncode == 0 and "| [base](#base) |" in whole.stdout and "| [child](#child) |" in whole.stdout
    missing = cli("report", f"file://{tmp_path / 'bucket'}/nope")
    assert missing.returncode == 2 and "holds no run" in missing.stderr
