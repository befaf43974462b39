"""`tierflow profile WORKFLOW` and `tierflow plan WORKFLOW`: recorded profiles, and the cluster to run on.

`plan` enumerates candidate clusters (node types x counts within bounds), simulates a run of the
workflow on each (`workflows.planner`), and prints the Pareto front of (makespan, cost, energy) and
the configuration it chooses: the best by `--objective` among those that meet `--deadline`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from actors.energy import EnergyConfig
from storage import StoreConfig
from workflows.costs import CostConfig, co2_g
from workflows.errors import UnsatisfiableResourcesError, ValidationError
from workflows.model import Workflow
from workflows.planner import NodeSpec, Prediction, SimConfig, StageProfile, simulate
from workflows.profile import StageRun, load_profiles, show_profiles, startup_s

OBJECTIVES = ("cost", "energy", "time")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*$")


@dataclass(frozen=True)
class NodeType:
    """A kind of node a candidate cluster has `min_count..max_count` of."""

    name: str
    resources: dict[str, float]
    usd_per_h: float
    min_count: int = 0
    max_count: int = 1
    cores: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.min_count <= self.max_count:
            raise ValidationError(
                f"node type {self.name!r}: need 0 <= min <= max, got {self.min_count}..{self.max_count}"
            )


@dataclass
class Candidate:
    counts: dict[str, int]
    prediction: Prediction | None
    infeasible: str = ""
    pareto: bool = False
    meets: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        return " + ".join(f"{n}x{c}" for n, c in self.counts.items() if c) or "(none)"


def load_calibration(path: Path) -> dict[str, float]:
    """Machine constants for the simulation from a JSON object of `SimConfig` fields (seconds, a share)."""
    allowed = {f.name for f in fields(SimConfig)} - {"streaming"}
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValidationError(f"--calibration {path}: not a readable JSON file ({exc})") from None
    if not isinstance(doc, dict):
        raise ValidationError(f"--calibration {path}: expected a JSON object of SimConfig fields")
    if unknown := sorted(set(doc) - allowed):
        raise ValidationError(f"--calibration {path}: unknown keys {unknown}; known: {sorted(allowed)}")
    if bad := sorted(k for k, v in doc.items() if isinstance(v, bool) or not isinstance(v, int | float)):
        raise ValidationError(f"--calibration {path}: {bad} must be numbers")
    return {k: float(v) for k, v in doc.items()}


def parse_duration_s(text: str) -> float:
    m = _DURATION.match(str(text))
    if not m:
        raise ValidationError(f"--deadline {text!r}: expected e.g. 90s, 10m or 1.5h")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


def node_types_from_cluster_yaml(config: Mapping[str, Any], costs: CostConfig) -> list[NodeType]:
    head = config.get("head_node_type")
    out = []
    for name, spec in (config.get("available_node_types") or {}).items():
        lo, hi = int(spec.get("min_workers", 0) or 0), int(spec.get("max_workers", 0) or 0)
        if name == head:
            lo, hi = 1, 1 + hi  # the head is always there
        out.append(
            NodeType(
                name,
                {k: float(v) for k, v in (spec.get("resources") or {}).items()},
                costs.node_price_usd_per_h(name, spec),
                lo,
                hi,
            )
        )
    return out


def parse_node_flag(text: str, costs: CostConfig) -> NodeType:
    """`NAME:CPU=16,GPU=1,accelerator_type:A10G=1,usd_per_h=1.006,max=2` (min=, cores= optional)."""
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise ValidationError(f"--node {text!r}: expected NAME:CPU=16,GPU=1,usd_per_h=1.0,max=2")
    res: dict[str, float] = {}
    extra: dict[str, float] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not eq or not key or number < 0:
            raise ValidationError(f"--node {text!r}: {item!r} is not KEY=NUMBER")
        (extra if key in ("usd_per_h", "min", "max", "cores") else res)[key] = number
    price = extra.get("usd_per_h", costs.node_price_usd_per_h(name, {"resources": res}))
    return NodeType(name, res, price, int(extra.get("min", 0)), int(extra.get("max", 1)), extra.get("cores"))


def stage_profiles(
    workflow: Workflow, runs: Mapping[str, list[StageRun]], *, solo: bool = True
) -> dict[str, StageProfile]:
    """Per stage: median times on CPU and on GPU, CPU-seconds, a fused consumer's wait, stream facts.

    A stage with no runs borrows the profile of a profiled stage running the same function (a fan-out's
    siblings), so a wider fan-out can be planned from a narrower one. `solo=False` keeps the time stages
    waited for a CPU in (times as profiled, contention included)."""
    out: dict[str, StageProfile] = {}
    # (run, actor process) -> its first call's start. A fused stream's record carries its consumer's process and
    # starts a moment before it: the call is the consumer's, so streams count only where nothing else ran.
    first: dict[tuple[str, int], float] = {}
    for streams in (False, True):
        for name, rs in runs.items():
            if (name in workflow.stages and workflow.stages[name].stream is not None) == streams:
                for r in rs:
                    if not streams or (r.run_id, r.pid) not in first:
                        first[(r.run_id, r.pid)] = min(first.get((r.run_id, r.pid), r.started_at), r.started_at)
    for name, rs in runs.items():
        if name not in workflow.stages:
            continue
        took = _solo_s if solo else (lambda r: float(r.profile["duration_s"]))
        cpu = [took(r) for r in rs if not str(r.profile.get("device", "cpu")).startswith("cuda")]
        gpu = [took(r) for r in rs if str(r.profile.get("device", "")).startswith("cuda")]
        spec = workflow.stages[name].stream
        shards = int(statistics.median(_shards(spec.shards, r.params) for r in rs)) if spec is not None else 0
        out[name] = StageProfile(
            cpu_duration_s=statistics.median(cpu) if cpu else None,
            gpu_duration_s=statistics.median(gpu) if gpu else None,
            cpu_s=statistics.median(float(r.profile.get("cpu_s", 0.0)) for r in rs),
            wait_s=statistics.median(_summed(r, ".wait_s") for r in rs),
            setup_s=statistics.median(_summed(r, ".setup_s") - solo * _summed(r, ".setup_runqueue_s") for r in rs),
            cold_share=sum(bool(r.pid) and r.started_at <= first[(r.run_id, r.pid)] for r in rs) / len(rs),
            shards=shards,
            busy_s=statistics.median(float(r.profile.get("cpu_s", 0.0)) for r in rs) if spec else 0.0,
            pool_start_s=_pool_start_s(rs, shards) if spec else None,
            pool_start_fused=spec is not None and _fused(rs, [runs.get(d, []) for d in workflow.downstream(name)]),
        )
    by_fn = {}
    for name, prof in out.items():
        by_fn.setdefault(_fn_key(workflow, name), prof)
    for name in workflow.order:
        if name not in out and (twin := by_fn.get(_fn_key(workflow, name))) is not None:
            out[name] = StageProfile(**{**twin.__dict__, "source": "sibling"})
    return out


def _pool_start_s(runs: list[StageRun], shards: int) -> float | None:
    """How long a stream's pool took to deliver its first batch beyond one shard's work (median)."""
    gaps = [
        r.metrics["first_batch_s"] - float(r.profile.get("cpu_s", 0.0)) / max(shards, 1)
        for r in runs
        if "first_batch_s" in r.metrics
    ]
    return max(0.0, statistics.median(gaps)) if gaps else None


def _summed(run: StageRun, suffix: str) -> float:
    """A consumer's figure over the streams it read (`<param>.wait_s`, `<param>.setup_s`)."""
    return sum(v for k, v in run.metrics.items() if k.endswith(suffix))


