"""The thin layer over Ray: connecting, reading the node inventory, creating and ending actors."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from actors.placement import NodeInfo, capacity
from actors.resources import Resources
from actors.runner import StageActor
from storage import StoreConfig

log = logging.getLogger(__name__)

_RemoteStageActor = ray.remote(StageActor)


def connect(address: str | None = None, **init_kwargs: Any) -> bool:
    """Join `address` or `$RAY_ADDRESS` when given, else start a local Ray. True if we started it."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address is None:
        # Serve's direct ingress (opt-in, RAY_SERVE_ENABLE_DIRECT_INGRESS=1) holds a stopping replica open
        # 30 s for external load balancers to deregister it; a local Ray we start has none.
        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "0")
    # "local" never re-attaches to a stale cluster file left by an earlier `ray start`.
    ray.init(address=address or "local", log_to_driver=True, **init_kwargs)
    return address is None


def cluster_nodes() -> list[NodeInfo]:
    """Alive nodes with their total resources."""
    return [
        NodeInfo(
            node_id=n["NodeID"],
            resources=dict(n.get("Resources", {})),
            address=n.get("NodeManagerAddress", ""),
            labels=dict(n.get("Labels", {}) or {}),
            metrics_port=int(n.get("MetricsExportPort") or 0),
        )
        for n in ray.nodes()
        if n.get("Alive")
    ]


class ActorPool:
    """Warm stage actors keyed by resource shape, reused across stages of a run.

    A stage borrows an idle actor of its shape or gets a new one, up to as many as the cluster can hold
    at once (`acquire` returns None past that: the stage waits for a release instead of queueing a
    process Ray cannot place). An idle actor of another shape is ended when a new actor would not fit
    beside it, so warm processes never starve a different stage. `shutdown()` ends every actor.
    """

    def __init__(self, store_config: StoreConfig, nodes: list[NodeInfo] | None = None) -> None:
        self.store_config = store_config
        self._nodes = nodes
        self._idle: dict[tuple, list[Any]] = {}
        self._live: dict[tuple, int] = {}
        self._shape_of: dict[Any, tuple] = {}
        self._caps: dict[tuple, int] = {}
        self._res: dict[tuple, Resources] = {}
        self._all: list[Any] = []

    def acquire(self, resources: Resources, options: dict[str, Any]) -> Any | None:
        shape = resources.shape()
        idle = self._idle.get(shape)
        if idle:
            return idle.pop()
        if self._live.get(shape, 0) >= self._capacity(resources):
            return None
        self._res[shape] = resources
        self._make_room(resources, shape)
        actor = _RemoteStageActor.options(**options, max_concurrency=1).remote(self.store_config)
        self._all.append(actor)
        self._shape_of[actor] = shape
        self._live[shape] = self._live.get(shape, 0) + 1
        return actor

    def release(self, actor: Any) -> None:
        self._idle.setdefault(self._shape_of[actor], []).append(actor)

    def discard(self, actor: Any) -> None:
        """Forget an actor that failed; it is killed so a broken process is never reused."""
        for idle in self._idle.values():
            if actor in idle:
                idle.remove(actor)
        self._forget(actor)
        ray.kill(actor, no_restart=True)

    @property
    def size(self) -> int:
        return len(self._all)

    def shutdown(self) -> None:
        for actor in self._all:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already dead is fine
                log.debug("actor already gone", exc_info=True)
        self._all.clear()
        self._idle.clear()
        self._live.clear()
        self._shape_of.clear()

    def _capacity(self, resources: Resources) -> int:
        shape = resources.shape()
        if shape not in self._caps:
            nodes = self._nodes if self._nodes is not None else cluster_nodes()
            self._caps[shape] = max(1, capacity(resources.as_ray_resources(), nodes))
        return self._caps[shape]

    def _make_room(self, resources: Resources, shape: tuple) -> None:
        others = [(s, a) for s, actors in self._idle.items() if s != shape for a in actors]
        if not others:
            return
        need = {k: v for k, v in resources.as_ray_resources().items() if v > 0}
        free = ray.available_resources()
        for s, actor in others:
            if all(free.get(k, 0.0) + 1e-9 >= v for k, v in need.items()):
                return
            self._idle[s].remove(actor)
            self._forget(actor)
            ray.kill(actor, no_restart=True)
            for k, v in self._res[s].as_ray_resources().items():
                free[k] = free.get(k, 0.0) + v

    def _forget(self, actor: Any) -> None:
        shape = self._shape_of.pop(actor, None)
        if shape is not None:
            self._live[shape] -= 1
