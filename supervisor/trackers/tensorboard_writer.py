"""TensorBoard: event files in `<run_dir>/tensorboard/`, written with the `tensorboard` package's protos and
record format (no TensorFlow, no torch: tensorboardX imports torch whenever it is installed).

Scalars `train/loss`, `train/lr`, `eval/<metric>` at step = position; at an attempt that resumes at or below
the highest step written, a SessionLog START at its start position, which TensorBoard reads as "discard every
point from this step on" (what SummaryWriter's purge_step writes), so curves never zigzag. Each restart: the
scalars `restarts`, `work_lost/steps`, `work_lost/seconds` and the text `restart_log` (the restart in words and
the whole table) at the step it resumed from. The params: text `params` and the hparams plugin's session
start, at step 0. Every process writes its own file, named so files sort in the order they were written.
Before each batch, `<run_dir>/trackers/tensorboard.batch.json` notes where it starts: a batch the cursor does
not count (a supervisor killed between the two) is cut off the file at the next open, so nothing is written
twice; event files with no cursor at all (a restored log dir) are purged from step 0 and written anew.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any

from supervisor.durable import atomic_write
from supervisor.record import flatten
from supervisor.trackers.events import LiveCurves, LiveOp, Params, Purge, Scalar, Text
from supervisor.trackers.sync import CURSOR_DIR, Tracker

log = logging.getLogger(__name__)

LOG_DIR = "tensorboard"
PREFIX = "events.out.tfevents."


def event_files(logdir: Path) -> list[Path]:
    """The event files of a log dir in the order TensorBoard reads them (by name)."""
    try:
        return sorted(p for p in logdir.iterdir() if p.name.startswith(PREFIX) and p.is_file())
    except OSError:
        return []


def next_file_name(logdir: Path, now: float) -> str:
    """An event file name that sorts after every file already there: TensorBoard reads files in name order and
    the name leads with whole seconds, so two writers within a second (or a clock behind) would read out of order."""
    stamps = []
    for p in event_files(logdir):
        field = p.name[len(PREFIX) :].split(".", 1)[0]
        if field.isdigit():
            stamps.append(int(field))
    stamp = max([int(now), *(s + 1 for s in stamps)])
    host = socket.gethostname().replace(".", "-") or "host"
    return f"{PREFIX}{stamp:010d}.{host}.supervisor"


def _hparam(value: Any) -> bool | int | float | str:
    return value if isinstance(value, (bool, int, float, str)) else json.dumps(value, default=str)


def params_markdown(params: dict[str, Any]) -> str:
    rows = ["| param | value |", "| :--- | :--- |"]
    rows += [f"| {k} | {json.dumps(v, default=str)} |" for k, v in sorted(flatten(params).items())]
    return "\n".join(rows) + "\n"


class TensorBoardTracker(Tracker):
    """Writes the run's curves and restarts as TensorBoard event files (see the module doc)."""

    name = "tensorboard"
    extra = "tensorboard"
    module = "tensorboard"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.logdir = self.run.run_dir / LOG_DIR
        self.curves = LiveCurves(self.run.params)
        self._file: IO[bytes] | None = None
        self._start_over = False
        self._done = 0
        self._pb: Any = None

    def target(self) -> str:
        return LOG_DIR

    def open(self, facts: list[dict[str, Any]], done: int) -> int:
        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
        from tensorboard.plugins.hparams import summary_v2
        from tensorboard.plugins.text import metadata
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._pb = SimpleNamespace(event=event_pb2, summary=summary_pb2, tensor=tensor_pb2, shape=tensor_shape_pb2,
                                   types=types_pb2, hparams=summary_v2, text=metadata, RecordWriter=RecordWriter)
        existing = event_files(self.logdir)
        done = done if existing else 0  # the cursor speaks of files that are gone: write them all again
        if done:
            self._undo_cut_short(done)
        self.curves = LiveCurves(self.run.params)
        self.replay(self.curves, facts[:done])
        self._start_over = bool(existing) and not done  # files no cursor speaks for: purged by the first write
        self._done = done
        return done

    def _undo_cut_short(self, done: int) -> None:
        """A batch whose facts the cursor does not count was cut short (or finished just before the cursor was
        saved): cut its file back to where the batch began, so the file holds exactly the cursor's facts."""
        try:
            mark = json.loads(self._mark_path.read_text())
            path, size, upto = self.logdir / str(mark["file"]), int(mark["size"]), int(mark["upto"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        if upto > done and path.parent == self.logdir and path.is_file() and path.stat().st_size > size:
            os.truncate(path, size)
            log.info("tensorboard: %s cut back to %d bytes, before a write the cursor does not count", path.name, size)

    @property
    def _mark_path(self) -> Path:
        return self.run.run_dir / CURSOR_DIR / f"{self.name}.batch.json"

    def write(self, facts: list[dict[str, Any]]) -> None:
        ops: list[LiveOp] = []
        if self._start_over:
            ops += self.curves.purge(0, float(facts[0].get("ts", 0.0)))
            self._start_over = False
        ops += self.translate(self.curves, facts)
        end = self._done + len(facts)
        if ops:
            writer = self._writer()
            assert self._file is not None
            mark = {"file": Path(self._file.name).name, "size": self._file.tell(), "upto": end}
            atomic_write(self._mark_path, lambda f: f.write(json.dumps(mark).encode() + b"\n"))
            for op in ops:
                writer.write(self._event(op).SerializeToString())
            self._file.flush()
            os.fsync(self._file.fileno())
        self._done = end

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            file.close()

    def _writer(self) -> Any:
        event_pb2, RecordWriter = self._pb.event, self._pb.RecordWriter
        if self._file is None:
            self.logdir.mkdir(parents=True, exist_ok=True)
            first_file = not event_files(self.logdir)
            self._file = open(self.logdir / next_file_name(self.logdir, time.time()), "ab")  # noqa: SIM115
            writer = RecordWriter(self._file)
            now = time.time()
            writer.write(event_pb2.Event(wall_time=now, file_version="brain.Event:2").SerializeToString())
            if first_file:  # TensorBoard takes the first START of a log dir as the session's beginning, not a purge
                start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
                writer.write(event_pb2.Event(wall_time=now, step=0, session_log=start).SerializeToString())
            self._file.flush()
        return RecordWriter(self._file)

    def _event(self, op: LiveOp) -> Any:
        event_pb2, summary_pb2 = self._pb.event, self._pb.summary
        if isinstance(op, Scalar):
            value = summary_pb2.Summary.Value(tag=op.tag, simple_value=op.value)
            return event_pb2.Event(wall_time=op.ts, step=op.step, summary=summary_pb2.Summary(value=[value]))
        if isinstance(op, Text):
            return event_pb2.Event(wall_time=op.ts, step=op.step, summary=self._text(op.tag, op.text))
        if isinstance(op, Purge):
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            return event_pb2.Event(wall_time=op.ts, step=op.step, session_log=start)
        assert isinstance(op, Params)
        return self._params(op)

    def _text(self, tag: str, text: str) -> Any:
        pb = self._pb
        tensor = pb.tensor.TensorProto(dtype=pb.types.DT_STRING, string_val=[text.encode()],
                                       tensor_shape=pb.shape.TensorShapeProto())  # fmt: skip
        meta = pb.text.create_summary_metadata(display_name=tag, description="")
        return pb.summary.Summary(value=[pb.summary.Summary.Value(tag=tag, metadata=meta, tensor=tensor)])

    def _params(self, op: Params) -> Any:
        summary = self._text("params", params_markdown(op.params))
        flat = {k: _hparam(v) for k, v in flatten(op.params).items()}
        if flat:  # the hparams plugin's session start: the params as a table TensorBoard can sort and compare
            summary.value.extend(self._pb.hparams.hparams_pb(flat, trial_id=self.run.name, start_time_secs=op.ts).value)
        return self._pb.event.Event(wall_time=op.ts, step=0, summary=summary)