def _fused(runs: list[StageRun], consumers: list[list[StageRun]]) -> bool:
    """Whether a stream was profiled inside its consumer (streaming mode): in the same process, in most runs."""
    ran_in = {(r.run_id, r.pid) for rs in consumers for r in rs if r.pid}
    return sum((r.run_id, r.pid) in ran_in for r in runs) * 2 > len(runs)


def _solo_s(run: StageRun) -> float:
    """The stage's time with a core to itself: its wall time minus what it waited for a CPU."""
    return float(run.profile["duration_s"]) - float(run.profile.get("runqueue_wait_s", 0.0) or 0.0)


def _shards(spec: int | str, params: Mapping[str, Any]) -> int:
    return int(params.get(spec, 1)) if isinstance(spec, str) else int(spec)


def _fn_key(workflow: Workflow, name: str) -> str:
    fn = workflow.stages[name].fn
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', name)}"


def search(
    workflow: Workflow,
    profiles: Mapping[str, StageProfile],
    types: list[NodeType],
    *,
    max_nodes: int,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    sim: SimConfig | None = None,
    energy: EnergyConfig | None = None,
    costs: CostConfig | None = None,
    max_candidates: int = 5000,
) -> list[Candidate]:
    """Simulate every combination of counts within the types' bounds and `max_nodes` in all."""
    costs = costs or CostConfig()
    ranges = [range(t.min_count, t.max_count + 1) for t in types]
    out: list[Candidate] = []
    for combo in itertools.product(*ranges):
        if not 0 < sum(combo) <= max_nodes:
            continue
        if len(out) >= max_candidates:
            raise ValidationError(f"more than {max_candidates} configurations; lower --max-nodes or per-type --limit")
        counts = {t.name: c for t, c in zip(types, combo, strict=True)}
        nodes = [
            NodeSpec(f"{t.name}-{i}", dict(t.resources), t.name, t.usd_per_h, t.cores)
            for t, c in zip(types, combo, strict=True)
            for i in range(c)
        ]
        try:
            pred = simulate(workflow, profiles, nodes, params=params, sim=sim, energy=energy)
        except UnsatisfiableResourcesError as exc:
            out.append(Candidate(counts, None, infeasible=str(exc).splitlines()[-1].strip(" -")))
            continue
        pred.co2_g = co2_g(pred.energy_j, costs)
        out.append(Candidate(counts, pred))
    mark_pareto(out)
    return out


