"""The leader's side of several nodes (docs/distributed.md): the Watchdog of node 0 publishes each attempt, ends
its group when another node's failed, gathers every node's report, and names the node whose fault ended it.
A mixin of Watchdog: it uses the watchdog's config, store, coordination and link."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from supervisor import ledger as L
from supervisor.attempt import Attempt, AttemptResult, AttemptSpec, where
from supervisor.faults import Fault
from supervisor.nodes import NodeEnd, Plan, cause, plain
from supervisor.store.base import CheckpointRecord

if TYPE_CHECKING:
    from supervisor.config import RunConfig
    from supervisor.nodes import Coordination, LeaderLink
    from supervisor.store.base import Store

log = logging.getLogger("supervisor")


class Leading:
    """Watchdog's methods for leading several nodes."""

    cfg: RunConfig
    store: Store
    coord: Coordination | None
    session: str
    _link: LeaderLink | None
    _signals: int
    _last_tick: float

    def _publish(self, spec: AttemptSpec, record: CheckpointRecord | None) -> None:
        """Make the attempt's checkpoint fetchable (its upload done), then publish the attempt for the others."""
        if record is not None:
            missing = self.store.drain(self.cfg.storage.drain_timeout_s)  # type: ignore[union-attr]
            if missing:
                log.warning("not yet in %s: %s; the other nodes wait for it", self.store.describe(), ", ".join(missing))
        checkpoint = None if record is None else {"epoch": record.epoch, "path": record.path, "size": record.size,
                                                  "sha256": record.sha256, "step": record.step}  # fmt: skip
        plan = Plan(self.session, spec.attempt, spec.seed, spec.load_epoch, spec.batch_divisor, spec.load_step,
                    checkpoint)  # fmt: skip
        assert self.coord is not None
        self.coord.put_plan(plan)
        self.coord.set_session(self.session, L.STATUS_RUNNING, spec.attempt)

    def _node_failed(self, attempt: Attempt) -> None:
        """Another node's group failed first: end ours (torchrun would tear it down anyway, slower)."""
        assert self._link is not None
        for end in self._link.ends.values():
            if end.fault is not None and not end.collateral:
                attempt.set_fault(Fault(end.fault), plain(end), end.rank, end.node)
                return

    def _gather_nodes(self, attempt: Attempt) -> list[NodeEnd]:
        """After our group ended: tell every node the attempt is over, wait for each node's report (a node silent
        for node_timeout_s is lost), and take the last of rank 0's relayed events."""
        assert self._link is not None and self.coord is not None
        number, nodes = attempt.spec.attempt, range(1, self.cfg.trainer.nnodes)
        why = attempt.fault.value if attempt.fault is not None else "its group on node 0 ended"
        self._link.stop_all(why, pause=attempt.fault is not None and attempt.fault.pauses)
        deadline = time.monotonic() + self.cfg.trainer.node_timeout_s
        while set(nodes) - set(self._link.ends) and time.monotonic() < deadline and self._signals < 2:
            self._last_tick = time.monotonic()
            time.sleep(0.2)
        self._link.close()
        ends = self._link.ends
        self._link = None
        for node in nodes:
            if node not in ends:
                log.warning("attempt %d: node %d sent no report within %.0fs: taken as lost", number, node,
                            self.cfg.trainer.node_timeout_s)  # fmt: skip
                ends[node] = NodeEnd(node, Fault.SESSION_LOST.value, f"node {node} sent no report within "
                                     f"{self.cfg.trainer.node_timeout_s:.0f}s (machine gone?)",
                                     detected_at=time.time())  # fmt: skip
        return [ends[n] for n in nodes]

    def _blame(self, result: AttemptResult, ends: list[NodeEnd]) -> None:
        """Name the node (and rank) whose fault ended the attempt: ours, or another node's when ours only followed
        it (a peer gone). A group of ours that ended well (rank 0's work judged as on one node) stays so."""
        if result.node is not None or result.fault is None:  # named during the watch, or no fault here
            return
        ours = NodeEnd(0, result.fault.value, result.detail, result.rank, result.exit, result.detected_at,
                       tail=result.tail)  # fmt: skip
        first = cause([ours, *ends])
        if first is None or first.node == 0:
            result.node = 0
            return
        result.fault, result.rank, result.node = Fault(first.fault), first.rank, first.node
        result.detail, result.detected_at = f"{where(first.rank, first.node)}: {plain(first)}", first.detected_at
