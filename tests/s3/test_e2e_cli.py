"""The supervisor with [storage] on a real SeaweedFS, through the real CLI: resume on a fresh
machine (run dir), one writer per run, drain on pause, and no secret in any output."""

from __future__ import annotations

import json
import os
import signal
import uuid
from pathlib import Path

from conftest import cli, ledger, report, start_bg, wait_for, write_run


def storage_table(weed, prefix: str, **extra) -> dict:
    return {"url": f"s3://{weed.bucket}/{prefix}", "endpoint_url": weed.endpoint, "region": "us-east-1",
            "addressing_style": "path", "lease_ttl_s": 3.0, "drain_timeout_s": 60.0, **extra}  # fmt: skip


def machine(tmp_path: Path, name: str, weed, prefix: str, **kw) -> Path:
    """A run.toml in its own folder: another machine's run dir, the same run and bucket."""
    d = tmp_path / name
    d.mkdir()
    return write_run(d, epochs=kw.pop("epochs", 5), storage=storage_table(weed, prefix), **kw)


def committed_epochs(weed, prefix: str) -> list[int]:
    resp = weed.client().list_objects_v2(Bucket=weed.bucket, Prefix=f"{prefix}/run/manifest/")
    return sorted(int(o["Key"].rsplit("-", 1)[1].split(".")[0]) for o in resp.get("Contents", []))


def all_outputs(*dirs: Path) -> str:
    text = []
    for d in dirs:
        for path in d.rglob("*"):
            if path.is_file() and path.suffix in (".jsonl", ".log", ".json", ".toml", ".txt"):
                text.append(path.read_text(errors="replace"))
    return "\n".join(text)


def test_vanished_machine_resumes_on_a_fresh_one_and_secrets_stay_out(weed, tmp_path):
    prefix = uuid.uuid4().hex[:10]
    a = machine(tmp_path, "a", weed, prefix, params={"step_s": 0.1, "ckpt_bytes": 3_000_000})
    a_dir = a.parent / "runs" / "run"
    proc = start_bg(a)
    wait_for(lambda: len(committed_epochs(weed, prefix)) >= 2, timeout=60, what="two committed checkpoints")
    os.kill(proc.pid, signal.SIGKILL)  # the machine vanishes: no drain, no lease release
    _, a_err = proc.communicate(timeout=10)

    b = machine(tmp_path, "b", weed, prefix, params={"step_s": 0.1, "ckpt_bytes": 3_000_000})
    outs = [cli("start", str(b), timeout=180)]
    if outs[0].returncode == 2:  # the dead machine's lease has not expired yet: refused, naming it
        assert "lease" in outs[0].stderr or "held" in outs[0].stderr, outs[0].stderr

        def resumed():
            outs.append(cli("start", str(b), timeout=180))
            return outs[-1].returncode != 2

        wait_for(resumed, timeout=30, interval=1, what="the lease to expire and the run to resume")
    out = outs[-1]
    assert out.returncode == 0, out.stderr
    rep = report(b)
    assert rep["status"] == "completed", rep
    rows = rep["restarts"]
    assert rows[0]["reason"] == "normal start" and rows[1]["reason"] == "session lost"
    assert rows[1]["load_epoch"] >= 1 and rows[1]["seed"] != rows[0]["seed"]
    b_dir = b.parent / "runs" / "run"
    assert f"downloaded checkpoint epoch {rows[1]['load_epoch']}" in out.stderr
    assert committed_epochs(weed, prefix)[-1] == 4
    secret = weed.secret_key
    assert secret not in all_outputs(a_dir, b_dir) + a_err + "".join(o.stdout + o.stderr for o in outs)


def test_second_machine_is_refused_while_the_first_drives_the_run(weed, tmp_path):
    prefix = uuid.uuid4().hex[:10]
    a = machine(tmp_path, "a", weed, prefix, epochs=200, params={"step_s": 0.05})
    proc = start_bg(a)
    try:
        wait_for(lambda: committed_epochs(weed, prefix), timeout=60, what="a committed checkpoint")
        b = machine(tmp_path, "b", weed, prefix, epochs=200)
        out = cli("start", str(b))
        assert out.returncode == 2, out.stderr
        line = out.stderr.strip().splitlines()[-1]
        assert "held by" in line or "lease" in line, out.stderr
        assert str(proc.pid) in line or "host" in line
        assert not (b.parent / "runs" / "run" / "ledger.jsonl").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 75


