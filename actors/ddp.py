"""Data-parallel training inside a stage: a gang of torch DDP workers in a placement group, with
just-in-time snapshots (actors.snapshot) so a lost worker costs at most one minibatch.

    from actors.ddp import DDPConfig, TrainSpec, train_data_parallel

    @stage(cpus=0.5)
    def train(ctx, preprocess: pa.Table) -> Tensors:
        result = train_data_parallel(ctx, preprocess, TrainSpec(build_model, build_opt, prepare, loss, epochs=5),
                                     DDPConfig(workers=2, cpus_per_worker=0.5))
        return Tensors(result.state)

The stage's own actor only coordinates: it places the gang, restarts it when a worker or its node
dies (restoring from the keeper's in-memory snapshot, else the latest durable checkpoint of this run
and stage), and logs one loss per step index through the `StageContext`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from actors.context import StageContext
from actors.ddp_worker import (
    DDPConfig,
    DDPConfigError,
    DDPWorker,
    GangError,
    GangFailedError,
    TrainSpec,
    WorkerInterrupted,
)
from actors.slab import discard_slabs
from actors.snapshot import NAMESPACE, KeeperConfig, SnapshotKeeper, keeper_name

log = logging.getLogger(__name__)


@dataclass
class Failure:
    """One gang failure and how training recovered from it."""

    attempt: int
    cause: str
    detected_at: float
    completed: int  # most optimizer steps any rank had finished when the gang broke
    restored_step: int = -1
    source: str = ""  # "memory", "durable" or "none" (from scratch)
    resumed_at: float | None = None  # wall time the first new step finished

    @property
    def replayed(self) -> int:
        return max(0, self.completed - self.restored_step) if self.restored_step >= 0 else 0

    @property
    def recovery_s(self) -> float | None:
        return None if self.resumed_at is None else self.resumed_at - self.detected_at

    def describe(self) -> str:
        took = f", first new step after {self.recovery_s:.1f}s" if self.recovery_s is not None else ""
        return (
            f"attempt {self.attempt}: {self.cause[:200]} -> restored step {self.restored_step} from {self.source} "
            f"(finished steps known: {self.completed}; replayed {self.replayed}{took})"
        )


@dataclass
class TrainResult:
    state: dict[str, np.ndarray]  # the final model state_dict
    steps: int
    start_step: int  # > 0 when the first attempt continued a durable checkpoint (a resumed run)
    start_source: str
    failures: list[Failure] = field(default_factory=list)
    step_times_s: list[float] = field(default_factory=list)  # rank 0, last attempt
    snapshot_blocked_s: float = 0.0  # training-thread time spent on snapshots (the rank that spent most)
    snapshot_background_cpu_s: float = 0.0  # CPU time of background copies / sends (the rank that spent most)
    losses: dict[int, float] = field(default_factory=dict)

    @property
    def replayed_steps(self) -> int:
        return max((f.replayed for f in self.failures), default=0)


_RemoteWorker = ray.remote(max_restarts=0)(DDPWorker)
_RemoteKeeper = ray.remote(max_restarts=0)(SnapshotKeeper)


# -- the coordinator (runs inside the stage's actor) ----------------------------------------------
class _Broken(Exception):  # internal control flow, never leaves this module
    def __init__(self, cause: str, completed: int) -> None:
        self.cause, self.completed = cause, completed
        super().__init__(cause)


def _alive(actor: Any) -> bool:
    try:
        ray.get(actor.__ray_ready__.remote(), timeout=10)
        return True
    except (RayActorError, GetTimeoutError):
        return False


class _Gang:
    """The placement group, the workers (None where a rank must be replaced) and the snapshot keeper."""

    def __init__(self, ctx: StageContext, spec: TrainSpec, cfg: DDPConfig) -> None:
        self.ctx, self.spec, self.cfg = ctx, spec, cfg
        self.node_id = ray.get_runtime_context().get_node_id()  # this coordinator's node
        self.keeper: Any = None
        self.workers: list[Any] = [None] * cfg.workers
        self.slabs: list[dict[str, Any] | None] = [None] * cfg.workers  # where each rank snapshots per step
        self.pg: Any = None

    def ensure_keeper(self) -> None:
        """The keeper lives next to this coordinator: losing that node ends the stage anyway."""
        if self.keeper is not None:
            if self.keeper_alive():
                return
            log.warning("snapshot keeper is gone; a new one starts from the latest durable checkpoint")
            ray.kill(self.keeper, no_restart=True)
        config = KeeperConfig(
            self.ctx.run_id,
            self.ctx.stage,
            self.cfg.workers,
            self.ctx.store_config,
            self.cfg.durable_every,
            self.cfg.keep_durable,
        )
        name = keeper_name(self.ctx.run_id, self.ctx.stage)
        options = {
            "name": name,
            "namespace": NAMESPACE,
            "num_cpus": 0,
            "max_concurrency": self.cfg.workers + 4,
            # Hard affinity: soft affinity in Ray 2.60 places some actors elsewhere though this node fits.
            "scheduling_strategy": NodeAffinitySchedulingStrategy(self.node_id, soft=False),
        }
        for _ in range(50):
            try:
                self.keeper = _RemoteKeeper.options(**options).remote(config)
                return
            except ValueError:  # the name is taken: the keeper of an earlier attempt of this stage, dying
                with contextlib.suppress(ValueError):
                    ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
                time.sleep(0.1)
        raise GangFailedError(f"actor name {name!r} stays taken; is this stage of run {self.ctx.run_id} running twice?")

    def keeper_alive(self) -> bool:
        try:
            ray.get(self.keeper.status.remote(), timeout=10)
            return True
        except (RayActorError, GetTimeoutError):
            return False

    def _place(self) -> None:
        bundle = {"CPU": self.cfg.cpus_per_worker}
        if self.cfg.gpus_per_worker:
            bundle["GPU"] = self.cfg.gpus_per_worker
        self.pg = placement_group([dict(bundle) for _ in range(self.cfg.workers)], strategy=self.cfg.strategy)
        try:
            ray.get(self.pg.ready(), timeout=self.cfg.placement_timeout_s)
        except GetTimeoutError:
            raise GangFailedError(
                f"{self.cfg.workers} workers of {bundle} ({self.cfg.strategy}) could not be placed within "
                f"{self.cfg.placement_timeout_s:g}s; the cluster offers {ray.available_resources()}"
            ) from None

    def start(self, attempt: int, table_ref: Any) -> list[dict[str, Any]]:
        """Fill the empty ranks (Ray re-places bundles of a lost node) and (re)join everyone."""
        if self.pg is None:
            self._place()
        for r, w in enumerate(self.workers):
            if w is None:
                self.workers[r] = _RemoteWorker.options(
                    name=f"ddp.{self.ctx.run_id}.{self.ctx.stage}.a{attempt}.rank{r}",
                    namespace=NAMESPACE,
                    num_cpus=self.cfg.cpus_per_worker,
                    num_gpus=self.cfg.gpus_per_worker,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
                ).remote(r, self.cfg.workers, self.spec, self.cfg)
        limit = self.cfg.placement_timeout_s + self.cfg.collective_timeout_s
        try:
            host, port = ray.get(self.workers[0].rendezvous.remote(), timeout=limit)
            key = (self.ctx.run_id, self.ctx.stage)
            setups = ray.get(
                [w.setup.remote(host, port, table_ref, self.keeper, key) for w in self.workers], timeout=limit
            )
            self.slabs = [s["slab"] for s in setups]
            ray.get(self.keeper.track_slabs.remote(self.slabs))
            return setups
        except GetTimeoutError:
            raise GangFailedError(
                f"the gang did not assemble within {limit:g}s (a rank could not be placed?)"
            ) from None

    def run(self) -> list[dict[str, Any]]:
        """Reports of every rank; raises `_Broken` when the gang fails."""
        futures = {w.train.remote(): r for r, w in enumerate(self.workers)}
        reports: list[dict[str, Any]] = []
        pending = list(futures)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                reports.append(ray.get(done[0]))
            except (RayActorError, RayTaskError) as exc:
                raise self._broken(futures, {futures[done[0]]: exc}, pending) from None
        return sorted(reports, key=lambda rep: rep["rank"])

    def _broken(self, futures: dict[Any, int], errors: dict[int, Exception], pending: list[Any]) -> _Broken:
        if pending:  # survivors notice the dead peer in their next collective; let them say how far they got
            done, _ = ray.wait(pending, num_returns=len(pending), timeout=self.cfg.drain_s)
            for ref in done:
                try:
                    ray.get(ref)
                except (RayActorError, RayTaskError) as exc:
                    errors[futures[ref]] = exc
        interrupted = {r: c for r, e in errors.items() if isinstance(c := getattr(e, "cause", None), WorkerInterrupted)}
        died = [e for e in errors.values() if isinstance(e, RayActorError)]
        if not died and self.keeper_alive():  # everyone alive: the user's code raised, restarting would not help
            user = next(iter(interrupted.values()), None)
            raise GangFailedError(f"{user}\n{user.tb}" if user else str(next(iter(errors.values()))))
        for r, w in enumerate(self.workers):
            if r not in interrupted:  # dead, or hung in a collective: replace; survivors keep their process
                ray.kill(w, no_restart=True)
                self.workers[r] = None
        completed = max((i.completed for i in interrupted.values()), default=-1)
        cause = f"{type(died[0]).__name__}: {died[0]}" if died else "the snapshot keeper died"
        return _Broken(cause.splitlines()[0][:500], completed)

    def joining_failed(self, exc: Exception) -> _Broken:
        """Setup raised: user code (everyone alive) fails the stage; a lost rank or keeper restarts the gang."""
        alive = [w is not None and _alive(w) for w in self.workers]
        if all(alive) and self.keeper_alive():
            cause = getattr(exc, "cause", exc)
            raise GangFailedError(f"setting up the gang failed: {type(cause).__name__}: {cause}") from None
        for r, w in enumerate(self.workers):
            if not alive[r] and w is not None:
                ray.kill(w, no_restart=True)
                self.workers[r] = None
        return _Broken(f"{type(exc).__name__} while the gang assembled: {str(exc).splitlines()[0][:300]}", -1)

    def recover_state(self) -> int:
        """After a failure: a live keeper (a new one loads the latest durable checkpoint) that has
        collected the ranks' slabs; the most steps known done (the slabs show what dead ranks did)."""
        self.ensure_keeper()
        return ray.get(self.keeper.collect.remote(self.slabs), timeout=60)["seen"]

    def close(self) -> None:
        for w in self.workers:
            if w is not None:
                ray.kill(w, no_restart=True)
        with contextlib.suppress(Exception):  # best effort: /dev/shm is cleared on reboot anyway
            discard_slabs(self.slabs)
        if self.pg is not None:
            remove_placement_group(self.pg)
        if self.keeper is not None:
            ray.kill(self.keeper, no_restart=True)


