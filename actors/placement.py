"""Resource requests -> Ray options, and placement decisions against a node inventory.

The inventory is the nodes alive now plus the node types the autoscaler can still launch (type
resources x max workers, less those running): a GPU stage on a cluster that can launch a GPU node
waits for it, and falls back to CPU only when no alive *or launchable* node fits.

Pure functions over plain data, so the policy is unit-tested without a cluster (Ray Serve's
`ScalingDecision` habit). The only Ray calls live in `actors.ray_api`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from actors.resources import Resources

_EPS = 1e-9
UNLIMITED = 1_000  # launchable nodes of a type without a max (Ray's max_count -1); pools cap far lower
FITS, FALLBACK, WAITS = "fits as declared", "falls back to CPU", "waits for a launchable node of type"


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
class NodeType:
    """A node type the autoscaler may launch: what one node offers and how many may run at once."""

    name: str
    resources: dict[str, float]
    max_count: int  # workers of this type at most; -1: no limit
    running: int = 0  # workers of this type alive now

    @property
    def launchable(self) -> int:
        if self.max_count < 0:
            return UNLIMITED
        return max(0, self.max_count - self.running)

    def describe(self) -> str:
        return NodeInfo(f"type:{self.name}", self.resources, address=f"node type {self.name!r}").describe()


@dataclass(frozen=True)
class PlacementDecision:
    """Where a stage may run and with what request. `effective` is None when nothing fits.

    `waits_for` names the node type the autoscaler must launch first (no alive node fits).
    """

    stage: str
    requested: Resources
    effective: Resources | None
    fallback_used: bool
    candidate_nodes: tuple[str, ...]
    reason: str
    waits_for: str | None = None

    @property
    def feasible(self) -> bool:
        return self.effective is not None

    @property
    def label(self) -> str:
        """The decision in one phrase, as the summary, `tierflow show` and MLflow print it."""
        if self.effective is None:
            return "cannot be placed"
        wait = f"{WAITS} {self.waits_for}" if self.waits_for else ""
        if self.fallback_used:
            return f"{FALLBACK}, {wait}" if wait else FALLBACK
        return wait or FITS

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


def capacity(
    request: dict[str, float], nodes: Iterable[NodeInfo], unbounded: int = 64, types: Iterable[NodeType] = ()
) -> int:
    """How many actors of `request` the cluster holds at once, each node counted whole, launchable ones too.

    A request for no resources at all (e.g. `cpus=0`) is not limited by the cluster; `unbounded` caps it
    so a wide fan-out never spawns a process per stage (nor asks the autoscaler for a node per stage).
    """
    need = {k: v for k, v in request.items() if v > 0}
    if not need:
        return unbounded
    total = sum(_per_node(need, node.resources) for node in nodes)
    for t in types:
        if total >= unbounded:
            break
        total += _per_node(need, t.resources) * t.launchable
    return min(total, unbounded)


def _per_node(need: dict[str, float], offers: dict[str, float]) -> int:
    return min(int((offers.get(k, 0.0) + _EPS) // v) for k, v in need.items())


def missing_on(request: dict[str, float], node: NodeInfo) -> list[str]:
    return _missing(request, node.resources)


def decide(
    stage: str, requested: Resources, nodes: Iterable[NodeInfo], types: Iterable[NodeType] = ()
) -> PlacementDecision:
    """Pick the request to run with: as declared if an alive node fits, else as declared on a node the
    autoscaler can launch, else the CPU fallback (alive, then launchable) if allowed."""
    nodes = list(nodes)
    launchable = sorted((t for t in types if t.launchable > 0), key=_smallest_first)
    want = requested.as_ray_resources()
    fitting = tuple(n.node_id for n in nodes if fits(want, n))
    if fitting:
        return PlacementDecision(stage, requested, requested, False, fitting, FITS)
    if kinds := _fitting_types(want, launchable):
        return PlacementDecision(
            stage, requested, requested, False, kinds, _waits(want, launchable, kinds), waits_for=kinds[0][5:]
        )
    if requested.fallback == "cpu":
        cpu = requested.cpu_fallback()
        cpu_want = cpu.as_ray_resources()
        no_node = f"no alive or launchable node offers {_fmt(want)}; falling back to CPU ({cpu.describe()})"
        if cpu_fitting := tuple(n.node_id for n in nodes if fits(cpu_want, n)):
            return PlacementDecision(stage, requested, cpu, True, cpu_fitting, no_node)
        if kinds := _fitting_types(cpu_want, launchable):
            reason = f"{no_node}; {_waits(cpu_want, launchable, kinds)}"
            return PlacementDecision(stage, requested, cpu, True, kinds, reason, waits_for=kinds[0][5:])
    offers = [f"{n.describe()} (lacks {', '.join(missing_on(want, n))})" for n in nodes]
    offers += [f"{t.describe()}, launchable (lacks {', '.join(_missing(want, t.resources))})" for t in launchable]
    fix = "lower the request, add fallback='cpu' to a GPU stage, or add a node type that offers it"
    return PlacementDecision(
        stage,
        requested,
        None,
        False,
        (),
        f"stage {stage!r} asks for {_fmt(want)} but no node can satisfy it: "
        f"{'; '.join(offers) or 'no nodes are alive and none can be launched'}. Fix: {fix}",
    )


def _smallest_first(t: NodeType) -> tuple:
    # Like the autoscaler, keep GPU nodes for what needs them: the least-equipped fitting type is expected.
    r = t.resources
    return (r.get("GPU", 0.0), sum(1 for k in r if k not in ("CPU", "GPU", "memory")), r.get("CPU", 0.0), t.name)


def _fitting_types(want: dict[str, float], types: list[NodeType]) -> tuple[str, ...]:
    return tuple(f"type:{t.name}" for t in types if not _missing(want, t.resources))


def _waits(want: dict[str, float], types: list[NodeType], kinds: tuple[str, ...]) -> str:
    first = next(t for t in types if f"type:{t.name}" == kinds[0])
    more = f" (or {', '.join(k[5:] for k in kinds[1:])})" if len(kinds) > 1 else ""
    return f"no alive node offers {_fmt(want)}; {WAITS} {first.name}{more}, {first.launchable} more can be launched"


def _missing(want: dict[str, float], offers: dict[str, float]) -> list[str]:
    return [k for k, v in want.items() if offers.get(k, 0.0) + _EPS < v]


def _fmt(request: dict[str, float]) -> str:
    return (
        "{" + ", ".join(f"{k}={v / 2**30:.2f}GiB" if k == "memory" else f"{k}={v:g}" for k, v in request.items()) + "}"
    )


def nodes_from_cluster_yaml(config: dict[str, Any]) -> list[NodeInfo]:
    """One NodeInfo per node type of a Ray cluster-launcher config (every type as if one were alive)."""
    out = []
    for name, spec in (config.get("available_node_types") or {}).items():
        res = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        out.append(NodeInfo(node_id=f"type:{name}", resources=res, address=f"node type {name!r}"))
    return out


def cluster_from_yaml(config: dict[str, Any]) -> tuple[list[NodeInfo], list[NodeType]]:
    """The cluster right after `ray up` of a cluster-launcher config: alive nodes and launchable types.

    Alive: the head and `min_workers` of each type. Launchable: each type up to its `max_workers`
    (and the cluster-wide `max_workers`). This is what `tierflow validate --cluster-yaml` decides against.
    """
    node_types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    if head not in node_types:
        raise ValueError(f"head_node_type {head!r} is not one of available_node_types {sorted(node_types)}")
    cap = config.get("max_workers")
    alive, types = [], []
    for name, spec in node_types.items():
        res = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        lo, hi = int(spec.get("min_workers", 0)), int(spec.get("max_workers", 0))
        hi = min(hi, int(cap)) if cap is not None else hi
        count = lo + (name == head)
        alive += [NodeInfo(f"type:{name}#{i}", res, address=f"node type {name!r}") for i in range(count)]
        types.append(NodeType(name, res, max_count=hi, running=lo))
    return alive, types
