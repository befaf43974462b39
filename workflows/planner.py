"""A discrete-event simulation of one workflow run on a candidate cluster, from recorded stage profiles.

It runs the DAG as the engine does (`workflows.driver`, `actors.pool`), with the engine's own rules imported:
- placement and CPU fallback: `workflows.engine.plan` (which calls `actors.placement.decide`) on the candidate's nodes;
- pool size per resource shape: `actors.placement.capacity`, each actor counted whole on one node;
- actors are warm and keyed by shape: a stage waits (FIFO per shape) for an idle actor of its shape, else one is
  started (`actor_start_s`) if the pool is below capacity and a node has room, after ending idle actors of
  other shapes (`ActorPool.reclaim`); idle actors keep their resources;
- a streaming stage with one consumer is fused into it (overlapped), otherwise it runs alone first (barrier).

Scaling model (documented, term by term, in docs/planning.md):
- A stage is one actor with its declared CPUs, so its solo time (a warm call with a core to itself) does not
  change with node size. When the stages running on a node want more cores than it has (each wants
  `cpu_s / duration_s` cores as profiled), they share them (processor sharing).
- Each actor costs `actor_start_s` to start and `first_call_s` on its first call (profiles that ran first on
  a fresh actor have it taken out); ending idle actors of other shapes to make room costs `reclaim_s`.
- GPU vs CPU fallback: measured durations on each device when profiles have both, else `gpu_speedup`.
- A stream consumer's set-up (before its first read) is fixed, its per-batch work scales with the shards; a
  fused stream's first batch waits for both set-up and the pool's first shard, then the slower side sets the
  pace. The pool is sized as the engine sizes it (`actors.streaming.pool_bounds` over what is free).
Energy follows the estimate method's accounting (`actors.energy.estimate_j`); cost bills every node for the makespan.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from actors.energy import EnergyConfig
from actors.placement import NodeInfo, capacity
from actors.resources import Resources
from actors.streaming import pool_bounds
from workflows.engine import plan as engine_plan
from workflows.model import Workflow

STREAM_COORDINATOR = Resources(cpus=0.01)  # what workflows.driver reserves for a barrier-mode stream's driver


@dataclass(frozen=True)
class SimConfig:
    """The simulation's constants (seconds, a share). The machine-level defaults are what
    benchmarks/plan_calibration.py measured on the project's 2-core dev machine (2026-12-05, load 1.5-4);
    measure yours with it and pass `tierflow plan --calibration FILE`."""

    actor_start_s: float = 0.5  # a fresh Ray actor, placed and ready (calibrated 0.46-0.53)
    # The first call on a fresh actor: the worker deserialises the stage and imports what it needs (0.15-0.21)
    first_call_s: float = 0.2
    dispatch_s: float = 0.01  # a call on a warm actor plus the driver's bookkeeping per stage (0.006-0.007)
    stream_pool_start_s: float = 1.5  # Ray Data starting a stream's actor pool with nothing else running (1.47-1.52)
    # Ending idle actors of other shapes to make room, beyond starting the new one (0-0.014)
    reclaim_s: float = 0.05
    run_overhead_s: float = 0.3  # run set-up and tear-down around the stages (journal, hooks)
    # Share of a node's cores its stages get when they want them all: the driver, Ray's processes and the
    # store take the rest (0.81-0.95)
    core_share: float = 0.9
    gpu_speedup: float = 4.0  # GPU vs CPU-fallback time when profiles lack one of the two
    default_stage_s: float = 1.0  # a stage with no profile and no profiled sibling running the same function
    streaming: bool = True

    def __post_init__(self) -> None:
        for name in (
            "actor_start_s",
            "first_call_s",
            "dispatch_s",
            "stream_pool_start_s",
            "reclaim_s",
            "run_overhead_s",
            "default_stage_s",
        ):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ValueError(f"SimConfig.{name}={v!r} must be a finite number of seconds >= 0")
        if not (isinstance(self.core_share, int | float) and 0 < self.core_share <= 1):
            raise ValueError(f"SimConfig.core_share={self.core_share!r} must be in (0, 1]")
        if not (isinstance(self.gpu_speedup, int | float) and self.gpu_speedup > 0):
            raise ValueError(f"SimConfig.gpu_speedup={self.gpu_speedup!r} must be > 0 (GPU time = CPU time / it)")


@dataclass(frozen=True)
class StageProfile:
    """What the simulation knows of one stage: solo times per device, CPU demand, and stream facts."""

    cpu_duration_s: float | None = None  # measured on CPU (its own, or the CPU fallback)
    gpu_duration_s: float | None = None  # measured on a GPU
    cpu_s: float = 0.0  # CPU-seconds per execution
    wait_s: float = 0.0  # a fused consumer's time waiting for its stream (not its own work)
    setup_s: float = 0.0  # a stream consumer's solo time before it first read (fixed: does not scale with shards)
    cold_share: float = 0.0  # share of the profiled runs that were the first call on a fresh actor
    shards: int = 0  # streams: shards in the profiled run
    busy_s: float = 0.0  # streams: producers' total busy time in the profiled run
    pool_start_s: float | None = None  # streams: first batch later than one shard's work (Ray Data start-up)
    pool_start_fused: bool = True  # streams: profiled inside its consumer (start-up shared the consumer's cores)
    source: str = "measured"

    def duration_on(self, device: str, sim: SimConfig) -> float:
        """Solo time of a warm call: the profiled runs' share of first-call cost is taken out."""
        return max(0.0, self._measured_on(device, sim) - self.cold_share * sim.first_call_s)

    def _measured_on(self, device: str, sim: SimConfig) -> float:
        if device == "gpu":
            if self.gpu_duration_s is not None:
                return self.gpu_duration_s
            return (self.cpu_duration_s or sim.default_stage_s) / sim.gpu_speedup
        if self.cpu_duration_s is not None:
            return self.cpu_duration_s
        if self.gpu_duration_s is not None:
            return self.gpu_duration_s * sim.gpu_speedup
        return sim.default_stage_s

    def demand(self, device: str, sim: SimConfig) -> float:
        """Cores the stage keeps busy while it runs: its utilisation as profiled (CPU-seconds over the same
        wall time they were spent in, first-call cost included in both)."""
        d = self._measured_on(device, sim) - self.wait_s
        return min(64.0, self.cpu_s / d) if d > 1e-9 else 1.0