def train_data_parallel(ctx: StageContext, data: Any, spec: TrainSpec, config: DDPConfig | None = None) -> TrainResult:
    """Train `spec` on `data` (a pyarrow.Table) with `config.workers` DDP ranks; survive worker and node loss.

    Logs `loss` per step (mean over ranks; one value per step index even across restarts), `ddp_restarts`
    and `ddp_replayed_steps` through `ctx`. Raises `GangFailedError` when user code raises in a worker,
    the gang cannot be placed, or more than `config.max_restarts` restarts would be needed.
    """
    cfg = config or DDPConfig()
    gang = _Gang(ctx, spec, cfg)
    table_ref = ray.put(data)
    failures: list[Failure] = []
    start: dict[str, Any] | None = None
    try:
        gang.ensure_keeper()
        attempt = 0
        while True:
            try:
                setups = gang.start(attempt, table_ref)
                start = start or setups[0]
                if failures:
                    failures[-1].restored_step, failures[-1].source = setups[0]["step"], setups[0]["source"]
                reports = gang.run()
                break
            except (_Broken, RayActorError, RayTaskError) as exc:
                if not isinstance(exc, _Broken):  # failed while joining
                    exc = gang.joining_failed(exc)
                detected = time.time()
                failures.append(Failure(attempt, exc.cause, detected, max(exc.completed, gang.recover_state())))
                log.warning("gang attempt %d broke (%s); restarting", attempt, exc.cause)
                if attempt >= cfg.max_restarts:
                    raise GangFailedError(
                        f"data-parallel training failed {attempt + 1} times (max_restarts={cfg.max_restarts}); "
                        f"last: {exc.cause}"
                    ) from None
                attempt += 1
        assert start is not None  # set by the attempt that just finished
        if failures:
            failures[-1].resumed_at = min(r["first_step_at"] or time.time() for r in reports)
        losses = ray.get(gang.keeper.losses.remote())
        ray.get(gang.keeper.flush.remote())
    finally:
        gang.close()
    for step, value in sorted(losses.items()):
        ctx.log_metric("loss", value, step)
    result = TrainResult(
        state=reports[0]["state"],
        steps=reports[0]["steps"],
        start_step=start["step"],
        start_source=start["source"],
        failures=failures,
        step_times_s=reports[0]["step_times_s"],
        snapshot_blocked_s=max(r["snapshot_blocked_s"] for r in reports),
        snapshot_background_cpu_s=max(r["snapshot_background_cpu_s"] for r in reports),
        losses=losses,
    )
    ctx.log_metrics({"ddp_restarts": len(failures), "ddp_replayed_steps": result.replayed_steps})
    ctx.set_tag("tierflow.ddp.workers", cfg.workers)
    ctx.set_tag("tierflow.ddp.snapshot_every", cfg.snapshot_every)
    if failures:  # how each recovery went, readable in the MLflow UI
        ctx.set_tag("tierflow.ddp.recoveries", "; ".join(f.describe() for f in failures)[:4000])
    if start["step"]:
        ctx.set_tag("tierflow.ddp.resumed_from", f"{start['source']} step {start['step']}")
    return result


__all__ = [
    "DDPConfig",
    "DDPConfigError",
    "DDPWorker",
    "Failure",
    "GangError",
    "GangFailedError",
    "TrainResult",
    "TrainSpec",
    "WorkerInterrupted",
    "train_data_parallel",
]
