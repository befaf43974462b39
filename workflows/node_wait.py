"""Stages waiting for a node the autoscaler has to launch: shown while they wait, failed past a limit.

A stage whose placement says `waits for a launchable node of type X` has no alive node that fits;
its actor request is what makes the autoscaler launch one. The pool's placement timeout (meant for
resources someone else holds) does not apply to it; `node_wait_s` does, counted from when its shape's
first actor was requested and only while no actor of that shape is placed (once a node came, the
stage waits for a busy actor like any other).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

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

    def cause(self, wait: NodeWait, request: str, report: str) -> str:
        return (
            f"no node of type {wait.node_type} came within --node-wait-s={self.limit_s:g} s (waiting since "
            f"{wait.since_text()}) for the request {request}; the autoscaler reported: {report}. Fix: check "
            "`ray status` and the autoscaler's log (monitor.log on the head) for launch errors or quota, check that "
            f"the cluster config still has node type {wait.node_type}, or raise --node-wait-s if nodes are slow to boot"
        )
