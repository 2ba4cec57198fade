"""The watchdog's part in the experiment record (docs/record.md): notes from the inbox, early-stop rules, the
parent checkpoint of [init], and live.json for `supervisor status`. A mixin of Watchdog."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from supervisor import ledger as L
from supervisor import policy
from supervisor.checkpoints import expected_path
from supervisor.durable import atomic_write
from supervisor.exits import EXIT_PAUSED, EXIT_USAGE
from supervisor.lineage import Runs
from supervisor.store.base import CheckpointRecord, StoreError

if TYPE_CHECKING:
    from supervisor.attempt import Attempt
    from supervisor.config import RunConfig
    from supervisor.layout import RunLayout
    from supervisor.platforms import Platform
    from supervisor.store.base import Store
    from supervisor.trackers import TrackerSync

log = logging.getLogger("supervisor")



class Recording:
    """Watchdog's methods for the record."""

    cfg: RunConfig
    store: Store
    ledger: L.Ledger
    layout: RunLayout
    run_dir: Path
    trackers: TrackerSync | None
    noun: str
    platform: Platform
    _launched_wall: float
    _deadline: float | None

    def _ledger_changed(self, path: Path) -> None:
        """After every ledger append: the store mirrors it, the trackers write what is new (both off this thread)."""
        self.store.ledger_changed(path)
        if self.trackers is not None:
            self.trackers.notify(path)

    def open_trackers(self) -> bool:
        """[record] trackers: start the thread that writes the ledger to them; False (logged) when one cannot run."""
        from supervisor.trackers import open_trackers

        r = self.cfg.record
        try:
            self.trackers = open_trackers(r.trackers, self.cfg.name, self.run_dir, self.cfg.trainer.params,
                                          self.cfg.unit, r.mlflow_uri)  # fmt: skip
        except ValueError as exc:
            log.error("record.trackers: %s", exc)
            return False
        if self.trackers is not None:
            self.trackers.start()
            self.trackers.notify(self.layout.ledger)  # what earlier sessions wrote, on a new machine all of it
            log.info("writing the run to %s (docs/record.md, Trackers)", ", ".join(r.trackers))
        return True

    def close_trackers(self) -> None:
        if self.trackers is not None and not self.trackers.close(30.0):
            log.warning("the trackers were still writing after 30s: the next start writes the rest")

    def take_notes(self) -> None:
        """Notes `supervisor note` left in the inbox while the run runs: into the ledger (by the one writer)."""
        for path in sorted(self.layout.inbox.glob("note-*.json")):
            try:
                note = json.loads(path.read_text())["note"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # half-written (its writer renames it in whole) or foreign: left alone
            self.ledger.append(L.NOTE, by="user", note=str(note))
            path.unlink(missing_ok=True)

    def _early_fired(self, view: L.RunView) -> dict | None:
        """What fired the first [[early_stop]] rule the run's eval metrics make fire (rule, metric, value, epoch)."""
        fired = policy.early_stop(view.metrics, self.cfg.early_stop, self.noun)
        return None if fired is None else fired[1]

    def _inherit(self) -> int | None:
        """[init]: before the run's first attempt, take the parent run's verified checkpoint as this run's own
        (copied or downloaded, its sha256 checked, recorded with `from_run`); an exit code when it cannot be had."""
        init, view = self.cfg.init, self.view()
        if init is None or view.attempts or view.checkpoints or view.partials:
            return None
        runs = Runs.beside(self.cfg)
        try:
            facts = runs.facts(init.from_run)
        except StoreError as exc:
            log.error("init.from_run: cannot read run '%s' in %s (%s): start again when the store answers",
                      init.from_run, runs.describe(), exc)  # fmt: skip
            return EXIT_PAUSED
        if facts is None:
            log.error("init.from_run: no run '%s' in %s: name a run of the same store (or runs folder)",
                      init.from_run, runs.describe())  # fmt: skip
            return EXIT_USAGE
        parent = L.fold(facts)
        record = parent.checkpoints.get(init.position)
        if parent.unit != self.cfg.unit or record is None:
            have = ", ".join(map(str, parent.verified_epochs())) or "none"
            log.error("init: run '%s' has no verified checkpoint of %s %d (it counts %s; verified: %s): name one of "
                      "them", init.from_run, self.noun, init.position, parent.unit, have)  # fmt: skip
            return EXIT_USAGE
        c = self.cfg.checkpoints
        target = expected_path(c.pattern, init.position, self.layout.checkpoints, self.run_dir)
        try:
            whole = runs.fetch(init.from_run, record, target)
        except StoreError as exc:
            log.error("init: cannot fetch the checkpoint of run '%s' (%s): start again when the store answers",
                      init.from_run, exc)  # fmt: skip
            return EXIT_PAUSED
        if not whole:
            log.error("init: the checkpoint of %s %d of run '%s' is missing or corrupt in %s", self.noun,
                      init.position, init.from_run, runs.describe())  # fmt: skip
            return EXIT_USAGE
        rel = target.relative_to(self.run_dir).as_posix()
        self.ledger.append(L.CHECKPOINT, epoch=init.position, path=rel, size=record.size, sha256=record.sha256,
                           attempt=-1, from_run=init.from_run)  # fmt: skip
        self.store.checkpoint_verified(CheckpointRecord(init.position, rel, record.size, record.sha256), self.run_dir)
        log.info("starting from run '%s' at %s %d (checkpoint sha256 %s... verified)", init.from_run, self.noun,
                 init.position, record.sha256[:12])  # fmt: skip
        return None

    def _write_live(self, attempt: Attempt) -> None:
        """live.json: the figures only this process knows (pace, the session's end, uploads still to send), for
        `supervisor status`; a local write, and a failed one costs nothing but the figure."""
        rules = attempt.rules
        times = list(rules.step_times)
        pace = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None
        live = {
            "t": time.time(), "pid": os.getpid(), "attempt": attempt.spec.attempt, "seed": attempt.spec.seed,
            "unit": self.cfg.unit, "span": self.cfg.span, "position": rules.epoch, "steps": rules.steps,
            "started": self._launched_wall, "steps_per_s": None if pace is None else round(pace, 3),
            "session_end": self.platform.session_end, "platform": self.platform.name,
            "deadline": self._deadline, "backlog_bytes": self._backlog(), "upload_bps": self.store.upload_rate(),
            "state": attempt.state, "fault": attempt.fault.value if attempt.fault else None,
        }  # fmt: skip
        with contextlib.suppress(OSError, ValueError):
            data = json.dumps(live).encode()
            atomic_write(self.layout.live, lambda f: f.write(data))
