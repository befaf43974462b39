"""Warm stage actors keyed by resource shape: handed out only once Ray has placed them.

Why a stage never waits on an unplaced actor: Ray queues an actor it cannot place yet, and a call
submitted to it waits with it. If what it needs is held by idle actors of other shapes, nothing ever
frees it (the engine hung this way on `cpus=1, 1, 0.5` siblings on 2 CPUs). So the pool starts
actors, watches their `__ray_ready__`, and lends only placed ones; while any actor of the pool waits
for placement, idle actors of other shapes are ended to make room (`reclaim`). An actor that cannot
start at all (its worker died before it ran, e.g. a token-auth mismatch) is reported, not retried.

Across runs of one driver process the pool is kept (`SharedPools`): idle actors stay warm for
`keep_warm_s`, so a second run of the same shapes costs no actor start-up.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import ray

from actors.placement import NodeInfo, NodeType, capacity
from actors.ray_api import cluster_nodes
from actors.resources import Resources
from actors.runner import StageActor
from storage import StoreConfig

log = logging.getLogger(__name__)

_RemoteStageActor = ray.remote(StageActor)
STARTING, IDLE, BUSY = "starting", "idle", "busy"
# Calls one actor may hold at once. Two hide the driver's round trip between short stages (the next one is
# already queued in the actor when the last returns); more only lengthen what a failure sends back.
PIPELINE_DEPTH = 2


@dataclass(eq=False)
class Member:
    """One actor of the pool and what it is doing."""

    actor: Any
    resources: Resources
    state: str
    since: float  # monotonic time of the last state change
    ready_ref: Any = None  # `__ray_ready__` while starting
    calls: int = 0  # calls lent out and not yet released (more than one: queued behind each other in the actor)
    retired: bool = False  # lent no more: ended once its calls return (a stage failed in it)

    @property
    def shape(self) -> tuple:
        return self.resources.shape()


@dataclass(frozen=True)
class StartFailure:
    """An actor Ray could not start: its shape, and Ray's words for why."""

    resources: Resources
    error: str
    never_ran: bool  # Ray cancelled it before it ran (token-auth mismatch, runtime env)
    init_failed: bool  # its constructor raised (e.g. the store is unreachable from that node)

    @property
    def definitive(self) -> bool:
        """Another actor of the same request would fail the same way."""
        return self.never_ran or self.init_failed