def test_pause_drains_uploads_and_another_machine_continues(weed, tmp_path):
    prefix = uuid.uuid4().hex[:10]
    # 12 epochs of 0.6 s: the stop (a new process) lands long before the run could complete by itself.
    a = machine(tmp_path, "a", weed, prefix, epochs=12, params={"step_s": 0.2, "ckpt_bytes": 20_000_000})
    a_dir = a.parent / "runs" / "run"
    proc = start_bg(a)
    wait_for(lambda: any(f["fact"] == "checkpoint" and f["epoch"] >= 2 for f in ledger(a_dir)), timeout=60,
             what="epoch 2 verified")  # fmt: skip
    out = cli("stop", str(a), "--wait", "90")
    assert out.returncode == 0, out.stderr
    assert proc.wait(timeout=90) == 75
    verified = report(a)["checkpoints"]
    ended = [f for f in ledger(a_dir) if f["fact"] == "run_ended"][-1]
    assert ended["status"] == "paused" and ended["not_uploaded"] == []
    assert set(verified) <= set(committed_epochs(weed, prefix))  # everything verified made it up

    c = machine(tmp_path, "c", weed, prefix, epochs=12, params={"step_s": 0.01, "ckpt_bytes": 20_000_000})
    out = cli("start", str(c), timeout=180)
    assert out.returncode == 0, out.stderr
    rows = report(c)["restarts"]
    assert rows[-1]["reason"] == "stopped" and rows[-1]["load_epoch"] == max(verified)
    remote_ledger = weed.client().get_object(Bucket=weed.bucket, Key=f"{prefix}/run/ledger.jsonl")["Body"].read()
    facts = [json.loads(x) for x in remote_ledger.decode().splitlines()]
    assert facts[-1]["fact"] == "run_ended" and facts[-1]["status"] == "completed"


def test_secret_in_run_toml_is_refused_without_echoing_it(tmp_path):
    toml = write_run(tmp_path, storage={"url": "s3://b/p", "secret_access_key": "wJalrXUtnFEMI/K7MDENG"})
    out = cli("start", str(toml))
    assert out.returncode == 2
    assert "storage.secret_access_key" in out.stderr and "AWS_SECRET_ACCESS_KEY" in out.stderr
    assert "wJalrXUtnFEMI" not in out.stderr + out.stdout


def test_frozen_supervisor_loses_its_lease_and_stops_writing(weed, tmp_path):
    """A supervisor frozen past its lease (SIGSTOP: a partition, a suspended VM) is taken over;
    when it wakes it finds the lease lost, kills its trainer and writes nothing more (fencing)."""
    import psutil

    prefix = uuid.uuid4().hex[:10]
    a = machine(tmp_path, "a", weed, prefix, epochs=400, params={"step_s": 0.05})
    a_dir = a.parent / "runs" / "run"
    proc = start_bg(a)
    wait_for(lambda: committed_epochs(weed, prefix), timeout=60, what="a committed checkpoint")
    trainer_tree = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        b = machine(tmp_path, "b", weed, prefix, epochs=3)
        outs = []

        def taken_over():
            outs.append(cli("start", str(b), timeout=120))
            return outs[-1].returncode != 2

        wait_for(taken_over, timeout=30, interval=1, what="B to take the expired lease over")
        assert outs[-1].returncode == 0, outs[-1].stderr
        facts_before = len(ledger(a_dir))
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert proc.wait(timeout=60) == 2
    err = proc.stderr.read()
    assert "taken over by another supervisor" in err
    assert len(ledger(a_dir)) == facts_before  # not a line more after waking up
    wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                             for p in trainer_tree), timeout=10, what="A's trainer to die")  # fmt: skip


def test_the_record_of_a_run_comes_from_the_bucket_alone(weed, tmp_path):
    """`report s3://bucket/prefix/NAME` and `report --all s3://bucket/prefix`: the record from the store, with no
    run dir anywhere (what a teammate on another machine sees), credentials from the standard chain."""
    import shutil

    prefix = f"rec-{uuid.uuid4().hex[:8]}"
    base = machine(tmp_path, "a", weed, prefix, epochs=2)
    assert cli("start", "-q", str(base)).returncode == 0
    shutil.rmtree(tmp_path / "a" / "runs")
    url = f"s3://{weed.bucket}/{prefix}"
    one = cli("report", f"{url}/run", "--endpoint-url", weed.endpoint, "--format", "json")
    assert one.returncode == 0, one.stderr
    rep = json.loads(one.stdout)
    assert rep["status"] == "completed" and rep["checkpoints"] == [0, 1] and rep["best"]["AP50"]["epoch"] == 1
    whole = cli("report", "--all", url, env={"AWS_ENDPOINT_URL": weed.endpoint})
    assert whole.returncode == 0, whole.stderr
    assert "| [run](#run) |" in whole.stdout and "# run" in whole.stdout
    assert weed.secret_key not in one.stdout + one.stderr + whole.stdout + whole.stderr
