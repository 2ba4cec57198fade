"""The supervisor of a node other than node_rank 0 (docs/distributed.md, "Several nodes"): it runs the attempts the
leader publishes in the store, on this node, and reports how each ended; the leader decides everything.

    wait for the leader's session -> (wait for plan N -> fetch its checkpoint -> run attempt N on this node
        -> report its end -> N + 1)* -> the session's end: completed 0, gave up 1, paused 75
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

from filelock import FileLock, Timeout

from supervisor.attempt import Attempt, AttemptResult, AttemptSpec, event_rules
from supervisor.config import RunConfig
from supervisor.durable import atomic_write
from supervisor.exits import EXIT_COMPLETED, EXIT_GAVE_UP, EXIT_PAUSED
from supervisor.faults import Fault
from supervisor.layout import RunLayout, describe_holder
from supervisor.nodes import RUNNING, Coordination, FollowerLink, NodeEnd, Plan, Signals
from supervisor.store.base import StoreError
from supervisor.store.remote import RemoteStore
from supervisor.watchdog import LockHeld

log = logging.getLogger("supervisor")

EXITS = {"completed": EXIT_COMPLETED, "gave up": EXIT_GAVE_UP, "paused": EXIT_PAUSED}


class Follower:
    """Runs the leader's attempts on node `cfg.trainer.node_rank`; see the module doc."""

    def __init__(self, cfg: RunConfig, store: RemoteStore, echo: bool = True):
        self.cfg = cfg
        self.store = store  # only its downloads: a follower takes no lease and uploads through the links
        self.node = cfg.trainer.node_rank
        self.run_dir = cfg.resolved_run_dir()
        self.layout = RunLayout(self.run_dir)
        self.backend = store.backend
        self.coord = Coordination(self.backend)
        self.echo = echo
        self.timeout_s = cfg.trainer.node_timeout_s
        self.signals = Signals()

    def run(self) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.layout.lock))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise LockHeld(f"run dir {self.run_dir} is in use by {describe_holder(self.run_dir)}") from None
        try:
            atomic_write(self.layout.holder, lambda f: f.write(json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode()))  # fmt: skip
            self.backend.check()
            with self.signals:
                return self._follow()
        finally:
            self.layout.holder.unlink(missing_ok=True)
            lock.release()
            self.backend.close()

    def _follow(self) -> int:
        started = time.time()
        log.info("node %d of %d: following the leader (node 0) of run '%s' through %s", self.node,
                 self.cfg.trainer.nnodes, self.cfg.name, self.backend.describe())  # fmt: skip
        waited_since, session, number = time.monotonic(), None, None
        while True:
            if self.signals.count:
                log.warning("node %d: stopped before an attempt: pausing", self.node)
                return EXIT_PAUSED
            current = self.coord.session()
            live = current is not None and (current.get("status") == RUNNING or current.get("t", 0) >= started)
            if live and current.get("status") != RUNNING:  # this session of the leader ended
                status = str(current.get("status"))
                log.info("node %d: the leader ended the run: %s", self.node, status)
                return EXITS.get(status, EXIT_PAUSED)
            if live and current["session"] != session:
                session, number = current["session"], None
                waited_since = time.monotonic()
            plan = None
            if session is not None:
                if number is None:  # joining: the attempt the leader published last
                    number = current.get("attempt")
                plan = self.coord.plan(number) if isinstance(number, int) else None
                if plan is not None and plan.session != session:
                    plan = None
            if plan is not None and self.coord.stop(plan.attempt) is None:
                self._run_attempt(plan)
                number, waited_since = plan.attempt + 1, time.monotonic()
                continue
            if plan is not None:  # already over: wait for the next one
                number = plan.attempt + 1
            if time.monotonic() - waited_since > self.cfg.trainer.join_timeout_s:
                log.error("node %d: no attempt from the leader (node 0) of run '%s' for %.0fs: is it running? "
                          "pausing", self.node, self.cfg.name, self.cfg.trainer.join_timeout_s)  # fmt: skip
                return EXIT_PAUSED
            time.sleep(0.5)

    def _fetch(self, plan: Plan):
        """The plan's checkpoint, whole in this run dir (the leader may still be uploading it)."""
        record = plan.record
        if record is None:
            return None
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                if self.store.ensure_local(record, self.run_dir):
                    return self.run_dir / record.path
            except StoreError as exc:
                log.warning("node %d: %s (trying again)", self.node, exc)
            if time.monotonic() > deadline or self.signals.count:
                return None
            time.sleep(1.0)

    def _run_attempt(self, plan: Plan) -> None:
        load_path = self._fetch(plan)
        if plan.record is not None and load_path is None:
            self.coord.put_end(plan.attempt, NodeEnd(self.node, Fault.CRASH.value, "the checkpoint to resume from "
                               f"({plan.record.path}) could not be fetched", exit="not started",
                               detected_at=time.time()))  # fmt: skip
            return
        spec = AttemptSpec(attempt=plan.attempt, seed=plan.seed, load_epoch=plan.load_epoch,
                           batch_divisor=plan.batch_divisor, load_path=load_path,
                           load_sha256=plan.record.sha256 if plan.record else None,
                           load_step=plan.load_step)  # fmt: skip
        attempt = Attempt(self.cfg, self.run_dir, spec, echo=self.echo)
        attempt.launch()
        log.info("node %d: attempt %d, seed %d, from %s", self.node, plan.attempt, plan.seed,
                 plan.record.label if plan.record else "a fresh start")  # fmt: skip
        rules = event_rules(self.cfg, self.run_dir, spec.start_epoch, spec.start_step)
        link = FollowerLink(self.coord, plan.attempt, self.run_dir, attempt.events_path, attempt.request_path,
                            rules.resolve)  # fmt: skip
        link.start()
        result = self._watch(attempt, link)
        link.close()
        self.coord.put_end(plan.attempt, NodeEnd(
            self.node, result.fault.value if result.fault else None, result.detail, result.rank, result.exit,
            result.detected_at, result.failed_epoch, result.steps, result.tail))  # fmt: skip
        if result.fault is not None:
            log.info("node %d: attempt %d ended: %s (%s)", self.node, plan.attempt, result.fault.value, result.exit)

    def _watch(self, attempt: Attempt, link: FollowerLink) -> AttemptResult:
        w = self.cfg.watch
        while True:
            _, rc = attempt.poll()  # checkpoints and metrics are the leader's: relayed by the link
            if attempt.fault is None and self.signals.count:
                reason = Fault.STOPPED if self.signals.first == 2 else Fault.PREEMPTED  # SIGINT: a person
                attempt.pause(reason, "this node was asked to stop", w.stop_grace_s)
            if attempt.fault is None and link.stop is not None:
                attempt.set_fault(Fault.STOPPED, f"the leader ended the attempt ({link.stop.get('why')})")
            if self.signals.count > 1:
                attempt.kill_tree()
            if rc is not None:
                break
            attempt.enforce()
            time.sleep(w.poll_interval_s)
        result, _ = attempt.finish(rc)
        return result