def mark_pareto(cands: list[Candidate]) -> None:
    feasible = [c for c in cands if c.prediction is not None]
    for c in feasible:
        p = c.prediction
        assert p is not None
        key = (p.makespan_s, p.cost_usd, p.energy_j)
        c.pareto = not any(
            all(a <= b for a, b in zip(k2, key, strict=True)) and k2 != key
            for k2 in ((o.prediction.makespan_s, o.prediction.cost_usd, o.prediction.energy_j) for o in feasible)  # type: ignore[union-attr]
        )


def choose(cands: list[Candidate], deadline_s: float | None, objective: str) -> Candidate | None:
    """The best by `objective` among feasible candidates meeting the deadline (None if none does)."""
    metric = {"cost": "cost_usd", "energy": "energy_j", "time": "makespan_s"}[objective]
    ok = []
    for c in cands:
        if c.prediction is None:
            continue
        c.meets = deadline_s is None or c.prediction.makespan_s <= deadline_s
        if c.meets:
            ok.append(c)
    if not ok:
        return None
    return min(ok, key=lambda c: (getattr(c.prediction, metric), c.prediction.makespan_s, sum(c.counts.values())))  # type: ignore[union-attr]


# -- CLI -------------------------------------------------------------------------------------------
def add_parsers(sub: Any, common: Any) -> None:
    prof = sub.add_parser("profile", help="show recorded stage profiles (time, CPU, memory, rows, bytes, energy)")
    prof.add_argument("workflow")
    prof.add_argument("--store", help="tier URLs (default: $TIERFLOW_STORE, else ./.tierflow/store)")
    prof.add_argument("--json", action="store_true")
    prof.set_defaults(param=[], address=None)  # what `main` reads of every workflow command
    plan = sub.add_parser("plan", help="simulate the workflow on candidate clusters and choose one")
    common(plan)
    plan.add_argument("--store", help="where the profiles are (default: $TIERFLOW_STORE, else ./.tierflow/store)")
    plan.add_argument("--cluster-yaml", type=Path, help="node types and their min/max workers from this file")
    plan.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="NAME:RES=N,...",
        help="a node type, e.g. gpu:CPU=4,GPU=1,accelerator_type:A10G=1,usd_per_h=1.006,max=2 (repeatable)",
    )
    plan.add_argument("--limit", action="append", default=[], metavar="TYPE=N", help="at most N nodes of TYPE")
    plan.add_argument("--max-nodes", type=int, default=10, help="at most this many nodes in all (default 10)")
    plan.add_argument("--deadline", help="makespan the run must meet, e.g. 10m, 90s")
    plan.add_argument("--objective", choices=OBJECTIVES, default="cost", help="what to minimise (default cost)")
    plan.add_argument("--grid-gco2-per-kwh", type=float, help="grid carbon intensity (default 450)")
    plan.add_argument("--cpu-watts-per-core", type=float, help="estimate method's W per busy core (default 10)")
    plan.add_argument("--gpu-speedup", type=float, help="GPU vs CPU time when not both measured (default 4)")
    plan.add_argument(
        "--actor-start-s",
        type=float,
        help="a fresh actor's start-up (default: measured in the profiled runs, else 0.5)",
    )
    plan.add_argument(
        "--calibration",
        type=Path,
        help="JSON of machine constants (SimConfig fields, e.g. from benchmarks/plan_calibration.py --out FILE)",
    )
    plan.add_argument("--no-streaming", action="store_true", help="plan barrier mode")
    plan.add_argument("--all", action="store_true", help="list every candidate, not only the Pareto front")
    plan.add_argument("--plot", type=Path, metavar="FILE", help="also draw the candidates and the Pareto front (PNG)")
    plan.add_argument("--json", action="store_true")