@dataclass
class ActorPool:
    """Stage actors of one driver, reused across stages (and, parked, across runs).

    `acquire` lends a placed idle actor of the shape (or queues behind a busy one) or returns None; `want`
    starts actors for stages that wait, up to as many as the cluster holds at once, each counted on one
    node; `poll` moves placed actors to idle and reports those that could not start. Thread-safe: the reaper of
    `SharedPools` ends parked actors from its own thread.
    """

    store_config: StoreConfig
    nodes: list[NodeInfo] | None = None
    node_types: list[NodeType] = field(default_factory=list)  # what the autoscaler can still launch
    max_actors: int = 64  # actors per shape at most (the workflow's max_actors)
    _members: dict[Any, Member] = field(default_factory=dict)  # ready ref or actor -> member
    _caps: dict[tuple, int] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def configure(self, node_types: list[NodeType], max_actors: int) -> None:
        """Set what a run's capacity counts: alive nodes, launchable ones, and the workflow's maximum."""
        with self._lock:
            self.node_types, self.max_actors = list(node_types), max_actors
            self._caps.clear()

    @property
    def autoscaling(self) -> bool:
        """The cluster has node types that come and go: an actor kept idle keeps a node up."""
        return any(t.max_count != 0 for t in self.node_types)

    # -- lending --------------------------------------------------------------------------------
    def acquire(self, resources: Resources, queue_behind: Callable[[Any], bool] | None = None) -> Any | None:
        """An idle placed actor of the shape; else, with `queue_behind`, a busy one it accepts that has fewer
        than PIPELINE_DEPTH calls lent (the call waits in the actor's own queue: no round trip through the
        driver between two stages); else None."""
        shape = resources.shape()
        with self._lock:
            for m in self._members.values():
                if m.state == IDLE and m.shape == shape:
                    self._set(m, BUSY)
                    m.calls = 1
                    return m.actor
            if queue_behind is not None:
                for m in self._members.values():
                    lendable = m.state == BUSY and not m.retired and m.calls < PIPELINE_DEPTH
                    if lendable and m.shape == shape and queue_behind(m.actor):
                        m.calls += 1
                        return m.actor
        return None

    def want(self, resources: Resources, options: dict[str, Any], waiting: int) -> int:
        """Start actors so that `waiting` stages of this shape each have one coming; returns how many started."""
        shape = resources.shape()
        with self._lock:
            mine = [m for m in self._members.values() if m.shape == shape]
            starting = sum(m.state == STARTING for m in mine)
            n = min(waiting - starting, self._capacity(resources) - len(mine))
            # Idle actors of other shapes that may hold what these need go in `reclaim`, the driver's next step.
            for _ in range(max(0, n)):
                actor = _RemoteStageActor.options(**options, max_concurrency=1).remote(self.store_config)
                m = Member(actor, resources, STARTING, time.monotonic(), actor.__ray_ready__.remote())
                self._members[actor] = m
            return max(0, n)

    def release(self, actor: Any) -> None:
        """One call lent out has returned; the actor is idle once none is left (or ended, if retired)."""
        with self._lock:
            if (m := self._members.get(actor)) is None:
                return
            m.calls = max(0, m.calls - 1)
            if m.calls:
                return
            if not m.retired:
                self._set(m, IDLE)
                return
            del self._members[actor]
        _kill(actor)

    def retire(self, actor: Any) -> None:
        """A stage failed in this actor: lend it no more, and end it once the calls queued in it return
        (they finish and commit, as stages in flight elsewhere do)."""
        with self._lock:
            if (m := self._members.get(actor)) is None:
                return
            if m.calls:
                m.retired = True
                return
            del self._members[actor]
        _kill(actor)

    def discard(self, actor: Any) -> None:
        """End an actor that failed or timed out: a broken or busy process is never reused."""
        with self._lock:
            self._members.pop(actor, None)
        _kill(actor)

    # -- placement ------------------------------------------------------------------------------
    def ready_refs(self) -> list[Any]:
        """What the driver waits on besides its stages: an actor becoming placed wakes it."""
        with self._lock:
            return [m.ready_ref for m in self._members.values() if m.state == STARTING]

    def poll(self, done: Iterable[Any] = ()) -> list[StartFailure]:
        """Move placed actors to idle; end and report those Ray could not start."""
        with self._lock:
            starting = {m.ready_ref: m for m in self._members.values() if m.state == STARTING}
        if not starting:
            return []
        ready = set(done) & set(starting)
        rest = [r for r in starting if r not in ready]
        if rest:
            ready |= set(ray.wait(rest, num_returns=len(rest), timeout=0)[0])
        failures = []
        for ref in ready:
            m = starting[ref]
            try:
                ray.get(ref)
            except Exception as exc:  # ActorDiedError, RuntimeEnvSetupError, ...: never lend it
                self.discard(m.actor)
                text = str(exc)
                # A node that died under a starting actor (e.g. a launch the autoscaler gave up on) is no
                # verdict on the request: another actor may be placed on the next node.
                never_ran = ("never ran" in text and "node has died" not in text) or "RuntimeEnv" in type(exc).__name__
                init_failed = bool(getattr(exc, "actor_init_failed", False))
                failures.append(StartFailure(m.resources, f"{type(exc).__name__}: {text}", never_ran, init_failed))
                continue
            with self._lock:
                if m.actor in self._members and m.state == STARTING:
                    m.ready_ref = None
                    self._set(m, IDLE)
        return failures

    def reclaim(self, ignore: Iterable[tuple] = ()) -> int:
        """While an actor waits for placement, end idle actors of other shapes: they may hold what it needs.

        Shapes in `ignore` wait for a node the autoscaler launches, not for room on the nodes alive.
        """
        with self._lock:
            waiting = {m.shape for m in self._members.values() if m.state == STARTING} - set(ignore)
            if not waiting:
                return 0
            victims = [m for m in self._members.values() if m.state == IDLE and m.shape not in waiting]
            for m in victims:
                del self._members[m.actor]
        for m in victims:
            log.debug("ending idle actor %s to make room for a waiting one", m.resources.describe())
            _kill(m.actor)
        return len(victims)

    def trim(self, needed: dict[tuple, int]) -> int:
        """End starting and idle actors beyond what `needed` (shape -> stages not launched yet) can use.

        On an autoscaling cluster an actor nobody will use holds a node up (or, still starting, makes the
        autoscaler launch one): once a fan-out has drained, its actors go and the nodes can scale down.
        """
        with self._lock:
            spare: dict[tuple, list[Member]] = {}
            for m in self._members.values():
                if m.state != BUSY:
                    spare.setdefault(m.shape, []).append(m)
            victims = []
            for shape, members in spare.items():
                members.sort(key=lambda m: m.state != STARTING)  # unplaced ones first: no start-up is lost
                victims += members[: max(0, len(members) - needed.get(shape, 0))]
            for m in victims:
                del self._members[m.actor]
        for m in victims:
            _kill(m.actor)
        return len(victims)

    def starting(self) -> list[Member]:
        with self._lock:
            return [m for m in self._members.values() if m.state == STARTING]

    def starting_of(self, shape: tuple) -> int:
        with self._lock:
            return sum(m.state == STARTING and m.shape == shape for m in self._members.values())

    def placed(self, shape: tuple) -> bool:
        """An actor of `shape` is placed (idle or busy): a node for it exists."""
        with self._lock:
            return any(m.state != STARTING and m.shape == shape for m in self._members.values())

    def held(self) -> dict[str, list[Member]]:
        """Members by state, for error messages that say what holds the cluster."""
        out: dict[str, list[Member]] = {STARTING: [], IDLE: [], BUSY: []}
        with self._lock:
            for m in self._members.values():
                out[m.state].append(m)
        return out

    def occupancy(self) -> str:
        """What the cluster has, what is free, and what this pool holds: the rest is someone else's."""
        total, free = ray.cluster_resources(), ray.available_resources()
        keys = [k for k in ("CPU", "GPU", "memory") if total.get(k)] + sorted(
            k for k in total if k not in ("CPU", "GPU", "memory", "object_store_memory") and not k.startswith("node:")
        )
        held = self.held()
        ours: dict[str, float] = {}
        for m in held[IDLE] + held[BUSY]:
            for k, v in m.resources.as_ray_resources().items():
                ours[k] = ours.get(k, 0.0) + v
        others = {k: total.get(k, 0.0) - free.get(k, 0.0) - ours.get(k, 0.0) for k in keys}
        return (
            f"The cluster has {_fmt(total, keys)} in all, {_fmt(free, keys)} free; this run's "
            f"{len(held[BUSY])} busy and {len(held[IDLE])} idle actors hold {_fmt(ours, keys)}; "
            f"other jobs, actors or Serve replicas hold {_fmt(others, keys)}"
        )

    # -- ending ---------------------------------------------------------------------------------
    def end_idle(self, *, older_than_s: float = 0.0, keep_shapes: Iterable[tuple] = ()) -> int:
        """End idle actors idle for longer than `older_than_s`, except those of `keep_shapes`."""
        keep, now = set(keep_shapes), time.monotonic()
        with self._lock:
            victims = [
                m
                for m in self._members.values()
                if m.state == IDLE and m.shape not in keep and now - m.since >= older_than_s
            ]
            for m in victims:
                del self._members[m.actor]
        for m in victims:
            _kill(m.actor)
        return len(victims)

    def end_unidle(self) -> None:
        """End every actor that is not idle (busy or starting): what a stopped run leaves behind."""
        with self._lock:
            victims = [m for m in self._members.values() if m.state != IDLE]
            for m in victims:
                del self._members[m.actor]
        for m in victims:
            _kill(m.actor)

    def shutdown(self) -> None:
        with self._lock:
            victims = list(self._members.values())
            self._members.clear()
        for m in victims:
            _kill(m.actor)

    @property
    def size(self) -> int:
        with self._lock:
            return len(self._members)

    # -- internals ------------------------------------------------------------------------------
    def _set(self, m: Member, state: str) -> None:
        m.state, m.since = state, time.monotonic()

    def _capacity(self, resources: Resources) -> int:
        shape = resources.shape()
        if shape not in self._caps:
            nodes = self.nodes if self.nodes is not None else cluster_nodes()
            cap = capacity(resources.as_ray_resources(), nodes, self.max_actors, self.node_types)
            self._caps[shape] = max(1, cap)
        return self._caps[shape]


