"""Spot notices on a real SeaweedFS, scaled down in time: the final mid-epoch checkpoint is in the store
before the machine would go, and another machine resumes at its step with the same seed.

The metadata service is a local HTTP server playing AWS IMDSv2 (`spot/instance-action` with the
termination time) or GCP (`instance/preempted`, whose notice names no time: the window applies,
`[platform] notice_window_s` scales GCP's 30 s down). Checkpoints are 40 MB so their upload matters.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
from conftest import cli, ledger, report, start_bg, wait_for, write_run
from metadata_server import FakeMetadata

from .test_e2e_cli import storage_table

CKPT = 40_000_000
STEPS = 100
PARAMS = {"steps_per_epoch": STEPS, "step_s": 0.03, "handles_requests": True, "ckpt_bytes": CKPT}


def committed(weed, prefix: str) -> list[str]:
    resp = weed.client().list_objects_v2(Bucket=weed.bucket, Prefix=f"{prefix}/run/manifest/")
    return sorted(o["Key"].rsplit("/", 1)[1] for o in resp.get("Contents", []))


def steps_seen(run_dir: Path) -> int:
    path = run_dir / "attempts" / "attempt-0000.events.jsonl"
    if not path.exists():
        return 0
    return sum(1 for x in path.read_text().splitlines() if '"event":"step"' in x)


@pytest.mark.parametrize("cloud, window", [("aws", 20.0), ("gcp", 12.0)])
def test_spot_notice_commits_the_final_checkpoint_before_the_window_ends(weed, tmp_path, cloud, window):
    prefix = uuid.uuid4().hex[:10]
    meta = FakeMetadata()
    platform = {"spot": cloud, "metadata_url": meta.url, "notice_poll_s": 0.2}
    if cloud == "gcp":
        platform["notice_window_s"] = window  # GCP's 30 s, scaled down
    a_home = tmp_path / "a"
    a_home.mkdir()
    a = write_run(a_home, epochs=2, params=PARAMS, storage=storage_table(weed, prefix), platform=platform)
    a_dir = a_home / "runs" / "run"
    try:
        proc = start_bg(a)
        wait_for(lambda: "epoch-0000.json" in committed(weed, prefix), timeout=60, what="epoch 0 in the store")
        wait_for(lambda: steps_seen(a_dir) >= STEPS + 10, timeout=60, what="epoch 1 step 10")
        ends = meta.interrupt(window) if cloud == "aws" else (meta.interrupt(), time.time() + window)[1]
        assert proc.wait(timeout=window + 30) == 75
    finally:
        meta.close()
    facts = ledger(a_dir)
    mid = [f for f in facts if f["fact"] == "checkpoint" and f.get("step") is not None]
    assert len(mid) == 1 and mid[0]["epoch"] == 1, mid
    end = [f for f in facts if f["fact"] == "run_ended"][-1]
    assert end["status"] == "paused" and end["not_uploaded"] == []
    assert end["ts"] < ends  # committed (the drain waited for it) before the machine would have gone
    assert f"epoch-0001-step-{mid[0]['step']:08d}.json" in committed(weed, prefix)
    assert report(a)["attempts"][0]["ended_by"] == "preempted"

    b_home = tmp_path / "b"  # another machine: an empty run dir, the same bucket
    b_home.mkdir()
    b = write_run(b_home, epochs=2, params=PARAMS, storage=storage_table(weed, prefix), platform={"spot": "off"})
    out = cli("start", str(b), timeout=180)
    assert out.returncode == 0, out.stderr
    rows = report(b)["restarts"]
    assert rows[1]["reason"] == "preempted" and rows[1]["seed"] == rows[0]["seed"]
    assert (rows[1]["epoch"], rows[1]["load_epoch"], rows[1]["load_step"]) == (1, 1, mid[0]["step"])
    b_dir = b_home / "runs" / "run"
    first = next(json.loads(x) for x in (b_dir / "attempts" / "attempt-0001.events.jsonl").read_text().splitlines()
                 if '"event":"step"' in x)  # fmt: skip
    assert (first["epoch"], first["step"]) == (1, mid[0]["step"])
