"""Resource requests -> Ray options, and placement decisions against a node inventory.

Pure functions over plain data, so the policy is unit-tested without a cluster (Ray Serve's
`ScalingDecision` habit). The only Ray calls live in `actors.ray_api`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from actors.resources import Resources

_EPS = 1e-9


@dataclass(frozen=True)
class NodeInfo:
    """What one node offers in total (Ray resource names: CPU, GPU, memory, accelerator_type:X, ...)."""

    node_id: str
    resources: dict[str, float]
    address: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    metrics_port: int = 0  # where the node's Ray metrics agent serves Prometheus text (0: unknown)

    def describe(self) -> str:
        shown = []
        for key in sorted(self.resources):
            if key.startswith("node:") or key == "object_store_memory":
                continue
            value = self.resources[key]
            shown.append(f"{key}={value / 2**30:.1f}GiB" if key == "memory" else f"{key}={value:g}")
        name = self.address or self.node_id[:12]
        return f"{name} offers {{{', '.join(shown)}}}"


@dataclass(frozen=True)
class PlacementDecision:
    """Where a stage may run and with what request. `effective` is None when nothing fits."""

    stage: str
    requested: Resources
    effective: Resources | None
    fallback_used: bool
    candidate_nodes: tuple[str, ...]
    reason: str

    @property
    def feasible(self) -> bool:
        return self.effective is not None

    def ray_options(self) -> dict[str, Any]:
        if self.effective is None:
            raise ValueError(f"stage {self.stage!r} has no feasible placement: {self.reason}")
        return ray_options(self.effective)


def ray_options(res: Resources) -> dict[str, Any]:
    """Actor options for `ray.remote(...).options(**opts)`: the one translation of a request."""
    opts: dict[str, Any] = {"num_cpus": res.cpus, "num_gpus": res.gpus}
    if res.memory_bytes:
        opts["memory"] = res.memory_bytes
    if res.accelerator_type:
        opts["accelerator_type"] = res.accelerator_type
    if res.custom:
        opts["resources"] = dict(res.custom)
    return opts


def fits(request: dict[str, float], node: NodeInfo) -> bool:
    return all(node.resources.get(k, 0.0) + _EPS >= v for k, v in request.items())


def capacity(request: dict[str, float], nodes: Iterable[NodeInfo], unbounded: int = 64) -> int:
    """How many actors of `request` the cluster holds at once, each node counted whole.

    A request for no resources at all (e.g. `cpus=0`) is not limited by the cluster; `unbounded` caps it
    so a wide fan-out never spawns a process per stage.
    """
    need = {k: v for k, v in request.items() if v > 0}
    if not need:
        return unbounded
    total = 0
    for node in nodes:
        total += min(int((node.resources.get(k, 0.0) + _EPS) // v) for k, v in need.items())
    return min(total, unbounded)


def missing_on(request: dict[str, float], node: NodeInfo) -> list[str]:
    return [k for k, v in request.items() if node.resources.get(k, 0.0) + _EPS < v]


def decide(stage: str, requested: Resources, nodes: Iterable[NodeInfo]) -> PlacementDecision:
    """Pick the request to run with: as declared if some node fits, else the CPU fallback if allowed."""
    nodes = list(nodes)
    want = requested.as_ray_resources()
    fitting = tuple(n.node_id for n in nodes if fits(want, n))
    if fitting:
        return PlacementDecision(stage, requested, requested, False, fitting, "fits as declared")
    if requested.fallback == "cpu":
        cpu = requested.cpu_fallback()
        cpu_fitting = tuple(n.node_id for n in nodes if fits(cpu.as_ray_resources(), n))
        if cpu_fitting:
            return PlacementDecision(
                stage,
                requested,
                cpu,
                True,
                cpu_fitting,
                f"no node offers {_fmt(want)}; falling back to CPU ({cpu.describe()})",
            )
    offers = (
        "; ".join(f"{n.describe()} (lacks {', '.join(missing_on(want, n))})" for n in nodes) or "no nodes are alive"
    )
    fix = "lower the request, add fallback='cpu' to a GPU stage, or add a node type that offers it"
    return PlacementDecision(
        stage,
        requested,
        None,
        False,
        (),
        f"stage {stage!r} asks for {_fmt(want)} but no node can satisfy it: {offers}. Fix: {fix}",
    )


def _fmt(request: dict[str, float]) -> str:
    return (
        "{" + ", ".join(f"{k}={v / 2**30:.2f}GiB" if k == "memory" else f"{k}={v:g}" for k, v in request.items()) + "}"
    )


def nodes_from_cluster_yaml(config: dict[str, Any]) -> list[NodeInfo]:
    """One NodeInfo per node type of a Ray cluster-launcher config (for validation before launch)."""
    out = []
    for name, spec in (config.get("available_node_types") or {}).items():
        res = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        out.append(NodeInfo(node_id=f"type:{name}", resources=res, address=f"node type {name!r}"))
    return out
