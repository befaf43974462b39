"""Stages waiting for a node the autoscaler has to launch: shown while they wait, failed past a limit.

A stage whose placement says `waits for a launchable node of type X` has no alive node that fits;
its actor request is what makes the autoscaler launch one. The pool's placement timeout (meant for
resources someone else holds) does not apply to it; `node_wait_s` does, counted from when its shape's
first actor was requested and only while no actor of that shape is placed (once a node came, the
stage waits for a busy actor like any other).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from actors.resources import Resources

DEFAULT_NODE_WAIT_S = 900.0  # a cloud GPU node takes minutes to boot and set up; 15 min covers a slow region


@dataclass
class NodeWait:
    shape: tuple
    node_type: str
    resources: Resources
    started: float  # monotonic
    since: float  # wall clock, for display

    def since_text(self) -> str:
        return time.strftime("%H:%M:%S", time.localtime(self.since))


class NodeWaits:
    """The shapes waiting for a launchable node, by shape."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self._waits: dict[tuple, NodeWait] = {}

    def update(
        self, waiting: Mapping[tuple, Sequence[str]], records: Mapping[str, Any], pool: Any
    ) -> list[tuple[NodeWait, list[str]]]:
        """Start the clock of shapes whose first queued stage waits for a node and has an actor requested;
        stop it once an actor of the shape is placed. Returns the waits that began, with their stages."""
        begun = []
        for shape, queue in waiting.items():
            decision = records[queue[0]].decision if queue else None
            if decision is None or not decision.waits_for or pool.placed(shape):
                self.end(shape)  # nothing waits, or a node came
            elif pool.starting_of(shape) and (w := self.begin(shape, decision.waits_for, decision.requested)):
                begun.append((w, list(queue)))
        return begun

    def begin(self, shape: tuple, node_type: str, resources: Resources) -> NodeWait | None:
        """Start the clock for `shape`; returns the new wait (None if it was already waiting)."""
        if shape in self._waits:
            return None
        wait = NodeWait(shape, node_type, resources, time.monotonic(), time.time())
        self._waits[shape] = wait
        return wait

    def end(self, shape: tuple) -> None:
        self._waits.pop(shape, None)

    def shapes(self) -> set[tuple]:
        return set(self._waits)

    def expired(self) -> list[NodeWait]:
        now = time.monotonic()
        return [w for w in self._waits.values() if now - w.started >= self.limit_s]

    def cause(self, wait: NodeWait, report: str) -> str:
        return (
            f"no node of type {wait.node_type} came within --node-wait-s={self.limit_s:g} s (waiting since "
            f"{wait.since_text()}) for the request {wait.resources.describe()}; the autoscaler reported: {report}. "
            "Fix: check `ray status` and the autoscaler's log (monitor.log on the head) for launch errors or quota, "
            f"check that the cluster config still has node type {wait.node_type}, or raise --node-wait-s if nodes "
            "are slow to boot"
        )