def _fmt(values: dict[str, float], keys: list[str]) -> str:
    shown = [
        f"{k}={max(0.0, values.get(k, 0.0)) / 2**30:.2f}GiB"
        if k == "memory"
        else f"{k}={max(0.0, values.get(k, 0.0)):g}"
        for k in keys
    ]
    return "{" + ", ".join(shown) + "}"


def explain_start_failure(failure: StartFailure) -> str:
    """What an actor that could not start most likely means, the fix, then Ray's own words."""
    said = f"Ray said: {failure.error.strip()}"
    if failure.init_failed:
        return (
            f"the stage actor for {failure.resources.describe()} raised while setting up on its node. "
            f"Fix: check that the store's tiers are reachable from every node. {said}"
        )
    if not failure.never_ran:
        return f"Ray could not start an actor for {failure.resources.describe()}. {said}"
    try:
        from ray._raylet import AuthenticationMode, get_authentication_mode  # noqa: PLC0415

        mode = "token" if get_authentication_mode() == AuthenticationMode.TOKEN else "disabled"
    except ImportError:  # pragma: no cover - always present in the Ray wheel
        mode = os.environ.get("RAY_AUTH_MODE", "disabled")
    return (
        f"Ray cancelled the actor for {failure.resources.describe()} before it ran. The usual cause is a "
        f"token-authentication mismatch: this driver runs with RAY_AUTH_MODE={mode}, and a cluster started with the "
        "other mode refuses its requests (the cluster's GCS log says 'Missing authorization header'). "
        "Fix: run the driver with the cluster's mode: `export RAY_AUTH_MODE=token` (with the cluster's token in "
        "~/.ray/auth_token or $RAY_AUTH_TOKEN) for a cluster started by `ray start` on Ray 2.60, or "
        "`export RAY_AUTH_MODE=disabled` for one started without auth. Other causes: the actor's runtime_env could "
        f"not be set up, or its node died while it started. {said}"
    )