@dataclass(frozen=True)
class NodeSpec:
    """One node of a candidate cluster. `cores` bounds CPU contention (defaults to its CPU resource)."""

    name: str
    resources: dict[str, float]
    node_type: str = ""
    usd_per_h: float = 0.0
    cores: float | None = None

    def info(self) -> NodeInfo:
        return NodeInfo(node_id=self.name, resources=dict(self.resources), address=f"{self.node_type or self.name}")

    @property
    def core_count(self) -> float:
        return self.cores if self.cores is not None else self.resources.get("CPU", 1.0)


@dataclass
class StagePrediction:
    stage: str
    node: str
    device: str
    start_s: float
    end_s: float
    energy_j: float
    fallback: bool


@dataclass
class Prediction:
    makespan_s: float
    energy_j: float
    cost_usd: float
    stages: dict[str, StagePrediction] = field(default_factory=dict)
    co2_g: float = 0.0


@dataclass(eq=False)
class _Actor:
    shape: tuple
    node: int
    request: dict[str, float]
    busy: bool = False
    calls: int = 0


@dataclass(eq=False)
class _Task:
    stage: str
    actor: _Actor
    remaining_s: float  # solo seconds of work left
    demand: float
    extra: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # stream pool reservations
    started_s: float = 0.0
    device: str = "cpu"


