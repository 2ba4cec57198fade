"""Units of issue 10's core: placeholders and brace escaping, run.toml for runs of steps and zero-code scripts,
the event rules of a run of steps, and the snapshots of one overwritten checkpoint file."""

from __future__ import annotations

import time
import zipfile
from pathlib import Path

import pytest

from supervisor import protocol as P
from supervisor.attempt import build_argv
from supervisor.checkpoints import EventRules
from supervisor.config import ConfigError, fill_placeholders, parse_config
from supervisor.monitors.snapshot import FileSnapshots, looks_complete, recorded_step, restore


def cfg(**raw):
    base = {"name": "x", "trainer": {"command": ["python", "t.py"]}}
    for key, value in raw.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    if "epochs" not in base and "steps" not in base:
        base["steps"] = 10
    return parse_config(base, Path("/base"), Path("run.toml"))


def problems(**raw) -> list[str]:
    with pytest.raises(ConfigError) as err:
        cfg(**raw)
    return err.value.problems


def test_braces_placeholders_and_shell_variables():
    values = {"seed": "31", "load_path": "/ck/step-10.pt"}
    assert fill_placeholders("--seed={seed}", values) == "--seed=31"
    assert fill_placeholders("{{not a placeholder}} {{seed}}", values) == "{not a placeholder} {seed}"
    assert fill_placeholders("echo ${HOME} $HOME", values) == "echo ${HOME} $HOME"
    assert fill_placeholders("awk '{print $1}'", values) == "awk '{print $1}'"
    assert fill_placeholders("{load_path}", values) == "/ck/step-10.pt"
    c = cfg(trainer={"command": ["bash", "-c", "echo ${HOME} {{x}} | awk '{print $1}'", "{seed}"]})
    assert c.trainer.command[2] == "echo ${HOME} {{x}} | awk '{print $1}'"
    (line,) = problems(trainer={"command": ["awk", "{print}"]})
    assert "unknown placeholder {print}" in line and "{{" in line


def test_fresh_and_resume_arguments_and_environment():
    c = cfg(trainer={"command": "python train.py --seed={seed}", "fresh_args": "--init_from=scratch",
                     "resume_args": ["--init_from=resume", "--ckpt={load_path}"],
                     "resume_env": {"RESUME": "{load_step}"}, "mode": "zero-code"})  # fmt: skip
    values = {"seed": "7", "load_path": "/r/c.pt", "load_step": "40"}
    assert build_argv(c, values)[1:] == ["train.py", "--seed=7", "--init_from=scratch"]
    assert build_argv(c, values, resume=True)[1:] == ["train.py", "--seed=7", "--init_from=resume", "--ckpt=/r/c.pt"]


def test_a_run_counts_epochs_or_steps_and_placeholders_follow_its_unit():
    assert cfg().unit == "steps" and cfg().span == 11 and cfg().checkpoints.pattern == "step-{step:08d}.pt"
    assert cfg(epochs=3).unit == "epochs" and cfg(epochs=3).checkpoints.pattern == "epoch-{epoch:04d}.pt"
    assert any("not both" in p for p in problems(epochs=3, steps=5))
    (line,) = problems(trainer={"command": ["t", "--epochs={epochs}"]})
    assert "{epochs} means nothing in a run counted in steps" in line and "{steps}" in line
    (line,) = problems(epochs=3, trainer={"command": ["t", "--max={steps}"]})
    assert "{steps} means nothing in a run counted in epochs" in line
    (line,) = problems(checkpoints={"pattern": "ck-{epoch}.pt"})
    assert line.startswith("checkpoints.pattern:") and "{step}" in line and "belongs to a run counted in epochs" in line


def test_zero_code_keys_are_checked():
    (line,) = problems(checkpoints={"file": "out/ckpt.pt"})
    assert "only for trainer.mode" in line
    (line,) = problems(watch={"metric_regex": "val loss ([0-9.]+)"})
    assert "named groups" in line
    (line,) = problems(watch={"step_regex": r"iter (\d+)"})
    assert "(?P<step>" in line
    c = cfg(watch={"metric_regex": r"val (?P<val_loss>\S+)"})
    assert c.watch.metric_regex == [r"val (?P<val_loss>\S+)"]


def test_warnings_when_a_zero_code_command_cannot_receive_a_seed_or_a_resume_point():
    bare = cfg(trainer={"mode": "zero-code"}).resume_warnings()
    assert len(bare) == 2 and "{seed}" in bare[0] and "every restart trains from scratch" in bare[1]
    ok = cfg(trainer={"mode": "zero-code", "command": "python t.py --seed {seed}", "resume_args": "--resume"},
             checkpoints={"file": "out/ckpt.pt"}).resume_warnings()  # fmt: skip
    assert ok == []
    assert cfg().resume_warnings() == []  # protocol mode: the trainer reads SUPERVISOR_SEED and the load path


def rules(tmp_path: Path, start: int = 0, span: int = 21) -> EventRules:
    return EventRules(start, span, lambda e, s=None: tmp_path / P.checkpoint_name(e, "step-{step:08d}.pt"),
                      lambda raw: Path(raw), unit="steps")  # fmt: skip


