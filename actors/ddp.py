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
import datetime
import logging
import math
import os
import random
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from actors.context import StageContext
from actors.errors import ActorsError
from actors.snapshot import (
    NAMESPACE,
    KeeperConfig,
    SnapshotKeeper,
    SnapshotPusher,
    assign_shards,
    keeper_name,
    load_state,
    rng_state,
    set_rng_state,
    state_arrays,
)

log = logging.getLogger(__name__)

_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


class GangError(ActorsError):
    """Base of data-parallel training errors."""


class DDPConfigError(GangError, ValueError):
    """A `DDPConfig` or `TrainSpec` value is out of range."""


class GangFailedError(GangError):
    """Training could not finish: user code raised, the gang could not be placed, or restarts ran out."""


class WorkerInterrupted(GangError):
    """A worker's loop stopped (a peer died, the keeper died, or user code raised) after `completed` steps."""

    def __init__(self, rank: int, completed: int, cause: str, tb: str = "") -> None:
        self.rank, self.completed, self.cause, self.tb = rank, completed, cause, tb
        super().__init__(rank, completed, cause, tb)

    def __str__(self) -> str:
        return f"rank {self.rank} stopped after {self.completed} steps: {self.cause}"


@dataclass(frozen=True)
class TrainSpec:
    """What the workers run. Functions are shipped to the workers, so define them at module level.

    `prepare` turns a worker's shard of the input table into tensors with rows first; `loss` gets the
    DDP-wrapped model and one minibatch (the same tensors indexed by rows) and returns a scalar loss.
    """

    build_model: Callable[[], Any]
    build_optimizer: Callable[[Any], Any]  # receives model.parameters()
    prepare: Callable[[Any], Sequence[Any]]
    loss: Callable[[Any, Sequence[Any]], Any]
    epochs: int = 1
    batch_size: int = 64  # per worker
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise DDPConfigError(f"epochs={self.epochs} and batch_size={self.batch_size} must both be >= 1")


@dataclass(frozen=True)
class DDPConfig:
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    strategy: str = "SPREAD"  # placement group strategy; SPREAD keeps one node's loss to few ranks
    snapshot_every: int = 1  # 1 = just-in-time (every step); K = every K steps; 0 = no in-memory snapshots
    rescue: bool = True  # on a peer's death, survivors hand the keeper their (replicated) state
    durable_every: int = 0  # steps between durable checkpoints in the store; 0 = only on SIGTERM
    max_restarts: int = 3
    placement_timeout_s: float = 60.0
    collective_timeout_s: float = 60.0
    drain_s: float = 3.0  # after a death, how long survivors get to report how far they got

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise DDPConfigError(f"workers={self.workers} must be >= 1")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise DDPConfigError("cpus_per_worker must be > 0 and gpus_per_worker >= 0")
        if self.strategy not in _STRATEGIES:
            raise DDPConfigError(f"strategy={self.strategy!r}; use one of {_STRATEGIES}")
        if min(self.snapshot_every, self.durable_every, self.max_restarts) < 0:
            raise DDPConfigError("snapshot_every, durable_every and max_restarts must be >= 0")


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
    losses: dict[int, float] = field(default_factory=dict)

    @property
    def replayed_steps(self) -> int:
        return max((f.replayed for f in self.failures), default=0)