def simulate(
    workflow: Workflow,
    profiles: Mapping[str, StageProfile],
    nodes: list[NodeSpec],
    *,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    sim: SimConfig | None = None,
    energy: EnergyConfig | None = None,
) -> Prediction:
    """Predict one run of `workflow` on `nodes`. Raises the engine's `UnsatisfiableResourcesError` if a
    stage fits no node (exactly when `tierflow run` would refuse)."""
    return _Sim(workflow, profiles, nodes, params or {}, sim or SimConfig(), energy or EnergyConfig()).run()


class _Sim:
    def __init__(
        self,
        workflow: Workflow,
        profiles: Mapping[str, StageProfile],
        nodes: list[NodeSpec],
        params: Mapping[str, Mapping[str, Any]],
        sim: SimConfig,
        energy: EnergyConfig,
    ) -> None:
        self.wf, self.profiles, self.nodes, self.params, self.sim, self.energy = (
            workflow,
            profiles,
            nodes,
            params,
            sim,
            energy,
        )
        self.infos = [n.info() for n in nodes]
        self.decisions = engine_plan(workflow, self.infos)
        self.fused = {
            n: workflow.downstream(n)[0]
            for n, st in workflow.stages.items()
            if sim.streaming and st.stream is not None and len(workflow.downstream(n)) == 1
        }
        self.consumer_of = {c: s for s, c in self.fused.items()}
        self.free = [dict(n.resources) for n in nodes]
        self.caps: dict[tuple, int] = {}
        self.actors: list[_Actor] = []
        self.waiting: dict[tuple, deque[str]] = {}
        self.running: list[_Task] = []
        self.starting: list[tuple[float, int, _Actor]] = []  # heap of (ready at, seq, actor)
        self.out: dict[str, StagePrediction] = {}
        self.now, self.seq = 0.0, 0
        # A consumer waits for its own upstream and for its fused streams' upstream (the stream starts inside it).
        self.pending = dict.fromkeys(workflow.order, 0)
        for n in workflow.order:
            for up in {e.upstream for e in workflow.upstream(n)}:
                self.pending[self.fused.get(n, n)] += 0 if up in self.fused else 1

    # -- resources ------------------------------------------------------------------------------
    def actor_res(self, name: str) -> Resources:
        if self.wf.stages[name].stream is not None and name not in self.fused:
            return STREAM_COORDINATOR
        return self.decisions[name].effective  # type: ignore[return-value]

    def fits(self, node: int, req: dict[str, float]) -> bool:
        return all(self.free[node].get(k, 0.0) + 1e-9 >= v for k, v in req.items() if v > 0)

    def take(self, node: int, req: dict[str, float], sign: float) -> None:
        for k, v in req.items():
            self.free[node][k] = self.free[node].get(k, 0.0) - sign * v

    def spot(self, req: dict[str, float]) -> int | None:
        return next((i for i in range(len(self.nodes)) if self.fits(i, req)), None)

    def device_of(self, name: str) -> str:
        eff = self.decisions[name].effective
        return "gpu" if eff is not None and eff.gpus > 0 else "cpu"

    # -- work -----------------------------------------------------------------------------------
    def work_of(self, name: str) -> tuple[float, float, list[tuple[int, dict[str, float]]]]:
        """(solo seconds, core demand, stream pool reservations) for running `name` now."""
        sim = self.sim
        prof = self.profiles.get(name, StageProfile(source="default"))
        dev = self.device_of(name) if self.wf.stages[name].stream is None else "cpu"
        own, demand = prof.duration_on(dev, sim), prof.demand(dev, sim)
        setup, per_batch = 0.0, own
        read = self._stream_scale(name)
        if read is not None:  # a consumer: its set-up is fixed, its work past set-up and waits scales with the batches
            setup = min(prof.setup_s, own)
            per_batch = max(0.0, own - setup - prof.wait_s) * read
            own = setup + per_batch
        stream = self.consumer_of.get(name) or (name if self.wf.stages[name].stream is not None else None)
        if stream is None:
            return own, demand, []
        # the stream's producers: per-shard work over a pool sized as the engine sizes it from what is free now
        sp = self.profiles.get(stream, StageProfile(source="default"))
        spec = self.wf.stages[stream].stream
        assert spec is not None
        shards = _shards(spec.shards, self.params.get(stream, {}))
        per_shard = sp.busy_s / sp.shards if sp.shards else sim.default_stage_s
        total_free = {k: sum(f.get(k, 0.0) for f in self.free) for k in ("CPU", "GPU")}
        lo, hi = pool_bounds(spec, self.decisions[stream].ray_options(), total_free)
        req = {k: v for k, v in self.decisions[stream].effective.as_ray_resources().items() if v > 0}  # type: ignore[union-attr]
        held = []
        for _ in range(max(1, lo, min(hi, shards))):
            if (i := self.spot(req)) is None:
                break
            self.take(i, req, 1)
            held.append((i, req))
        waves = math.ceil(shards / max(1, len(held)))
        if stream == name:  # barrier mode: the stream alone, its pool started with nothing else running
            alone = sp.pool_start_s is not None and not sp.pool_start_fused
            return (sp.pool_start_s if alone else sim.stream_pool_start_s) + waves * per_shard, 0.1, held  # type: ignore[operator]
        # Fused: the consumer's first batch waits for its set-up and for the pool's first shard; then the slower
        # of the consumer's batches and the producers' remaining waves sets the pace.
        start = sp.pool_start_s if sp.pool_start_s is not None else sim.stream_pool_start_s
        rest = max(per_batch, (waves - 1) * per_shard + per_batch / max(1, shards))
        return max(setup, start + per_shard) + rest, demand, held

    def _stream_scale(self, name: str) -> float | None:
        """Shards now / shards profiled, over the streams `name` consumes (None if it reads none)."""
        ups = [e.upstream for e in self.wf.upstream(name) if self.wf.stages[e.upstream].stream is not None]
        if not ups:
            return None
        ratios = []
        for up in ups:
            spec, sp = self.wf.stages[up].stream, self.profiles.get(up)
            now = _shards(spec.shards, self.params.get(up, {}))  # type: ignore[union-attr]
            ratios.append(now / sp.shards if sp is not None and sp.shards else 1.0)
        return max(ratios)

    def start_task(self, name: str, actor: _Actor) -> None:
        actor.busy = True
        solo, demand, held = self.work_of(name)
        solo += self.sim.dispatch_s + (self.sim.first_call_s if actor.calls == 0 else 0.0)
        actor.calls += 1
        self.running.append(_Task(name, actor, solo, demand, held, self.now, self.device_of(name)))

    # -- the engine's launch rules -------------------------------------------------------------
    def try_launch(self) -> None:
        for shape, queue in self.waiting.items():
            while queue:
                idle = next((a for a in self.actors if a.shape == shape and not a.busy), None)
                if idle is None:
                    break
                self.start_task(queue.popleft(), idle)
        for shape, queue in self.waiting.items():
            if queue:
                self.start_actors(shape, queue)

    def start_actors(self, shape: tuple, queue: deque[str]) -> None:
        res = self.actor_res(queue[0])
        req = {k: v for k, v in res.as_ray_resources().items() if v > 0}
        if shape not in self.caps:
            self.caps[shape] = max(1, capacity(res.as_ray_resources(), self.infos, self.wf.max_actors))  # as ActorPool
        mine = sum(1 for a in self.actors if a.shape == shape)
        coming = sum(1 for _, _, a in self.starting if a.shape == shape)
        for _ in range(max(0, min(len(queue) - coming, self.caps[shape] - mine))):
            spot, delay = self.spot(req), self.sim.actor_start_s
            if spot is None:  # end idle actors of other shapes to make room (ActorPool.reclaim)
                delay += self.sim.reclaim_s
                for victim in [a for a in self.actors if not a.busy and a.shape != shape]:
                    self.actors.remove(victim)
                    self.take(victim.node, victim.request, -1)
                    if self.fits(victim.node, req):
                        spot = victim.node
                        break
            if spot is None:
                return
            self.take(spot, req, 1)
            actor = _Actor(shape, spot, req, busy=True)  # not lent while it starts
            self.actors.append(actor)
            self.seq += 1
            heapq.heappush(self.starting, (self.now + delay, self.seq, actor))  # type: ignore[misc]

    def ready(self, name: str) -> None:
        if name not in self.fused:  # a fused stream starts inside its consumer
            self.waiting.setdefault(self.actor_res(name).shape(), deque()).append(name)

    def rates(self) -> dict[int, float]:
        demand: dict[int, float] = {}
        for t in self.running:
            demand[t.actor.node] = demand.get(t.actor.node, 0.0) + t.demand
        share = self.sim.core_share
        return {i: min(1.0, self.nodes[i].core_count * share / d) if d > 0 else 1.0 for i, d in demand.items()}

    def finish(self, t: _Task) -> None:
        self.running.remove(t)
        t.actor.busy = False
        for node, req in t.extra:
            self.take(node, req, -1)
        for name in [t.stage] + ([self.consumer_of[t.stage]] if t.stage in self.consumer_of else []):
            is_stream = name in self.fused or self.wf.stages[name].stream is not None
            self.out[name] = StagePrediction(
                name,
                self.nodes[t.actor.node].name,
                t.device,
                t.started_s,
                self.now,
                _energy(self.profiles.get(name), is_stream, t, self.now, self.energy),
                self.decisions[name].fallback_used,
            )
            if name in self.fused:
                continue  # its one consumer is this task
            for d in self.wf.downstream(name):
                target = self.fused.get(d, d)  # an upstream of a fused stream is waited for by its consumer
                self.pending[target] -= 1
                if self.pending[target] == 0:
                    self.ready(target)

    def run(self) -> Prediction:
        for n in self.wf.order:
            if self.pending[n] == 0:
                self.ready(n)
        self.try_launch()
        while self.running or self.starting or any(self.waiting.values()):
            if not self.running and not self.starting:
                stuck = [n for q in self.waiting.values() for n in q]
                raise RuntimeError(f"planner: stages {stuck} wait with no actor coming (a tierflow bug)")
            r = self.rates()
            t_task = min((t.remaining_s / r[t.actor.node] for t in self.running), default=math.inf)
            t_start = self.starting[0][0] - self.now if self.starting else math.inf
            step = min(t_task, t_start)
            for t in self.running:
                t.remaining_s -= step * r[t.actor.node]
            self.now += step
            while self.starting and self.starting[0][0] <= self.now + 1e-12:
                heapq.heappop(self.starting)[2].busy = False
            for t in [t for t in self.running if t.remaining_s <= 1e-9]:
                self.finish(t)
            self.try_launch()
        makespan = self.now + self.sim.run_overhead_s
        total_j = sum(p.energy_j for p in self.out.values())
        cost = sum(n.usd_per_h for n in self.nodes) * makespan / 3600.0
        return Prediction(makespan, total_j, cost, self.out)


def _energy(prof: StageProfile | None, is_stream: bool, t: _Task, now: float, e: EnergyConfig) -> float:
    """The estimate method's accounting: CPU-seconds x W/core, plus GPU wall time x W for a GPU stage."""
    if prof is None:
        return 0.0
    cpu_s = prof.busy_s if is_stream else prof.cpu_s
    gpu_j = e.gpu_watts * (now - t.started_s) if (t.device == "gpu" and not is_stream) else 0.0
    return cpu_s * e.cpu_watts_per_core + gpu_j


def _shards(spec: int | str, params: Mapping[str, Any]) -> int:
    return int(params.get(spec, 1)) if isinstance(spec, str) else int(spec)