def ev(**data) -> P.Event:
    return P.Event(data["event"], data)


def test_event_rules_of_a_run_of_steps(tmp_path):
    r = rules(tmp_path)
    assert r.feed(ev(event="step", step=7, loss=0.5, epoch=0), True).fault is None
    assert r.epoch == 8  # step 7 done: 8 in progress
    seen = r.feed(ev(event="checkpoint", step=5, path=str(tmp_path / "step-00000005.pt")), True)
    assert [(a.epoch, a.step, a.label) for a in seen.checkpoints] == [(5, None, "step 5")]
    seen = r.feed(ev(event="checkpoint", step=6, epoch=0, path=str(tmp_path / "epoch-0000.pt")), True)
    assert not seen.checkpoints and "not the run's checkpoint path for step 6" in seen.refused[0]
    seen = r.feed(ev(event="checkpoint", path=str(tmp_path / "step-00000006.pt"), epoch=3), True)
    assert not seen.checkpoints and "without a whole number of steps" in seen.refused[0]
    seen = r.feed(ev(event="eval", step=7, metrics={"val_loss": 0.25}), True)
    assert seen.metrics == [(7, {"val_loss": 0.25})]
    seen = r.feed(ev(event="step", step=9, loss="nan"), True)
    assert seen.fault is not None and "step 9" in seen.fault[1] and r.epoch == 9
    resumed = rules(tmp_path, start=6)  # resumed from step 5: a checkpoint of step 5 is no new one
    seen = resumed.feed(ev(event="checkpoint", step=5, path=str(tmp_path / "step-00000005.pt")), True)
    assert not seen.checkpoints and "outside this attempt's steps 6..20" in seen.refused[0]


class Script:
    """Stands in for a script's output and its in-place saves, with real files and real mtimes."""

    def __init__(self, tmp_path: Path, by_epoch: bool = False, start: int = 1, span: int = 101, settle_s: float = 60):
        self.file = tmp_path / "out" / "ckpt.pt"
        self.file.parent.mkdir()
        self.ck = tmp_path / "checkpoints"
        self.snaps = FileSnapshots(self.file, settle_s, lambda k: self.ck / f"{k}.pt", range(start, span), by_epoch)
        self.snaps.baseline()

    def say(self, key: int) -> None:
        self.snaps.note_key(key, time.time())

    def save(self, payload: bytes, then: int | None = None) -> None:
        """Write the file in place (like torch.save(path)) a moment after the last line (serializing takes
        that long at least; the file's mtime comes from a coarse clock); `then`: a line right after it."""
        time.sleep(0.015)
        with open(self.file, "wb") as f:
            f.write(payload)
        if then is not None:
            self.say(then)
        time.sleep(0.12)  # past LINE_SLACK_S: the next line comes well after the save


def ready(snaps: FileSnapshots, **kw) -> list:
    """poll() until the copy (on the snapshot thread) is done, for at most 10 s."""
    deadline = time.monotonic() + 10
    while not (out := snaps.poll(**kw)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return out


def test_single_file_saves_are_named_by_the_output_and_taken_once_the_output_moves_on(tmp_path):
    s = Script(tmp_path)
    s.say(10)
    s.save(b"state after 10")
    assert s.snaps.poll() == []  # not settled (settle_s 60) and the output has not moved on
    s.say(11)
    (snap,) = ready(s.snaps)
    assert snap.key == 10 and snap.path.read_bytes() == b"state after 10" and snap.size == 14
    s.save(b"state after 14")  # named by the last line before it
    s.say(15)
    (snap,) = ready(s.snaps)
    assert snap.key == 11  # the output named 11 last before the save: a script prints its step before saving
    assert s.snaps.poll(final=True) == []  # nothing new
    s.snaps.close()
    assert sorted(p.name for p in s.ck.iterdir()) == ["10.pt", "11.pt"]  # no temp files left


def test_a_save_whose_line_is_read_late_takes_the_next_position_named(tmp_path):
    s = Script(tmp_path, settle_s=0.05)
    s.say(10)
    s.save(b"state after 10")
    (snap,) = ready(s.snaps)  # settled
    assert snap.key == 10
    s.save(b"state after 15", then=15)  # no line between the saves: the one naming 15 is read just after it
    s.say(16)
    (snap,) = ready(s.snaps)
    assert snap.key == 15 and snap.path.read_bytes() == b"state after 15"
    s.snaps.close()


def test_a_script_saving_again_the_step_it_resumed_from_makes_no_new_checkpoint(tmp_path):
    s = Script(tmp_path, start=51, settle_s=0.05)  # resumed from step 50
    s.say(50)  # nanoGPT evaluates again at the step it resumed from, and may save it again
    s.save(b"state after 50, again")
    s.say(51)
    s.say(52)
    time.sleep(0.3)
    assert s.snaps.poll() == []
    s.say(55)
    s.save(b"state after 55", then=56)  # a fast loop: the next step's line within milliseconds
    s.say(57)
    (snap,) = ready(s.snaps)
    assert snap.key == 55 and snap.path.read_bytes() == b"state after 55"
    s.snaps.close()
    assert sorted(p.name for p in s.ck.iterdir()) == ["55.pt"]


def torch_checkpoint(**fields) -> bytes:
    """The bytes torch.save writes for a nanoGPT-style checkpoint dict with `fields`."""
    import io

    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "optimizer": torch.optim.AdamW(net.parameters()).state_dict(),
                "config": {"lr": 1e-3}, **fields}, buf)  # fmt: skip
    return buf.getvalue()