# -- the worker -----------------------------------------------------------------------------------
def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class DDPWorker:
    """One rank. Wrapped with `ray.remote`; runs its methods on the main thread, so SIGTERM reaches it."""

    def __init__(self, rank: int, world: int, spec: TrainSpec, config: DDPConfig) -> None:
        import torch  # noqa: PLC0415

        self.rank, self.world, self.spec, self.cfg = rank, world, spec, config
        self.step = 0
        self.keeper: Any = None
        self.pusher: SnapshotPusher | None = None
        self.tensors: list[Any] | None = None
        self._preempted = False
        self._store: Any = None
        torch.set_num_threads(max(1, int(config.cpus_per_worker)))
        try:
            signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread: preemption then ends the process without a checkpoint
            log.warning("rank %d cannot handle SIGTERM (not on the main thread)", rank)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._preempted = True  # acted on after the current step, when the state is consistent

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0 hosts the TCP store the gang meets at; port 0 lets the OS pick a free one."""
        import torch.distributed as dist  # noqa: PLC0415

        host = ray.util.get_node_ip_address()
        timeout = datetime.timedelta(seconds=self.cfg.collective_timeout_s)
        self._store = dist.TCPStore(host, 0, self.world, True, timeout=timeout, wait_for_workers=False)
        return host, self._store.port

    def setup(self, host: str, port: int, table: Any, keeper: Any) -> dict[str, Any]:
        """Join the gang (again, for a survivor of a broken one) and load the newest snapshot, if any."""
        import torch  # noqa: PLC0415
        import torch.distributed as dist  # noqa: PLC0415
        from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

        if self.pusher is not None:
            self.pusher.close()
        if dist.is_initialized():  # a survivor: its process group lost a peer
            dist.destroy_process_group()
        cuda = self.cfg.gpus_per_worker > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda:0" if cuda else "cpu")  # Ray sets CUDA_VISIBLE_DEVICES per worker
        timeout = datetime.timedelta(seconds=self.cfg.collective_timeout_s)
        store = self._store if self.rank == 0 else dist.TCPStore(host, port, self.world, False, timeout=timeout)
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=self.rank, world_size=self.world)
        if self.tensors is None:
            # Contiguous, non-overlapping shards (zero-copy slices); every rank keeps as many rows as the smallest.
            per_rank = table.num_rows // self.world
            shard = self.spec.prepare(table.slice(self.rank * per_rank, per_rank))
            self.tensors = [t.to(self.device) for t in shard]
        rows = torch.tensor([len(self.tensors[0])])
        dist.all_reduce(rows, op=dist.ReduceOp.MIN)
        if int(rows) == 0:
            raise GangFailedError(f"{table.num_rows} input rows leave no training rows for {self.world} workers")
        self.tensors = [t[: int(rows)] for t in self.tensors]
        self.keeper = keeper
        torch.manual_seed(self.spec.seed)  # identical initial weights on every rank
        self.model = self.spec.build_model().to(self.device)
        self.optimizer = self.spec.build_optimizer(self.model.parameters())
        restored = ray.get(self.keeper.restore.remote(self.rank))
        if restored:
            load_state(self.model, self.optimizer, restored["shared"], restored["shared_meta"])
            set_rng_state(restored["arrays"], restored["meta"])
            self.step, source = restored["step"], restored["source"]
        else:
            self.step, source = 0, "none"
        self.ddp = DistributedDataParallel(self.model, device_ids=[0] if cuda else None)
        self.ddp.register_comm_hook(self, _snapshot_gate)
        self.pusher = SnapshotPusher(self.keeper, self.rank)
        rc = ray.get_runtime_context()
        info = {"pid": os.getpid(), "node_id": rc.get_node_id(), "name": rc.get_actor_name(), "step": self.step}
        ray.get(self.keeper.register.remote(self.rank, info))
        return {"step": self.step, "source": source, "rows": int(rows)}

    def _order(self, epoch: int) -> Any:
        import torch  # noqa: PLC0415

        if getattr(self, "_epoch", None) != epoch:  # data position = step; the order is a function of it
            gen = torch.Generator().manual_seed(_seed(self.spec.seed, epoch, self.rank, 4))
            self._epoch, self._perm = epoch, torch.randperm(len(self.tensors[0]), generator=gen).to(self.device)
        return self._perm

    def train(self) -> dict[str, Any]:
        self._consistent, self._losses, self._push_s = True, [], 0.0
        try:
            return self._train()
        except Exception as exc:
            if self._consistent and self.cfg.rescue:
                self._rescue()
            raise WorkerInterrupted(
                self.rank, self.step, f"{type(exc).__name__}: {exc}", traceback.format_exc()
            ) from None

    def _train(self) -> dict[str, Any]:
        bs = self.spec.batch_size
        per_epoch = math.ceil(len(self.tensors[0]) / bs)
        total = self.spec.epochs * per_epoch
        every = self.cfg.snapshot_every
        times: list[float] = []
        first_step_at = None
        while self.step < total:
            t0 = time.perf_counter()
            self._reseed()
            epoch, i = divmod(self.step, per_epoch)
            rows = self._order(epoch)[i * bs : (i + 1) * bs]
            loss = self.spec.loss(self.ddp, [t[rows] for t in self.tensors])
            loss.backward()  # waits for the previous snapshot in _snapshot_gate; a dead peer surfaces here
            self.pusher.wait()  # (a no-op unless DDP had nothing to all-reduce)
            self._consistent = False
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._losses.append((self.step, float(loss.detach())))
            self.step += 1
            self._consistent = True
            if self.step == total or (every and self.step % every == 0):
                self._push(self._losses)
                self._losses = []
            times.append(time.perf_counter() - t0)
            first_step_at = first_step_at or time.time()
            if self._preempted:
                self._preempt()
        self.pusher.wait()
        state = {k: v.detach().cpu().numpy() for k, v in self.model.state_dict().items()} if self.rank == 0 else {}
        return {
            "rank": self.rank,
            "steps": self.step,
            "state": state,
            "step_times_s": times,
            "snapshot_blocked_s": self.pusher.wait_s + self._push_s,
            "first_step_at": first_step_at,
        }

    def _push(self, losses: list[tuple[int, float]]) -> None:
        t0 = time.perf_counter()
        tensors, shared_meta = state_arrays(self.model, self.optimizer)
        owner = assign_shards({k: v.numel() * v.element_size() for k, v in tensors.items()}, self.world)
        mine = {k: v for k, v in tensors.items() if owner[k] == self.rank}
        rng_arrays, rng_meta = rng_state()
        meta = {
            "shared": shared_meta if self.rank == 0 else None,
            "rank": rng_meta | {"data": {"step": self.step, "rows": len(self.tensors[0])}},
            "losses": losses,
        }
        self.pusher.push(self.step, mine | rng_arrays, meta)
        self._push_s += time.perf_counter() - t0

    def _reseed(self) -> None:
        """Each rank's RNG streams are a function of (seed, rank, step): a lost rank's can be rebuilt."""
        import torch  # noqa: PLC0415

        base = _seed(self.spec.seed, self.rank, self.step, 5)
        torch.manual_seed(base)
        np.random.seed(base)
        random.seed(base)

    def _rescue(self) -> None:
        """Just-in-time in the paper's sense: a peer died during this step's all-reduce, so this rank's
        replica is the state after `self.step` steps. Hand all of it to the keeper (best effort)."""
        try:
            tensors, shared_meta = state_arrays(self.model, self.optimizer)
            rng_arrays, rng_meta = rng_state()
            meta = {"shared": shared_meta, "rank": rng_meta, "losses": self._losses}
            views = {k: v.cpu().numpy() for k, v in tensors.items()} | rng_arrays
            ray.get(self.keeper.rescue.remote(self.step, self.rank, views, meta), timeout=self.cfg.drain_s)
        except Exception:  # the keeper may be what failed; the periodic snapshots still stand
            log.warning("rank %d could not hand its state to the keeper", self.rank, exc_info=True)

    def _preempt(self) -> None:
        """SIGTERM: make the state after this step durable, then leave; the gang restarts without us.

        Between steps our replica is consistent, so we hand it over (as a survivor would) in every
        snapshot mode; the keeper keeps it unless it already holds this step."""
        self.pusher.wait()
        self._rescue()
        name = ray.get(self.keeper.persist.remote(min_step=self.step, timeout_s=self.cfg.collective_timeout_s))
        log.warning("rank %d preempted at step %d; durable checkpoint %s", self.rank, self.step, name or "none")
        ray.actor.exit_actor()


def _snapshot_gate(worker, bucket):  # type: ignore[no-untyped-def]  # DDP rejects annotations but torch's own
    """DDP comm hook: the keeper must hold our previous snapshot before we join this step's all-reduce.

    Then no rank can finish a step whose predecessor is not snapshotted, so a failure replays at most
    one step. Waiting here, at the first gradient bucket, rather than before `backward()` lets the
    snapshot overlap the forward pass and most of the backward pass.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks  # noqa: PLC0415

    worker.pusher.wait()
    return default_hooks.allreduce_hook(None, bucket)  # type: ignore[arg-type]  # None = the default group


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
        self.pg: Any = None

    def ensure_keeper(self) -> None:
        """The keeper lives next to this coordinator: losing that node ends the stage anyway."""
        if self.keeper is not None:
            if self.keeper_alive():
                return
            log.warning("snapshot keeper is gone; a new one starts from the latest durable checkpoint")
            ray.kill(self.keeper, no_restart=True)
        config = KeeperConfig(
            self.ctx.run_id, self.ctx.stage, self.cfg.workers, self.ctx.store_config, self.cfg.durable_every
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
            return ray.get([w.setup.remote(host, port, table_ref, self.keeper) for w in self.workers], timeout=limit)
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

    def close(self) -> None:
        for w in self.workers:
            if w is not None:
                ray.kill(w, no_restart=True)
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
                status = ray.get(gang.keeper.status.remote()) if gang.keeper_alive() else {"step": -1}
                failures.append(Failure(attempt, exc.cause, time.time(), max(exc.completed, status["step"])))
                log.warning("gang attempt %d broke (%s); restarting", attempt, exc.cause)
                if attempt >= cfg.max_restarts:
                    raise GangFailedError(
                        f"data-parallel training failed {attempt + 1} times (max_restarts={cfg.max_restarts}); "
                        f"last: {exc.cause}"
                    ) from None
                gang.ensure_keeper()
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
