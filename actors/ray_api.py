"""The thin layer over Ray: connecting and reading the node inventory (actors live in `actors.pool`)."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from actors.placement import NodeInfo

log = logging.getLogger(__name__)


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