def run(args: argparse.Namespace, workflow: Workflow, params: dict[str, Any], console: Console) -> int:
    store = StoreConfig.resolve(args.store)
    if args.command == "profile":
        return show_profiles(store, workflow.name, console, as_json=args.json)
    costs = CostConfig(**({"grid_gco2_per_kwh": args.grid_gco2_per_kwh} if args.grid_gco2_per_kwh is not None else {}))
    energy = EnergyConfig(
        **({"cpu_watts_per_core": args.cpu_watts_per_core} if args.cpu_watts_per_core is not None else {})
    )
    sim_kwargs: dict[str, Any] = load_calibration(args.calibration) if args.calibration else {}
    sim_kwargs["streaming"] = not args.no_streaming
    if args.gpu_speedup is not None:
        sim_kwargs["gpu_speedup"] = args.gpu_speedup
    if args.actor_start_s is not None:
        sim_kwargs["actor_start_s"] = args.actor_start_s
    elif "actor_start_s" not in sim_kwargs and (measured := startup_s(store, workflow.name)) is not None:
        sim_kwargs["actor_start_s"] = measured  # as the profiled runs saw it (placement + first actor)
    try:
        sim = SimConfig(**sim_kwargs)
    except ValueError as exc:
        raise ValidationError(f"{exc} (from --calibration {args.calibration} or a flag)") from None
    types = _types(args, costs)
    runs = load_profiles(store, workflow.name)
    profiles = stage_profiles(workflow, runs)
    missing = [n for n in workflow.order if n not in profiles]
    deadline_s = parse_duration_s(args.deadline) if args.deadline else None
    values = workflow.resolve_params(params)
    cands = search(
        workflow, profiles, types, max_nodes=args.max_nodes, params=values, sim=sim, energy=energy, costs=costs
    )
    chosen = choose(cands, deadline_s, args.objective)
    if args.plot is not None:
        from workflows.plan_plot import plot_front  # noqa: PLC0415  # matplotlib only when asked for

        plot_front(cands, chosen, args.plot, deadline_s)
    if args.json:
        print(json.dumps(_as_json(cands, chosen, missing, runs), indent=1))
        return 0 if chosen else 1
    _print(console, workflow, cands, chosen, missing, runs, deadline_s, args)
    return 0 if chosen else 1


def _types(args: argparse.Namespace, costs: CostConfig) -> list[NodeType]:
    types = [parse_node_flag(t, costs) for t in args.node]
    if args.cluster_yaml:
        import yaml  # noqa: PLC0415

        types += node_types_from_cluster_yaml(yaml.safe_load(args.cluster_yaml.read_text()), costs)
    if not types:
        raise ValidationError(
            "no node types: pass --cluster-yaml cluster.yaml or --node NAME:CPU=8,usd_per_h=0.4,max=4"
        )
    limits = {}
    for item in args.limit:
        name, _, n = item.partition("=")
        if name not in {t.name for t in types} or not n.isdigit():
            raise ValidationError(f"--limit {item!r}: expected TYPE=N with TYPE one of {[t.name for t in types]}")
        limits[name] = int(n)
    out = []
    for t in types:
        hi = min(t.max_count, limits.get(t.name, t.max_count))
        out.append(NodeType(t.name, t.resources, t.usd_per_h, min(t.min_count, hi), hi, t.cores))
    return out


