"""The thin layer over Ray: connecting, reading the node inventory and what the autoscaler publishes
(actors live in `actors.pool`)."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import ray

from actors import autoscaler
from actors.placement import NodeInfo, NodeType

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


def autoscaler_status() -> dict[str, Any] | None:
    """Autoscaler v1's last published status (what `ray status` prints), or None without one."""
    from ray._private import ray_constants  # noqa: PLC0415
    from ray.experimental import internal_kv  # noqa: PLC0415

    try:
        raw = internal_kv._internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        return json.loads(raw) if raw else None
    except Exception as exc:  # a display and error-message aid: never a reason to fail
        log.debug("autoscaler status not read: %s", exc)
        return None


def published_node_types() -> list[NodeType]:
    """The node types in the GCS ClusterConfig (Ray Data's source), or [] when nothing published one."""
    from ray._private.state import state  # noqa: PLC0415

    try:
        config = state.get_cluster_config()
    except Exception as exc:
        log.debug("cluster config not read: %s", exc)
        return []
    return autoscaler.types_from_cluster_config(config) if config is not None else []


def node_types(declared: list[NodeType] | None = None, alive: list[NodeInfo] | None = None) -> list[NodeType]:
    """What the cluster can launch: the published node types, else `declared` (from a cluster.yaml),
    each with its workers alive now counted, so `launchable` is what is left."""
    types = published_node_types() or list(declared or [])
    if not types:
        return []
    alive = cluster_nodes() if alive is None else alive
    return autoscaler.with_running(types, alive, autoscaler.node_type_mapping(autoscaler_status()))


# -- live stage progress: the latest `ctx.log_metric` values, published to Ray's KV store -------------
_PROGRESS_NS = "tierflow-progress"


def _progress_key(run_id: str, stage: str) -> str:
    return f"{run_id}/{stage}"


def publish_progress(run_id: str, stage: str, payload: dict[str, Any]) -> None:
    """Best effort: progress is a display aid, so a failed write is logged at debug and ignored."""
    if not ray.is_initialized():
        return
    from ray.experimental import internal_kv  # noqa: PLC0415

    try:
        internal_kv._internal_kv_put(
            _progress_key(run_id, stage), json.dumps(payload), overwrite=True, namespace=_PROGRESS_NS
        )
    except Exception as exc:
        log.debug("progress for %s/%s not published: %s", run_id, stage, exc)


def read_progress(run_id: str, stage: str) -> dict[str, Any] | None:
    if not ray.is_initialized():
        return None
    from ray.experimental import internal_kv  # noqa: PLC0415

    try:
        raw = internal_kv._internal_kv_get(_progress_key(run_id, stage), namespace=_PROGRESS_NS)
    except Exception as exc:
        log.debug("progress for %s/%s not read: %s", run_id, stage, exc)
        return None
    return json.loads(raw) if raw else None
