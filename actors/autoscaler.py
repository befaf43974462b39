"""What the autoscaler can launch and what it said: pure functions over what Ray publishes.

Ray publishes two things (read in `actors.ray_api`):
- the `ClusterConfig` in the GCS (`node_group_configs`: name, resources, max_count), which Ray Data's
  autoscaler reads. On Ray 2.60 no Python code of the wheel writes it, and autoscaler v1 (the default)
  left it empty on a fake multi-node cluster here, so a `ray up` cluster needs its config named
  (`--cluster-yaml`). Autoscaler v2 could not be tried: its fake provider needs an example.yaml the
  wheel lacks;
- autoscaler v1's status in the GCS key-value store (`__autoscaling_status`): which node is of which
  type, the nodes it is launching, the launches that failed. `ray status` prints the same.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from actors.placement import NodeInfo, NodeType

HEAD_MARK = "node:__internal_head__"  # a resource only the head node has
NODE_GROUP_LABEL = "ray.io/node-group"  # set where the node's type is known at start (KubeRay, autoscaler v2)
_SHAPE_IGNORED = ("memory", "object_store_memory")


def types_from_cluster_config(config: Any) -> list[NodeType]:
    """Node types from the GCS `ClusterConfig` protobuf (`autoscaler_pb2.ClusterConfig`)."""
    return [
        NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, max_count=int(g.max_count))
        for g in config.node_group_configs
        if g.name
    ]


def type_of(node: NodeInfo, types: Iterable[NodeType], mapping: Mapping[str, str]) -> str | None:
    """The node type of an alive node: as the autoscaler maps it, as its label says, else by its resources."""
    named = mapping.get(node.node_id) or mapping.get(node.address) or node.labels.get(NODE_GROUP_LABEL)
    types = list(types)
    if named and any(t.name == named for t in types):
        return named
    shape = _shape(node.resources)
    return next((t.name for t in types if _shape(t.resources) == shape), None)


def with_running(types: Iterable[NodeType], alive: Iterable[NodeInfo], mapping: Mapping[str, str]) -> list[NodeType]:
    """`types` with how many workers of each are alive (the head is no worker: max_workers excludes it)."""
    types = list(types)
    counts = Counter(type_of(n, types, mapping) for n in alive if HEAD_MARK not in n.resources)
    return [NodeType(t.name, t.resources, t.max_count, running=counts.get(t.name, 0)) for t in types]


def _shape(resources: Mapping[str, float]) -> dict[str, float]:
    return {
        k: round(float(v), 3)
        for k, v in resources.items()
        if v and k not in _SHAPE_IGNORED and not k.startswith("node:")
    }


def node_type_mapping(status: Mapping[str, Any] | None) -> dict[str, str]:
    """node id or ip -> node type, from autoscaler v1's published status."""
    report = (status or {}).get("autoscaler_report") or {}
    return dict(report.get("node_type_mapping") or {})


def report_text(status: Mapping[str, Any] | None, node_type: str = "") -> str:
    """What the autoscaler reported, in a sentence (about `node_type` first when given)."""
    if not status:
        return (
            "no autoscaler status is published (the cluster may not autoscale: started without "
            "--autoscaling-config, or autoscaler v2, whose state `ray status` shows)"
        )
    report = status.get("autoscaler_report") or {}
    parts = []
    launching = report.get("pending_launches") or {}
    pending = [(p[1], p[2]) for p in report.get("pending_nodes") or [] if len(p) >= 3]
    failed = [(f[1] if len(f) > 1 else "?") for f in report.get("failed_nodes") or []]
    if node_type:
        mine = [s for t, s in pending if t == node_type]
        parts.append(
            f"{launching.get(node_type, 0)} {node_type} launches queued, {len(mine)} {node_type} nodes starting"
            + (f" ({', '.join(sorted(set(mine)))})" if mine else "")
            + f", {failed.count(node_type)} failed"
        )
        avail = ((report.get("node_availability_summary") or {}).get("node_availabilities") or {}).get(node_type)
        if avail and not avail.get("is_available", True):
            info = avail.get("unavailable_node_information") or {}
            parts.append(f"{node_type} is unavailable: {info.get('details') or info.get('category') or 'no details'}")
        elif avail is None:
            parts.append(f"it has not tried to launch {node_type}")
    else:
        parts.append(f"{sum(launching.values())} launches queued, {len(pending)} nodes starting, {len(failed)} failed")
    demands = ((status.get("load_metrics_report") or {}).get("resource_demand")) or []
    if demands:
        shown = ", ".join(f"{n}x {_fmt_bundle(b)}" for b, n in demands[:4])
        parts.append(f"demands it cannot place yet: {shown}")
    return "; ".join(parts)


def _fmt_bundle(bundle: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(bundle.items())) + "}"