def _as_json(cands: list[Candidate], chosen: Candidate | None, missing: list[str], runs: Mapping) -> dict[str, Any]:
    def one(c: Candidate) -> dict[str, Any]:
        p = c.prediction
        base: dict[str, Any] = {"counts": c.counts, "pareto": c.pareto, "meets_deadline": c.meets}
        if p is None:
            return base | {"infeasible": c.infeasible}
        return base | {
            "makespan_s": p.makespan_s,
            "energy_j": p.energy_j,
            "co2_g": p.co2_g,
            "cost_usd": p.cost_usd,
            "stages": {
                n: {"node": s.node, "device": s.device, "start_s": s.start_s, "end_s": s.end_s}
                for n, s in p.stages.items()
            },
        }

    return {
        "profiled_runs": {s: len(r) for s, r in runs.items()},
        "unprofiled_stages": missing,
        "candidates": [one(c) for c in cands],
        "choice": one(chosen) if chosen else None,
    }


def _print(
    console: Console,
    workflow: Workflow,
    cands: list[Candidate],
    chosen: Candidate | None,
    missing: list[str],
    runs: Mapping[str, list[StageRun]],
    deadline_s: float | None,
    args: argparse.Namespace,
) -> None:
    n_runs = max((len(r) for r in runs.values()), default=0)
    console.print(
        f"plan {workflow.name}: {len(cands)} configurations simulated from profiles of up to {n_runs} run(s)"
        + (f"; stages without a profile use {SimConfig().default_stage_s:g}s: {missing}" if missing else "")
    )
    shown = [c for c in cands if c.prediction is not None and (c.pareto or args.all or c is chosen)]
    shown.sort(key=lambda c: c.prediction.makespan_s)  # type: ignore[union-attr]
    title = "Pareto front (makespan, cost, energy)" + (f"; deadline {deadline_s:g}s" if deadline_s else "")
    table = Table(title=title)
    for col in ("", "configuration", "makespan", "energy", "CO2", "cost", "deadline"):
        table.add_column(col)
    for c in shown:
        p = c.prediction
        assert p is not None
        table.add_row(
            "*" if c is chosen else ("P" if c.pareto else ""),
            c.label(),
            f"{p.makespan_s:.1f}s",
            f"{p.energy_j:.0f} J",
            f"{p.co2_g:.3f} g",
            f"${p.cost_usd:.4f}",
            "-" if deadline_s is None else ("meets" if c.meets else "misses"),
        )
    console.print(table)
    bad = [c for c in cands if c.prediction is None]
    if bad:
        console.print(
            f"{len(bad)} configuration(s) cannot place every stage, e.g. {bad[0].label()}: {bad[0].infeasible}"
        )
    if chosen is None:
        fastest = min((c for c in cands if c.prediction), key=lambda c: c.prediction.makespan_s, default=None)  # type: ignore[union-attr]
        hint = f"; the fastest is {fastest.label()} at {fastest.prediction.makespan_s:.1f}s" if fastest else ""  # type: ignore[union-attr]
        console.print(f"no configuration meets the deadline{hint}. Fix: raise --deadline or --max-nodes")
        return
    p = chosen.prediction
    assert p is not None
    console.print(
        f"choice ({args.objective}): {chosen.label()} - makespan {p.makespan_s:.1f}s, energy {p.energy_j:.0f} J, "
        f"CO2 {p.co2_g:.3f} g, cost ${p.cost_usd:.4f}"
    )
    for name, s in p.stages.items():
        fb = " (CPU fallback)" if s.fallback else ""
        console.print(f"  {name}: {s.device}{fb} on {s.node}, {s.start_s:.1f}s -> {s.end_s:.1f}s", markup=False)
