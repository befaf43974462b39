"""One data-parallel rank (`DDPWorker`), its configuration and its errors; actors.ddp runs the gang.

A rank trains torch DDP (gloo on CPU, NCCL on GPU) on its shard of the input. After every optimizer
step it snapshots its share of the state (actors.slab, actors.snapshot): all of it, or, for a large
share, the step's all-reduced gradients with the full share every `full_every` steps; the comm hook
`_snapshot_gate` keeps it from joining the next all-reduce before that snapshot is whole, which is
what bounds the replay after a failure to one step.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import random
import shutil
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from actors.errors import ActorsError
from actors.slab import INLINE_BYTES, RawJSON, SlabWriter, slab_dir, slab_paths
from actors.snapshot import (
    SnapshotPusher,
    StateView,
    apply_log,
    assign_shards,
    load_state,
    rng_state,
    set_rng_state,
    state_arrays,
)

log = logging.getLogger(__name__)

_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
_SNAPSHOT_TO = ("shm", "keeper")
LOSS_BATCH = 256  # slab mode: losses go to the keeper in batches of this many steps
STATE_PER_PARAM_BYTE = 4  # bytes of training state per parameter byte a slab makes room for (Adam: 3, + slack)


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
    snapshot_to: str = "shm"  # per-step snapshots: "shm" = the rank's slab (a memcpy); "keeper" = a Ray call
    # shm: the full share is copied every `full_every` steps and the share of the all-reduced gradients
    # every step (a third of Adam's state); recovery redoes the logged optimizer steps. 1 = full every step.
    full_every: int = 16
    # ...for state shares over this many bytes; smaller ones cost a copy's fixed overhead whatever their
    # size, so a log would save nothing and add a redo: they are copied whole every step.
    log_min_bytes: int = INLINE_BYTES
    rescue: bool = True  # on a peer's death, survivors hand the keeper their (replicated) state
    durable_every: int = 0  # steps between durable checkpoints in the store; 0 = only on SIGTERM
    # keep the newest N durable checkpoints (older ones lose their manifests; `store gc` frees them); 0 = all
    keep_durable: int = 0
    max_restarts: int = 3
    placement_timeout_s: float = 60.0
    collective_timeout_s: float = 60.0
    drain_s: float = 3.0  # after a death, how long survivors get to report how far they got

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise DDPConfigError(f"workers={self.workers} must be >= 1")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise DDPConfigError("cpus_per_worker must be > 0 and gpus_per_worker >= 0")
        if self.snapshot_to not in _SNAPSHOT_TO:
            raise DDPConfigError(f"snapshot_to={self.snapshot_to!r}; use one of {_SNAPSHOT_TO}")
        if self.strategy not in _STRATEGIES:
            raise DDPConfigError(f"strategy={self.strategy!r}; use one of {_STRATEGIES}")
        if self.full_every < 1 or self.log_min_bytes < 0:
            raise DDPConfigError(f"full_every={self.full_every} must be >= 1, log_min_bytes >= 0")
        if min(self.snapshot_every, self.durable_every, self.keep_durable, self.max_restarts) < 0:
            raise DDPConfigError("snapshot_every, durable_every, keep_durable and max_restarts must be >= 0")


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
        self.slab: SlabWriter | None = None  # state slots
        self.gradlog: SlabWriter | None = None  # gradient-log slots
        self._loss_ref: Any = None  # slab mode: the batch of losses on its way to the keeper
        self._loss_n = 0
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

    def setup(self, host: str, port: int, table: Any, keeper: Any, key: tuple[str, str]) -> dict[str, Any]:
        """Join the gang (again, for a survivor of a broken one) and load the newest snapshot, if any.

        `key` (run id, stage) names this rank's slab; the keeper has collected the old one by now."""
        import torch  # noqa: PLC0415
        import torch.distributed as dist  # noqa: PLC0415
        from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

        if self.pusher is not None:
            self.pusher.close()
        self._close_slab()
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
        self._view = StateView()
        restored = ray.get(self.keeper.restore.remote(self.rank))
        if restored:
            load_state(self.model, self.optimizer, restored["shared"], restored["shared_meta"])
            apply_log(self.model, self.optimizer, restored["log"])
            set_rng_state(restored["arrays"], restored["meta"])
            self.step, source = restored["step"], restored["source"]
            if restored["log"]:
                source += f" + {len(restored['log'])} logged steps"
        else:
            self.step, source = 0, "none"
        self.ddp = DistributedDataParallel(self.model, device_ids=[0] if cuda else None)
        self.ddp.register_comm_hook(self, _snapshot_gate)
        self.pusher = SnapshotPusher(self.keeper, self.rank)
        rc = ray.get_runtime_context()
        slab = self._open_slab(key, rc.get_node_id())
        info = {"pid": os.getpid(), "node_id": rc.get_node_id(), "name": rc.get_actor_name(), "step": self.step}
        ray.get(self.keeper.register.remote(self.rank, info))
        return {"step": self.step, "source": source, "rows": int(rows), "slab": slab}

    def _open_slab(self, key: tuple[str, str], node_id: str) -> dict[str, Any] | None:
        """Per-step snapshots to this rank's slab, if the gang agreed to use slabs: {"node_id", "paths"}."""
        full_every = self._slab_full_every()
        if not full_every:
            return None
        log_slots = full_every + 1 if full_every > 1 else 0  # the entries since the older full copy
        paths = slab_paths(*key, self.rank, log_slots=log_slots)
        self.slab, self._full_every = SlabWriter(paths[:2]), full_every
        self.gradlog = SlabWriter(paths[2:]) if log_slots else None
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        named = {n: p.numel() * p.element_size() for n, p in params.items()}
        owner = assign_shards(named, self.world)
        self._my_grads = [(f"grad/{n}", params[n]) for n in named if owner[n] == self.rank]
        # Buffers (BatchNorm's running statistics) change in forward, not in the optimizer: the log
        # carries them too, and a redo ends with the last entry's.
        buffers = {n: b.numel() * b.element_size() for n, b in self.model.named_buffers()}
        owner = assign_shards(buffers, self.world)
        self._my_buffers = [n for n in buffers if owner[n] == self.rank]
        # Map the slots now, at setup, not on the first steps' copies (as sized for the room check).
        self.slab.reserve(STATE_PER_PARAM_BYTE * sum(named.values()) // self.world, 4 * len(named))
        if self.gradlog is not None:
            mine = sum(p.numel() * p.element_size() for _, p in self._my_grads) + sum(buffers.values())
            self.gradlog.reserve(mine, len(self._my_grads) + len(self._my_buffers))
        # Copying gradients while the optimizer steps is safe only if it never writes them in place:
        # torch.optim's own optimizers do not; for any other the copy is awaited first.
        self._grads_read_only = type(self.optimizer).__module__.startswith("torch.optim")
        return {"node_id": node_id, "paths": paths}

    def _slab_full_every(self) -> int:
        """How often the full share goes to the slab (the gradient log covers the steps between), or 0:
        every rank snapshots to the keeper. Slabs need room on every rank's node for two state shares
        (`STATE_PER_PARAM_BYTE`) and the log; a log shortened to fit is preferred to none. All ranks
        agree on the answer through an all-reduce."""
        import torch  # noqa: PLC0415
        import torch.distributed as dist  # noqa: PLC0415

        if self.cfg.snapshot_every != 1 or self.cfg.snapshot_to != "shm":
            return 0
        share = sum(p.numel() * p.element_size() for p in self.model.parameters()) // self.world
        state = STATE_PER_PARAM_BYTE * share
        free = shutil.disk_usage(slab_dir()).free
        wanted = every = self.cfg.full_every if state > self.cfg.log_min_bytes else 1
        while every > 1 and 2 * state + (every + 1) * share + (1 << 20) > free:  # + the log's slots
            every //= 2
        if every == 1 and 2 * state + (1 << 20) > free:
            every = 0
        agreed = torch.tensor([every])
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)  # one answer for the whole gang
        if int(agreed) < wanted:
            log.warning(
                "rank %d: not every node has room in %s for a %d-step gradient log; %s",
                self.rank,
                slab_dir(),
                wanted,
                f"full copies every {int(agreed)} steps" if int(agreed) else "snapshots go to the keeper",
            )
        return int(agreed)

    def _order(self, epoch: int) -> Any:
        import torch  # noqa: PLC0415

        if getattr(self, "_epoch", None) != epoch:  # data position = step; the order is a function of it
            gen = torch.Generator().manual_seed(_seed(self.spec.seed, epoch, self.rank, 4))
            self._epoch, self._perm = epoch, torch.randperm(len(self.tensors[0]), generator=gen).to(self.device)
        return self._perm

    def train(self) -> dict[str, Any]:
        self._consistent, self._losses, self._loss_json, self._push_s = True, [], [], 0.0
        self._loss_ref, self._loss_n = None, 0
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
        # Steps pushed to the keeper: every K (K > 1, or per step without a slab), durable ones, the last.
        every = 0 if self.slab is not None else self.cfg.snapshot_every
        durable = self.cfg.durable_every
        times: list[float] = []
        first_step_at = None
        if self.slab is not None:  # the gradient log starts from a full copy
            self._to_slab()
        while self.step < total:
            t0 = time.perf_counter()
            self._reseed()
            epoch, i = divmod(self.step, per_epoch)
            rows = self._order(epoch)[i * bs : (i + 1) * bs]
            loss = self.spec.loss(self.ddp, [t[rows] for t in self.tensors])
            loss.backward()  # waits for the previous snapshot in _snapshot_gate; a dead peer surfaces here
            self._wait_snapshots()  # (a no-op unless DDP had nothing to all-reduce)
            value = float(loss.detach())
            self._losses.append((self.step, value))
            self._loss_json.append(f"[{self.step},{json.dumps(value)}]")  # slab meta without re-encoding
            if self.gradlog is not None:
                self._log_grads()
            self._consistent = False
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self._consistent = True
            if self.step == total or (every and self.step % every == 0) or (durable and self.step % durable == 0):
                self._push()
            if self.slab is not None and self.step % self._full_every == 0 and self.step < total:
                self._to_slab()  # also after a push: the log's next entries need this full copy
            times.append(time.perf_counter() - t0)
            first_step_at = first_step_at or time.time()
            if self._preempted:
                self._preempt()
        self.pusher.wait()
        writers = [w for w in (self.slab, self.gradlog) if w is not None]
        blocked = self.pusher.sends.wait_s + self._push_s + sum(w.copies.wait_s for w in writers)
        background = self.pusher.sends.cpu_s + sum(w.copies.cpu_s for w in writers)
        self._close_slab(unlink=True)  # the keeper holds the final step
        state = {k: v.detach().cpu().numpy() for k, v in self.model.state_dict().items()} if self.rank == 0 else {}
        return {
            "rank": self.rank,
            "steps": self.step,
            "state": state,
            "step_times_s": times,
            "snapshot_blocked_s": blocked,
            "snapshot_background_cpu_s": background,
            "first_step_at": first_step_at,
        }

    def _share(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """This rank's part of the state (live tensors, no copy) and the JSON meta that goes with it."""
        tensors, shared_meta = self._view.get(self.model, self.optimizer)
        if getattr(self, "_mine", (None,))[0] is not tensors:  # the same views until a tensor changes
            owner = assign_shards({k: v.nbytes for k, v in tensors.items()}, self.world)
            self._mine = (tensors, {k: v for k, v in tensors.items() if owner[k] == self.rank})
        mine = self._mine[1]
        meta = {
            "shared": shared_meta if self.rank == 0 else None,
            "rank": {"data": {"step": self.step, "rows": len(self.tensors[0])}},
            "losses": self._losses,
        }
        return mine, meta

    def _push(self) -> None:
        """A snapshot to the keeper; it takes the losses not yet sent."""
        t0 = time.perf_counter()
        mine, meta = self._share()
        rng_arrays, rng_meta = rng_state()
        meta["rank"] |= rng_meta
        self.pusher.push(self.step, mine | rng_arrays, meta)
        self._losses, self._loss_json, self._loss_ref, self._loss_n = [], [], None, 0
        self._push_s += time.perf_counter() - t0

    def _slab_losses(self) -> RawJSON:
        """The losses the keeper has not acknowledged, as JSON for the slab; they go in batches."""
        if self._loss_ref is not None and self.step % 16 == 0 and ray.wait([self._loss_ref], timeout=0)[0]:
            del self._losses[: self._loss_n], self._loss_json[: self._loss_n]
            self._loss_ref, self._loss_n = None, 0
        if self._loss_ref is None and len(self._losses) >= LOSS_BATCH:
            self._loss_ref = self.keeper.add_losses.remote(self.rank, list(self._losses))
            self._loss_n = len(self._losses)
        return RawJSON(f"[{','.join(self._loss_json)}]")

    def _to_slab(self) -> None:
        """This rank's share of the state to its slab. RNG states need no copy: they are reseeded from
        the step. Without a gradient log the slab also holds the unacknowledged losses."""
        t0 = time.perf_counter()
        mine, meta = self._share()
        meta["kind"] = "state"
        meta["losses"] = self._slab_losses() if self.gradlog is None else []
        self.slab.push(self.step, mine, meta)
        self._push_s += time.perf_counter() - t0

    def _log_grads(self) -> None:
        """This rank's share of this step's all-reduced gradients to the log, stamped with the step they
        complete: with the last full copy they rebuild the state after it. A third of Adam's state."""
        t0 = time.perf_counter()
        grads = {k: p.grad.detach() for k, p in self._my_grads if p.grad is not None}
        if self._my_buffers:  # cloned: the next forward updates them in place while the copy may still run
            live = dict(self.model.named_buffers())
            grads |= {f"buffer/{n}": live[n].detach().clone() for n in self._my_buffers}
        self.gradlog.push(self.step + 1, grads, {"kind": "grads", "losses": self._slab_losses()})
        if not self._grads_read_only:
            self.gradlog.wait()
        self._push_s += time.perf_counter() - t0

    def _wait_snapshots(self) -> None:
        self.pusher.wait()
        for writer in (self.slab, self.gradlog):
            if writer is not None:
                writer.wait()

    def _close_slab(self, unlink: bool = False) -> None:
        for writer in (self.slab, self.gradlog):
            if writer is not None:
                writer.close(unlink=unlink)
        self.slab = self.gradlog = None

    def _reseed(self) -> None:
        """Each rank's RNG streams are a function of (seed, rank, step): a lost rank's can be rebuilt."""
        import torch  # noqa: PLC0415

        base = _seed(self.spec.seed, self.rank, self.step, 5)
        # torch.manual_seed would also queue a lazy CUDA seeding, formatting a stack trace every
        # step (a fifth of a 3 ms digits step); seed CUDA only where it is in use.
        torch.default_generator.manual_seed(base)
        if torch.cuda.is_initialized():
            torch.cuda.manual_seed_all(base)
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
        self._wait_snapshots()
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

    worker._wait_snapshots()
    return default_hooks.allreduce_hook(None, bucket)  # type: ignore[arg-type]  # None = the default group
