"""The pure parts of step-exact pauses: the deadline plan, the exact-resume policy, the ledger's mid-epoch
records, the checkpoint rules for steps, notice deadlines, requests and the new config keys."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from metadata_server import FakeMetadata

from supervisor import deadline as D
from supervisor import ledger as L
from supervisor import policy
from supervisor import protocol as P
from supervisor.checkpoints import EventRules
from supervisor.config import ConfigError, RestartConfig, parse_config
from supervisor.platforms.notices import NoticePoller, check_aws, check_azure
from supervisor.store.base import END_OF_EPOCH, CheckpointRecord

# -- the deadline plan ---------------------------------------------------------------------------


def test_final_checkpoint_time_adds_step_save_and_upload_with_safety():
    costs = D.Costs(step_s=2.0, save_s=4.0, size=100_000_000, upload_bps=10_000_000)
    assert D.upload_s(costs) == 10.0
    assert D.upload_s(costs, backlog=50_000_000) == 15.0
    assert D.final_checkpoint_s(costs) == pytest.approx(D.SAFETY * 16.0 + D.RESERVE_S)
    assert D.time_limit_margin(costs, floor_s=120.0) == 120.0  # the floor wins when it is larger
    assert D.time_limit_margin(costs, floor_s=1.0, backlog=400_000_000) == pytest.approx(
        D.SAFETY * (2 + 4 + 50) + D.RESERVE_S)  # fmt: skip
    assert D.final_checkpoint_s(D.Costs()) == D.RESERVE_S  # nothing measured: only the reserve


def test_pause_and_drain_budgets_are_bounded_by_the_time_left():
    costs = D.Costs(size=10_000_000, upload_bps=1_000_000)
    assert D.pause_budget(None, costs, 0, default_s=30.0) == 30.0
    assert D.pause_budget(60.0, costs, 0, default_s=30.0) == pytest.approx(60 - D.SAFETY * 10 - D.END_RESERVE_S)
    assert D.pause_budget(5.0, costs, 0, default_s=30.0) == 0.0  # no time to save: straight to SIGTERM
    # at the moment the time limit pauses, the trainer gets its measured step and save plus the plan's slack
    timed = D.Costs(step_s=1.0, save_s=2.0, size=10_000_000, upload_bps=1_000_000)
    left = D.time_limit_margin(timed, floor_s=0.0)
    assert D.pause_budget(left, timed, 0, 30.0) == pytest.approx(D.SAFETY * 3.0 + D.RESERVE_S - D.END_RESERVE_S)
    assert D.drain_budget(None, 300.0) == 300.0
    assert D.drain_budget(20.0, 300.0) == 19.0
    assert D.drain_budget(-3.0, 300.0) == 0.0


def test_auto_interval_follows_checkfreq_and_never_queues_saves():
    probe, why = D.auto_interval(D.Costs(), 0.035)
    assert probe == D.PROBE_S and why.startswith(D.PROBE_WHY)
    seconds, why = D.auto_interval(D.Costs(stall_s=0.7, save_s=0.9), 0.035)
    assert seconds == pytest.approx(20.0) and "stall" in why
    # a slow upload: the next save must not start before the last one is in the store
    seconds, _ = D.auto_interval(D.Costs(stall_s=0.1, save_s=2.1, size=600_000_000, upload_bps=10_000_000), 0.035)
    assert seconds == pytest.approx(62.0)
    assert D.auto_interval(D.Costs(stall_s=0.01, save_s=0.01), 0.5)[0] == D.MIN_INTERVAL_S
    # the measured cost (stall + slowdown while writing) wins over the stall alone
    seconds, why = D.auto_interval(D.Costs(stall_s=0.02, save_s=0.5, cost_s=0.7), 0.035)
    assert seconds == pytest.approx(20.0) and why.startswith("cost 0.7s")


def test_save_cost_counts_the_steps_the_write_took_away():
    steps = [float(t) for t in range(10)] + [10.0 + 2 * i for i in range(1, 4)] + [16.0 + i for i in range(1, 5)]
    # one step a second, but three steps of 2 s while the save ran from 10 s to 16 s: 3 s lost, stall 0.1 s
    assert D.save_cost((10.0, 16.0), steps, 1.0, 0.1) == pytest.approx(3.0)
    assert D.save_cost((0.0, 5.0), steps, 1.0, 0.1) == pytest.approx(0.1)  # no slowdown: just the stall


def test_costs_from_a_plan_fact_ignore_junk():
    costs = D.Costs.from_plan({"step_s": 0.5, "save_s": "x", "stall_s": -1, "size": 1e6, "upload_bps": True})
    assert costs == D.Costs(step_s=0.5, size=1_000_000)
    merged = D.Costs(save_s=2.0).merged(costs)
    assert merged.step_s == 0.5 and merged.save_s == 2.0
    assert D.median_interval([0.0, 1.0, 2.0, 10.0]) == 1.0 and D.median_interval([3.0]) is None


def test_shortfalls_name_the_window_and_the_costs():
    costs = D.Costs(step_s=1.0, save_s=5.0, size=1_000_000_000, upload_bps=20_000_000)  # 50 s upload
    lines = D.shortfalls(costs, {"the SIGTERM grace": 10.0, "an AWS notice": 120.0})
    assert len(lines) == 1 and lines[0].startswith("the SIGTERM grace (10s)")
    assert "1000 MB at 20 MB/s" in lines[0] and "every_s" in lines[0]
    assert D.shortfalls(D.Costs(), {"the SIGTERM grace": 1.0}) == []  # nothing known: nothing to say


# -- the policy ---------------------------------------------------------------------------------


def _view(*facts: dict) -> L.RunView:
    return L.fold([{"ts": 0, **f} for f in facts])


def _started(n: int, seed: int, load_epoch: int, load_step: int | None = None) -> dict:
    start = load_epoch if load_step is not None else load_epoch + 1
    return {"fact": "attempt_started", "attempt": n, "seed": seed, "load_epoch": load_epoch, "load_step": load_step,
            "start_epoch": start, "reason": "x"}  # fmt: skip


def _ckpt(epoch: int, step: int | None = None, attempt: int = 0) -> dict:
    name = P.checkpoint_name(epoch, step=step)
    fact = {"fact": "checkpoint", "epoch": epoch, "path": f"checkpoints/{name}", "size": 1,
            "sha256": f"h{epoch}.{step}", "attempt": attempt}  # fmt: skip
    return fact if step is None else {**fact, "step": step}


def _ended(n: int, fault: str, failed_epoch: int = 1) -> dict:
    return {"fact": "attempt_ended", "attempt": n, "fault": fault, "failed_epoch": failed_epoch, "steps": 5}


@pytest.mark.parametrize("fault", ["stopped", "time limit", "preempted"])
def test_a_pause_resumes_from_the_newest_checkpoint_with_the_same_seed(fault):
    view = _view(_started(0, 29, -1), _ckpt(0), _ckpt(1, 7), _ended(0, fault), {"fact": "run_ended",
                                                                               "status": "paused"})  # fmt: skip
    launch = policy.first_launch(view, [29, 28], "run", epochs=4)
    assert launch == policy.Launch(load_epoch=1, load_step=7, seed=29, reason=fault)
    assert launch.start_epoch == 1
    view = _view(_started(0, 29, -1), _ckpt(0), _ended(0, fault))
    launch = policy.first_launch(view, [29, 28], "run", epochs=4)
    assert (launch.load_epoch, launch.load_step, launch.seed, launch.start_epoch) == (0, None, 29, 1)


def test_session_lost_is_exact_only_with_a_newer_mid_epoch_checkpoint():
    lost = _view(_started(0, 29, -1), _ckpt(0), _ckpt(1, 3), _ended(0, "session lost"))
    assert policy.first_launch(lost, [29, 28], "run", 4) == policy.Launch(1, 29, "session lost", load_step=3)
    plain = _view(_started(0, 29, -1), _ckpt(0), _ended(0, "session lost"))
    launch = policy.first_launch(plain, [29, 28], "run", 4)
    assert (launch.load_epoch, launch.load_step, launch.seed) == (0, None, 28)


def test_faults_ignore_mid_epoch_checkpoints_and_rotate_the_seed():
    view = _view(_started(0, 29, 0, 7), _ckpt(0), _ckpt(1, 12), _ended(0, "nan", failed_epoch=1))
    launch = policy.decide(view, RestartConfig(), [29, 28], "run", 4, 0.5)
    assert (launch.load_epoch, launch.load_step, launch.seed, launch.reason) == (0, None, 28, "nan")
    gave_up = _view(_started(0, 29, -1), _ckpt(0), _ckpt(1, 3), _ended(0, "stopped"),
                    {"fact": "run_ended", "status": "gave up"})  # fmt: skip
    assert policy.first_launch(gave_up, [29, 28], "run", 4).seed == 28  # after a give-up: the log's rule


# -- the ledger ----------------------------------------------------------------------------------


def test_ledger_keeps_mid_epoch_records_apart_and_orders_by_position():
    view = _view(_ckpt(0), _ckpt(1, 5), _ckpt(1, 9), _ckpt(1))
    assert view.verified_epochs() == [0, 1] and sorted(view.partials) == [(1, 5), (1, 9)]
    assert view.high_water == 1 and view.newest().step is None  # the end of epoch 1 is after step 9
    view = _view(_ckpt(0), _ckpt(1, 5), {"fact": "checkpoint_removed", "epoch": 1, "step": 5, "sha256": "h1.5"})
    assert view.partials == {} and view.newest().epoch == 0 and view.removed == [(1, "h1.5")]
    view = _view(_ckpt(0), _ckpt(1, 0))  # step 0 is no mid-epoch checkpoint: skipped with a warning
    assert view.partials == {} and "wrong shape" in view.skipped[0]
    view = _view(_started(0, 29, 1, 5), {"fact": "work_lost", "attempt": 0, "steps": 4, "seconds": 2.5})
    assert (view.attempts[0].load_step, view.attempts[0].start_step, view.attempts[0].lost_steps) == (5, 5, 4)
    assert view.restart_rows()[0] == {"epoch": 1, "load_epoch": 1, "load_step": 5, "seed": 29, "reason": "x"}
    assert CheckpointRecord(1, "p", 1, "h").position == (1, END_OF_EPOCH) > CheckpointRecord(1, "p", 1, "h", 9).position


# -- the checkpoint rules --------------------------------------------------------------------------


def _rules(tmp: Path, start_epoch: int = 1, start_step: int = 0) -> EventRules:
    return EventRules(start_epoch, 4, lambda e, s=None: tmp / P.checkpoint_name(e, step=s), Path, start_step)


def _feed(rules: EventRules, **data):
    return rules.feed(P.Event(data.pop("event", "checkpoint"), data), True, now=100.0)


def test_mid_epoch_announcements_must_lie_after_the_start_on_the_step_path(tmp_path):
    rules = _rules(tmp_path, start_epoch=1, start_step=5)
    path = str(tmp_path / P.checkpoint_name(1, step=5))
    assert "not after the attempt's start" in _feed(rules, epoch=1, step=5, path=path).refused[0]
    assert "not the run's checkpoint path" in _feed(rules, epoch=1, step=6, path=path).refused[0]
    assert "whole number" in _feed(rules, epoch=1, step=True, path=path).refused[0]
    assert "whole number" in _feed(rules, epoch=1, step=0, path=path).refused[0]
    ok = _feed(rules, epoch=1, step=6, path=str(tmp_path / P.checkpoint_name(1, step=6)), sha256="a" * 64, t=50.0)
    assert [(a.epoch, a.step) for a in ok.checkpoints] == [(1, 6)] and ok.checkpoints[0].claims_sha256
    assert rules.epoch == 1  # a mid-epoch checkpoint does not finish the epoch
    assert _feed(rules, epoch=1, step=6, path=str(tmp_path / P.checkpoint_name(1, step=6))).checkpoints == []


def test_work_lost_counts_steps_and_seconds_after_the_resume_point(tmp_path):
    rules = _rules(tmp_path, start_epoch=0)
    for i in range(3):
        _feed(rules, event="step", epoch=0, step=i, loss=1.0, t=10.0 + i)
    _feed(rules, epoch=0, step=3, path=str(tmp_path / P.checkpoint_name(0, step=3)), t=12.5)
    for i in range(3, 7):
        _feed(rules, event="step", epoch=0, step=i, loss=1.0, t=10.0 + i)
    assert rules.lost_since((0, 3)) == (4, 3.5)  # steps 3..6, from 12.5 s to 16 s
    assert rules.lost_since((-1, END_OF_EPOCH)) == (7, 6.0)  # a fresh start: everything
    _feed(rules, event="heartbeat", handles=["checkpoint_request"])
    assert rules.handles_requests and D.median_interval(rules.step_times) == 1.0


# -- requests and notices ----------------------------------------------------------------------------


def test_checkpoint_requests_round_trip_and_refuse_garbage():
    request = P.CheckpointRequest(3, "time limit", stop=True)
    assert P.CheckpointRequest.from_json(request.to_json()) == request
    for junk in (b"", b"{", b"[]", b'{"id": true, "reason": "x"}', b'{"id": 1, "reason": 2}',
                 b'{"id": 1, "reason": "x", "stop": "yes"}', request.to_json()[:-3]):  # fmt: skip
        assert P.CheckpointRequest.from_json(junk) is None, junk


@pytest.fixture
def metadata():
    server = FakeMetadata()
    yield server
    server.close()


def test_notice_deadlines_come_from_the_notice_or_the_cloud_window(metadata):
    at = metadata.interrupt(90)
    text, when = check_aws(metadata.url, 1.0)
    assert "terminate" in text and when == pytest.approx(int(at), abs=1)
    assert check_azure(metadata.url, 1.0)[1] == pytest.approx(int(at), abs=1)
    # A stamp long past (a skewed clock): the poller trusts the window instead.
    metadata.interrupt()
    poller = NoticePoller("aws", 0.1, metadata.url, window_s=7.0).start()
    deadline = time.monotonic() + 10
    while poller.notice() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    poller.close()
    assert poller.notice() is not None and poller.deadline == pytest.approx(time.time() + 7.0, abs=3.0)


# -- config ----------------------------------------------------------------------------------------


def _cfg(**sections):
    raw = {"name": "r", "epochs": 2, "trainer": {"command": ["python", "t.py"]}, **sections}
    return parse_config(raw, Path("."), Path("run.toml"))


def test_new_config_keys_are_validated_with_one_line_each():
    cfg = _cfg(checkpoints={"every_s": "auto"}, platform={"sigterm_grace_s": 10, "upload_speed": "20MB"})
    assert cfg.checkpoints.every_s == "auto" and cfg.platform.upload_speed == 20_000_000
    assert _cfg(checkpoints={"every_s": 300}).checkpoints.every_s == 300.0
    for sections, key in [
        ({"checkpoints": {"every_s": "sometimes"}}, "checkpoints.every_s"),
        ({"checkpoints": {"every_s": 0.1}}, "checkpoints.every_s"),
        ({"checkpoints": {"step_pattern": "mid-{epoch}.pt"}}, "checkpoints.step_pattern"),
        ({"checkpoints": {"step_pattern": "e{epoch}-s{step}-{bogus}.pt"}}, "checkpoints.step_pattern"),
        ({"checkpoints": {"auto_overhead": 0.9}}, "checkpoints.auto_overhead"),
        ({"platform": {"upload_speed": "50%"}}, "platform.upload_speed"),
        ({"platform": {"sigterm_grace_s": 0}}, "platform.sigterm_grace_s"),
    ]:
        with pytest.raises(ConfigError) as err:
            _cfg(**sections)
        assert any(p.startswith(key) for p in err.value.problems), (sections, err.value.problems)
