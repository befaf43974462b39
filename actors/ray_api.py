"""The thin layer over Ray: connecting, reading the node inventory, creating and ending actors."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from actors.placement import NodeInfo
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
        )
        for n in ray.nodes()
        if n.get("Alive")
    ]


class ActorPool:
    """Warm stage actors keyed by resource shape, reused across stages of a run.

    A stage borrows an idle actor of its shape or gets a new one; independent stages of the same shape
    run on separate actors. `shutdown()` ends every actor this pool created, releasing its resources.
    """

    def __init__(self, store_config: StoreConfig) -> None:
        self.store_config = store_config
        self._idle: dict[tuple, list[Any]] = {}
        self._all: list[Any] = []

    def acquire(self, resources: Resources, options: dict[str, Any]) -> Any:
        idle = self._idle.get(resources.shape())
        if idle:
            return idle.pop()
        actor = _RemoteStageActor.options(**options, max_concurrency=1).remote(self.store_config)
        self._all.append(actor)
        return actor

    def release(self, resources: Resources, actor: Any) -> None:
        self._idle.setdefault(resources.shape(), []).append(actor)

    def discard(self, actor: Any) -> None:
        """Forget an actor that failed; it is killed so a broken process is never reused."""
        for idle in self._idle.values():
            if actor in idle:
                idle.remove(actor)
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