def test_a_checkpoint_that_records_its_step_is_named_by_it_whatever_the_timing_of_the_lines(tmp_path):
    """CI once named nanoGPT's re-save of the step it resumed from (50) by its next line (60), read within
    LINE_SLACK_S on a loaded machine: a checkpoint's own iter_num/global_step/step outranks the line stamps."""
    s = Script(tmp_path, start=51, settle_s=0.05)  # resumed from step 50
    s.say(50)
    s.save(torch_checkpoint(iter_num=50, best_val_loss=1.0), then=60)  # the next line read "too soon"
    s.say(70)
    time.sleep(0.3)
    assert s.snaps.poll() == []  # a repeat of 50: no new checkpoint
    s.say(90)
    s.save(torch_checkpoint(iter_num=100), then=100)  # printed after the save: the lines alone would say 90
    s.say(110)
    (snap,) = ready(s.snaps)
    assert snap.key == 100
    s.snaps.close()
    assert sorted(p.name for p in s.ck.iterdir()) == ["100.pt"]


def test_recorded_step_reads_a_checkpoint_without_running_its_pickle(tmp_path):
    import os
    import pickle

    path = tmp_path / "c.pt"
    for key in ("global_step", "iter_num", "step"):
        path.write_bytes(torch_checkpoint(**{key: 42}))
        assert recorded_step(path) == 42
    path.write_bytes(torch_checkpoint(epoch=3))
    assert recorded_step(path) is None  # epochs are not steps
    path.write_bytes(torch_checkpoint(step=True))
    assert recorded_step(path) is None
    path.write_bytes(b"not a checkpoint")
    assert recorded_step(path) is None

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(tmp_path / "ran"),))

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"step": 7, "payload": Evil()}))
    assert recorded_step(path) == 7 and not (tmp_path / "ran").exists()


def test_single_file_saves_after_a_fault_or_cut_short_do_not_count(tmp_path):
    s = Script(tmp_path)
    s.say(5)
    s.save(b"state after 5")
    fault_at = time.time()
    s.save(b"written after the fault")
    s.say(6)
    assert s.snaps.poll(alive=False, cutoff=fault_at) == []
    s.snaps.close()
    (tmp_path / "t").mkdir()
    torn = Script(tmp_path / "t")
    with zipfile.ZipFile(torn.file, "w") as z:
        z.writestr("data.pkl", b"x" * 1000)
    whole = torn.file.read_bytes()
    assert looks_complete(torn.file)
    torn.file.write_bytes(whole[: len(whole) // 2])  # a torch.save cut short: no central directory
    assert not looks_complete(torn.file)
    torn.say(3)
    time.sleep(0.1)
    torn.say(4)
    assert torn.snaps.poll(final=True) == []
    torn.snaps.close()


def test_single_file_epochs_take_the_last_save_of_each_epoch(tmp_path):
    s = Script(tmp_path, by_epoch=True, start=0, span=10)
    s.say(0)
    s.save(b"epoch 0, mid")
    s.say(0)  # same epoch: a later line, no new position
    time.sleep(0.06)
    assert s.snaps.poll() == []
    s.save(b"epoch 0, end")
    s.say(1)
    time.sleep(0.06)
    (snap,) = ready(s.snaps)
    assert snap.key == 0 and snap.path.read_bytes() == b"epoch 0, end"
    s.save(b"epoch 1, mid")  # the script dies in epoch 1: its pending copy is dropped
    s.say(1)
    assert s.snaps.poll(alive=False) == []
    s.snaps.close()
    assert sorted(p.name for p in s.ck.iterdir()) == ["0.pt"]


def test_restore_puts_the_snapshot_back_atomically(tmp_path):
    snap = tmp_path / "snap.pt"
    snap.write_bytes(b"verified bytes")
    target = tmp_path / "out" / "ckpt.pt"
    restore(snap, target)
    assert target.read_bytes() == b"verified bytes"
    assert [p.name for p in target.parent.iterdir()] == ["ckpt.pt"]  # no temp file left


def test_an_epoch_line_read_just_after_its_save_still_names_it(tmp_path):
    """A script prints `epoch 3: ...` and saves at once; the file's coarse mtime can precede the line's stamp."""
    s = Script(tmp_path, by_epoch=True, start=0, span=10, settle_s=0.05)
    s.say(2)
    s.save(b"state after epoch 3", then=3)  # `epoch 3: ...` printed before this save, read just after it
    s.say(4)
    (snap,) = ready(s.snaps)
    assert snap.key == 3 and snap.path.read_bytes() == b"state after epoch 3"
    s.snaps.close()