def _kill(actor: Any) -> None:
    # Never through a Ray that is gone: any Ray call without a connection auto-starts a new local Ray
    # (from the reaper's thread, after the user's ray.shutdown()); the actor died with its Ray anyway.
    if not ray.is_initialized():
        return
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already dead, or Ray already shut down
        log.debug("actor already gone", exc_info=True)


class SharedPools:
    """The driver process's pools, one per (Ray session, store), kept warm between runs.

    A run borrows the pool for its store and parks it when it succeeds; a parked pool's idle actors
    end after `keep_warm_s` (a reaper thread checks every second) or when the process exits.
    Actors are never detached: if the driver dies, Ray ends them with it.
    """

    def __init__(self) -> None:
        self._pools: dict[tuple[str, str], ActorPool] = {}
        self._keep: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._reaper: threading.Thread | None = None
        atexit.register(self.release_all)

    def borrow(self, store_config: StoreConfig) -> ActorPool:
        session = _session()
        key = (session, _fingerprint(store_config))
        with self._lock:
            pool = self._pools.pop(key, None)
            # Parked actors of another store (or of a Ray that was shut down) would hold resources this
            # run's pool cannot reclaim: they go now.
            others = [p for k, p in self._pools.items() if k[0] == session]
            self._pools.clear()
            self._keep.clear()
        for other in others:
            other.shutdown()
        return pool if pool is not None else ActorPool(store_config)

    def park(self, pool: ActorPool, keep_warm_s: float) -> None:
        """Keep `pool`'s idle actors for `keep_warm_s`; 0 ends them now."""
        pool.end_unidle()
        if keep_warm_s <= 0 or not ray.is_initialized():
            pool.shutdown()
            return
        key = (_session(), _fingerprint(pool.store_config))
        with self._lock:
            if (old := self._pools.get(key)) is not None and old is not pool:
                old.shutdown()  # two runs on one store at once: keep the newer pool
            self._pools[key], self._keep[key] = pool, keep_warm_s
            if self._reaper is None or not self._reaper.is_alive():
                self._reaper = threading.Thread(target=self._reap, name="tierflow-warm-actors", daemon=True)
                self._reaper.start()

    def release_all(self) -> int:
        """End every parked actor now (tests, notebooks, before `ray.shutdown()`); returns how many."""
        with self._lock:
            pools = list(self._pools.values())
            self._pools.clear()
            self._keep.clear()
        n = 0
        for pool in pools:
            n += pool.size
            pool.shutdown()
        return n

    def _reap(self) -> None:
        while True:
            time.sleep(1.0)
            session = _session() if ray.is_initialized() else None
            with self._lock:
                for stale in [k for k in self._pools if k[0] != session]:  # their Ray was shut down
                    del self._pools[stale], self._keep[stale]
                parked = [(p, self._keep[k]) for k, p in self._pools.items()]
                if not parked:
                    self._reaper = None
                    return
            for pool, keep in parked:
                pool.end_idle(older_than_s=keep)
                if pool.size == 0:
                    with self._lock:
                        for k in [k for k, p in self._pools.items() if p is pool]:
                            del self._pools[k], self._keep[k]


def _fingerprint(config: StoreConfig) -> str:
    # Tier specs hold dicts (unhashable) and perhaps keys: a digest names the store without keeping them.
    return hashlib.sha256(repr(config).encode()).hexdigest()


def _session() -> str:
    """Names the Ray instance this process is connected to (job ids restart at 1 on a new cluster)."""
    ctx = ray.get_runtime_context()
    return f"{ctx.get_node_id()}/{ctx.get_job_id()}"


shared_pools = SharedPools()
