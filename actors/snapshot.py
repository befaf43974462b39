"""Just-in-time snapshots of data-parallel training state, kept outside the workers' processes.

The model and optimizer tensors are identical on every rank under DDP, so rank r snapshots only the
tensors assigned to it (a size-balanced split), plus its data position and losses. After every
optimizer step the share goes to the rank's shared-memory slab (actors.slab: a memcpy; for a large
share, the full share every K steps and the step's gradients in between, which `apply_log` redoes);
every K steps, at durable-checkpoint steps and at the end it is pushed to a `SnapshotKeeper` actor.
A step is *complete* once every rank's share is there; the keeper holds the latest complete step
while the next one arrives (two generations: the double buffer), and after a failure it `collect`s
the slabs and keeps whichever is newest: its own, the slabs', or a survivor's whole replica.
Durable checkpoints (safetensors + JSON, never pickle) go to the store under the run id and stage,
periodically and on SIGTERM, so a resumed run finds them.

The keeper imports no torch: it only copies numpy arrays. Torch-side helpers import torch lazily.
"""

from __future__ import annotations

import json
import logging
import random
import re
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from actors.errors import ActorsError
from actors.slab import InFlight, read_slabs
from storage import ArtifactNotFoundError, ArtifactStore, StoreConfig, Tensors

log = logging.getLogger(__name__)

NAMESPACE = "tierflow-ddp"  # named gang actors live here so tools and tests can find them
CKPT_SEP = ".ckpt-"  # durable checkpoint "stage" name: <stage>.ckpt-<step, 10 digits>
_CKPT = re.compile(r"(?P<stage>.+)\.ckpt-(?P<step>\d{10})")
_META_KEY = "tierflow.checkpoint"


class CheckpointError(ActorsError):
    """A snapshot or checkpoint cannot be used (wrong world size, missing parts, bad metadata)."""


def keeper_name(run_id: str, stage: str) -> str:
    return f"snapshot.{run_id}.{stage}"


def checkpoint_name(stage: str, step: int) -> str:
    return f"{stage}{CKPT_SEP}{step:010d}"


# -- the state as numpy arrays + JSON -------------------------------------------------------------
@dataclass
class Snapshot:
    """One complete training state at `step` (optimizer steps done): shared tensors + per-rank parts."""

    step: int
    world_size: int
    shared: dict[str, np.ndarray]  # "model/<name>", "optim/<param idx>/<key>"
    shared_meta: dict[str, Any]  # optimizer param_groups and non-tensor state
    ranks: list[dict[str, Any]]  # per rank: {"arrays": {...}, "meta": {...}} (RNG states, data position)
    losses: dict[int, float] = field(default_factory=dict)  # step -> mean loss over ranks, for MLflow
    # Gradients ("grad/<param>") of the last len(log) steps: `shared` is the state after step - len(log)
    # steps, and re-applying these with the optimizer (`apply_log`) gives the state after `step`.
    log: list[dict[str, np.ndarray]] = field(default_factory=list)

    def to_tensors(self) -> Tensors:
        """safetensors arrays + one JSON metadata entry; no pickle anywhere."""
        arrays = {f"shared/{k}": v for k, v in self.shared.items()}
        for r, part in enumerate(self.ranks):
            arrays |= {f"rank{r}/{k}": v for k, v in part["arrays"].items()}
        for i, grads in enumerate(self.log):
            arrays |= {f"log{i}/{k}": v for k, v in grads.items()}
        meta = {
            "format": 2,
            "log_len": len(self.log),
            "step": self.step,
            "world_size": self.world_size,
            "shared_meta": self.shared_meta,
            "rank_meta": [part["meta"] for part in self.ranks],
            "losses": {str(k): v for k, v in sorted(self.losses.items())},
        }
        return Tensors(arrays, {_META_KEY: json.dumps(meta)})

    @classmethod
    def from_tensors(cls, bundle: Tensors) -> Snapshot:
        try:
            meta = json.loads(bundle.metadata[_META_KEY])
            world = int(meta["world_size"])
            shared = {k.removeprefix("shared/"): v for k, v in bundle.tensors.items() if k.startswith("shared/")}
            ranks = []
            for r in range(world):
                prefix = f"rank{r}/"
                arrays = {k.removeprefix(prefix): v for k, v in bundle.tensors.items() if k.startswith(prefix)}
                ranks.append({"arrays": arrays, "meta": meta["rank_meta"][r]})
            losses = {int(k): float(v) for k, v in meta["losses"].items()}
            grad_log = []
            for i in range(int(meta.get("log_len", 0))):  # format 1 had no log
                prefix = f"log{i}/"
                grad_log.append({k.removeprefix(prefix): v for k, v in bundle.tensors.items() if k.startswith(prefix)})
            return cls(int(meta["step"]), world, shared, meta["shared_meta"], ranks, losses, grad_log)
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            raise CheckpointError(f"not a tierflow training checkpoint: {exc}") from exc


def latest_durable(store: ArtifactStore, run_id: str, stage: str) -> tuple[int, Any] | None:
    """(step, manifest) of the newest durable checkpoint of `stage` in `run_id`, if any."""
    best = None
    for ref in store.manifests(run_id):
        m = _CKPT.fullmatch(ref.stage)
        if m and m["stage"] == stage and (best is None or int(m["step"]) > best[0]):
            best = (int(m["step"]), ref)
    return best


# -- torch <-> arrays (workers only) ---------------------------------------------------------------
def state_arrays(model: Any, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Live tensors of model + optimizer (no copy) and the JSON part of the optimizer state."""
    tensors: dict[str, Any] = {f"model/{k}": v.detach() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in opt["state"].items():
        for key, value in entry.items():
            if hasattr(value, "detach"):
                tensors[f"optim/{idx}/{key}"] = value.detach()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": opt["param_groups"], "scalars": scalars}


class StateView:
    """`state_arrays` as numpy views, for every step: built once, rebuilt only when a tensor was
    replaced or reallocated. Calling `state_dict()` each step cost more than copying a small model's
    state (tens of µs, several times that inside a Ray worker).

    Parameters are checked through the optimizer's own references and their data pointers; buffers
    by walking the modules only when the model has any, since a module may reassign one in forward.
    The optimizer's state is walked every step: its tensors appear lazily and scalars change."""

    def __init__(self) -> None:
        self._sig: Any = None
        self._views: dict[str, np.ndarray] = {}
        self._has_buffers: bool | None = None

    def get(self, model: Any, optimizer: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        if self._has_buffers is None:
            self._has_buffers = any(True for _ in model.buffers())
        groups, scalars, owned, start = [], {}, [], 0
        for group in optimizer.param_groups:  # packed as Optimizer.state_dict packs them
            n = len(group["params"])
            groups.append({k: v for k, v in group.items() if k != "params"} | {"params": list(range(start, start + n))})
            for idx, param in enumerate(group["params"], start):
                owned.append(param.data_ptr())
                for key, value in optimizer.state.get(param, {}).items():
                    if hasattr(value, "data_ptr"):
                        owned.append((key, id(value), value.data_ptr()))
                    else:
                        scalars.setdefault(str(idx), {})[key] = value
            start += n
        if self._has_buffers:
            owned += [(id(b), b.data_ptr()) for b in model.buffers()]
        if owned != self._sig:
            tensors, _ = state_arrays(model, optimizer)
            self._views = {k: v.cpu().numpy() for k, v in tensors.items()}
            self._sig = owned
        return self._views, {"param_groups": groups, "scalars": scalars}


def load_state(model: Any, optimizer: Any, shared: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    import torch  # noqa: PLC0415

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, copy=True))  # writable and owned: the source may be read-only

    model.load_state_dict({k.removeprefix("model/"): tensor(v) for k, v in shared.items() if k.startswith("model/")})
    state: dict[int, dict[str, Any]] = {}
    for k, v in shared.items():
        if k.startswith("optim/"):
            _, idx, key = k.split("/", 2)
            state.setdefault(int(idx), {})[key] = tensor(v)
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def apply_log(model: Any, optimizer: Any, grad_log: list[dict[str, np.ndarray]]) -> None:
    """Redo the optimizer steps of a gradient log: per entry, set every parameter's gradient (None
    where the entry has none) and step; then take the buffers ("buffer/<name>", which forward passes
    update) from the last entry. The optimizer is deterministic, so this reproduces the state bit for
    bit on the same kind of machine, without a forward or backward pass."""
    import torch  # noqa: PLC0415

    def tensor(a: np.ndarray, like: Any) -> Any:
        return torch.from_numpy(np.array(a, copy=True)).to(like.device)

    params = list(model.named_parameters())
    for grads in grad_log:
        for name, p in params:
            g = grads.get(f"grad/{name}")
            p.grad = None if g is None else tensor(g, p)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if grad_log:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if (value := grad_log[-1].get(f"buffer/{name}")) is not None:
                    b.copy_(tensor(value, b))


def rng_state() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """This process's torch / numpy / python RNG states as arrays + JSON."""
    import torch  # noqa: PLC0415

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    arrays = {
        "rng/torch": torch.get_rng_state().numpy(),
        "rng/numpy": np.asarray(keys),
        "rng/python": np.asarray(internal),
    }
    if torch.cuda.is_available():
        arrays["rng/cuda"] = torch.cuda.get_rng_state().numpy()
    meta = {"numpy": [name, int(pos), int(has_gauss), float(gauss)], "python": [version, gauss_next]}
    return arrays, meta


def set_rng_state(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    import torch  # noqa: PLC0415

    if not arrays:  # a rank whose state came from a survivor: its streams are reseeded per step
        return
    torch.set_rng_state(torch.from_numpy(np.array(arrays["rng/torch"], dtype=np.uint8)))
    if "rng/cuda" in arrays and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.from_numpy(np.array(arrays["rng/cuda"], dtype=np.uint8)))
    name, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, np.array(arrays["rng/numpy"], dtype=np.uint32), pos, has_gauss, gauss))
    version, gauss_next = meta["python"]
    random.setstate((version, tuple(int(x) for x in arrays["rng/python"]), gauss_next))


def assign_shards(sizes: dict[str, int], world_size: int) -> dict[str, int]:
    """Key -> rank, balancing bytes; deterministic, so every rank computes the same split."""
    load = [0] * world_size
    owner = {}
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[key] = rank
        load[rank] += sizes[key]
    return owner


class SnapshotPusher:
    """Snapshots to the keeper by a Ray call: one push in flight, awaited before the next optimizer step."""

    def __init__(self, keeper: Any, rank: int) -> None:
        self.keeper = keeper
        self.rank = rank
        self.sends = InFlight("snapshot")  # its wait_s: time the training thread waited for acknowledgements

    def push(self, step: int, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
        self.sends.submit(self._send, step, arrays, meta)  # normally the last push was acknowledged already

    def _send(self, step: int, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
        # numpy views of the live tensors: Ray copies them into the object store here, in the background,
        # while the training thread computes the next forward pass (which does not modify them).
        views = {k: v.cpu().numpy() if hasattr(v, "numpy") else v for k, v in arrays.items()}
        ray.get(self.keeper.push.remote(step, self.rank, views, meta))

    def wait(self) -> None:
        """Block until the keeper holds the last push (raises if it failed)."""
        self.sends.wait()

    def close(self) -> None:
        self.sends.shutdown(finish=False)


# -- reading the slabs -----------------------------------------------------------------------------
def _by_kind(found: list[list[dict[str, Any]]]) -> tuple[list[dict[int, Any]], list[dict[int, Any]]]:
    """Per rank: its state slots by step, and its gradient-log slots by the step they complete."""
    states = [{s["step"]: s for s in slots if s["meta"].get("kind", "state") == "state"} for slots in found]
    logs = [{s["step"]: s for s in slots if s["meta"].get("kind") == "grads"} for slots in found]
    return states, logs


def _newest_chain(found: list[list[dict[str, Any]]]) -> tuple[int, int]:
    """(b, k) for the largest k such that every rank holds state b and log entries b+1..k; (-1, -1) if none."""
    states, logs = _by_kind(found)
    base, step = -1, -1
    for b in set.intersection(*(set(d) for d in states)) if states else ():
        k = b
        while all(k + 1 in d for d in logs):
            k += 1
        if k > step:
            base, step = b, k
    return base, step


def _only(info: dict[str, Any], slots: list[dict[str, Any]], base: int, step: int) -> dict[str, Any]:
    """`info` narrowed to the slots that rebuild `step` from `base`."""
    states, logs = _by_kind([slots])
    paths = [states[0][base]["path"]] + [logs[0][s]["path"] for s in range(base + 1, step + 1)]
    return {"node_id": info["node_id"], "paths": paths}


# -- the keeper actor -------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeeperConfig:
    run_id: str
    stage: str
    world_size: int
    store_config: StoreConfig | None = None
    durable_every: int = 0  # steps between durable checkpoints; 0 = only on SIGTERM
    keep_durable: int = 0  # how many of the newest durable checkpoints to keep; 0 = all
    handle_sigterm: bool = True  # off when a keeper is built outside an actor (tests)


class SnapshotKeeper:
    """Holds the latest complete snapshot in memory; writes durable checkpoints. Wrapped with `ray.remote`."""

    def __init__(self, config: KeeperConfig) -> None:
        self.cfg = config
        self._lock = threading.Condition()
        # Two generations at most: the latest complete step, and the next one while its shares arrive.
        self._pending: dict[int, dict[int, dict[str, Any]]] = {}  # step -> rank -> its share
        self._latest: Snapshot | None = None
        self._losses: dict[int, dict[int, float]] = {}
        self._workers: dict[int, dict[str, Any]] = {}
        self._durable: list[int] = []
        self._slabs: list[dict[str, Any] | None] = []  # per rank: {"node_id", "paths"} of its slab
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="durable")
        self.source = "none"
        self._store = ArtifactStore(config.store_config) if config.store_config else None
        self._load_durable()
        if config.handle_sigterm and threading.current_thread() is threading.main_thread():  # node preempted
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _load_durable(self) -> None:
        if self._store is None:
            return
        found = latest_durable(self._store, self.cfg.run_id, self.cfg.stage)
        if found is None:
            return
        snap = Snapshot.from_tensors(self._store.get(found[1]))
        if snap.world_size != self.cfg.world_size:
            raise CheckpointError(
                f"checkpoint {found[1].stage} of run {self.cfg.run_id} was written by {snap.world_size} workers, "
                f"this gang has {self.cfg.world_size}; resume with workers={snap.world_size}"
            )
        self._latest, self.source = snap, "durable"
        self._losses = {s: {-1: v} for s, v in snap.losses.items()}
        self._durable.append(snap.step)
        log.info("loaded durable checkpoint %s (step %d)", found[1].stage, snap.step)

    # -- from workers ----------------------------------------------------------------------------
    def register(self, rank: int, info: dict[str, Any]) -> None:
        with self._lock:
            self._workers[rank] = info

    def push(self, step: int, rank: int, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> int:
        """Keep one rank's share of step `step`; return the latest complete step.

        No copy: large arguments arrive as read-only views of this node's object store, and the store
        keeps an object alive while a process has it mapped, even after its sender (its owner) died —
        checked on Ray 2.60 by killing the sender and pushing 2x the store's capacity through it.
        """
        shared = {k: v for k, v in arrays.items() if k.startswith(("model/", "optim/"))}
        own = {k: v for k, v in arrays.items() if k not in shared}
        with self._lock:
            self._add_losses(rank, meta.pop("losses", []))
            parts = self._pending.setdefault(step, {})
            parts[rank] = {"shared": shared, "arrays": own, "meta": meta}
            if len(parts) == self.cfg.world_size:
                self._complete(step, self._pending.pop(step))
            return self._latest.step if self._latest else -1

    def rescue(self, step: int, rank: int, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> bool:
        """A survivor's full replica after `step` steps; kept if newer than the latest snapshot."""
        with self._lock:
            self._add_losses(rank, meta.pop("losses", []))
            if self._latest is not None and self._latest.step >= step:
                return False
            shared = {k: np.array(v, copy=True) for k, v in arrays.items() if k.startswith(("model/", "optim/"))}
            own = {k: np.array(v, copy=True) for k, v in arrays.items() if k not in shared}
            # Other ranks' RNG streams are rebuilt from (seed, rank, step); their parts stay empty.
            ranks = [
                {"arrays": own, "meta": meta["rank"]} if r == rank else {"arrays": {}, "meta": {}}
                for r in range(self.cfg.world_size)
            ]
            self._latest, self.source = Snapshot(step, self.cfg.world_size, shared, meta["shared"], ranks), "survivor"
            self._pending.clear()
            self._lock.notify_all()
            return True

    def add_losses(self, rank: int, items: list[tuple[int, float]]) -> None:
        """(step, loss) pairs a rank sends in batches while it snapshots to its slab."""
        with self._lock:
            self._add_losses(rank, items)

    def _add_losses(self, rank: int, items: list[tuple[int, float]]) -> None:
        for s, loss in items:
            self._losses.setdefault(int(s), {})[rank] = float(loss)

    # -- shared-memory slabs ---------------------------------------------------------------------
    def track_slabs(self, slabs: list[dict[str, Any] | None]) -> None:
        """Where each rank of the current gang snapshots per step ({"node_id", "paths"} or None)."""
        self._slabs = list(slabs)

    def collect(self, slabs: list[dict[str, Any] | None] | None = None, local_only: bool = False) -> dict[str, int]:
        """Adopt the newest step the ranks' slabs can rebuild, if newer than what this keeper has.

        A slab has two state slots (the rank's share after step b, for the last two such b) and, with a
        gradient log, slots stamped s holding its share of the gradients of step s-1. Step k can be
        rebuilt when every rank holds state b and log entries b+1..k. No rank passes step k+1's
        all-reduce before every rank's writes for step k are in, so some step is whole while the slabs
        survive. Returns {"step": the latest complete step held, "seen": the most steps any slab shows}."""
        if slabs is not None:
            self._slabs = list(slabs)
        latest = self._latest.step if self._latest else -1
        if not self._slabs or any(info is None for info in self._slabs):
            return {"step": latest, "seen": latest}
        # Headers first (steps, kinds, losses), then the arrays of only the slots the newest step needs.
        heads = read_slabs(self._slabs, local_only=local_only, with_arrays=False)
        seen = max((slot["step"] for slots in heads for slot in slots), default=-1)
        with self._lock:
            for r, slots in enumerate(heads):
                for slot in slots:
                    self._add_losses(r, slot["meta"].get("losses", []))
            latest = self._latest.step if self._latest else -1
        base, step = _newest_chain(heads)
        if step > latest:
            narrowed = [_only(info, slots, base, step) for info, slots in zip(self._slabs, heads, strict=True)]
            found = read_slabs(narrowed, local_only=local_only)
            if _newest_chain(found) != (base, step):  # rewritten or lost in between: whatever is whole now
                found = read_slabs(self._slabs, local_only=local_only)
                base, step = _newest_chain(found)
            with self._lock:
                latest = self._latest.step if self._latest else -1
                if step > latest:
                    states, logs = _by_kind(found)
                    parts = {
                        r: {"shared": d[base]["arrays"], "arrays": {}, "meta": d[base]["meta"]}
                        for r, d in enumerate(states)
                    }
                    entries = range(base + 1, step + 1)
                    grad_log = [{k: v for d in logs for k, v in d[s]["arrays"].items()} for s in entries]
                    self._complete(step, parts, grad_log)
                    self.source = "shm"
                    latest = step
        return {"step": latest, "seen": max(seen, latest)}

    def _complete(self, step: int, parts: dict[int, dict[str, Any]], grad_log: list | None = None) -> None:
        self._latest = Snapshot(
            step,
            self.cfg.world_size,
            {k: v for r in range(self.cfg.world_size) for k, v in parts[r]["shared"].items()},
            parts[0]["meta"]["shared"],
            [{"arrays": parts[r]["arrays"], "meta": parts[r]["meta"]["rank"]} for r in range(self.cfg.world_size)],
            log=grad_log or [],
        )
        self.source = "memory"
        for old in [s for s in self._pending if s <= step]:
            del self._pending[old]
        self._lock.notify_all()
        every = self.cfg.durable_every
        if every and step % every == 0 and step not in self._durable:
            self._persist_async(self._frozen(self._latest))

    def _frozen(self, snap: Snapshot) -> Snapshot:
        """The snapshot with its loss history, for a durable write (its arrays are never modified)."""
        return Snapshot(
            snap.step,
            snap.world_size,
            dict(snap.shared),
            snap.shared_meta,
            snap.ranks,
            self._mean_losses(snap.step),
            snap.log,
        )

    def _mean_losses(self, upto: int) -> dict[int, float]:
        """Mean loss per step index below `upto` (a snapshot at step k holds the losses of steps 0..k-1)."""
        return {s: float(np.mean(list(v.values()))) for s, v in sorted(self._losses.items()) if s < upto}

    # -- durable checkpoints ---------------------------------------------------------------------
    def _persist_async(self, snap: Snapshot) -> None:
        self._durable.append(snap.step)
        self._writer.submit(self._write, snap)

    def _write(self, snap: Snapshot) -> str:
        if self._store is None:
            return ""
        name = checkpoint_name(self.cfg.stage, snap.step)
        try:
            self._store.manifest(self.cfg.run_id, name)
            return name  # written before (e.g. periodic and SIGTERM on the same step)
        except ArtifactNotFoundError:
            pass
        self._store.put(snap.to_tensors(), run_id=self.cfg.run_id, stage=name)
        log.info("durable checkpoint %s/%s", self.cfg.run_id, name)
        if self.cfg.keep_durable:
            self._prune()
        return name

    def _prune(self) -> None:
        """Forget all but the newest `keep_durable` checkpoints of this stage; only once a newer one is committed."""
        found = []
        for ref in self._store.manifests(self.cfg.run_id):
            m = _CKPT.fullmatch(ref.stage)
            if m and m["stage"] == self.cfg.stage:
                found.append((int(m["step"]), ref.stage))
        for _, stage in sorted(found)[: -self.cfg.keep_durable]:
            self._store.forget(self.cfg.run_id, stage)
            log.info("forgot superseded checkpoint %s/%s", self.cfg.run_id, stage)

    def persist(self, min_step: int = -1, timeout_s: float = 30.0) -> str:
        """Write the latest complete snapshot (waiting until it reaches `min_step`) durably; its name."""
        self.collect()  # the other ranks' losses not yet sent, from their slabs
        with self._lock:
            self._lock.wait_for(lambda: self._latest is not None and self._latest.step >= min_step, timeout_s)
            if self._latest is None:
                return ""
            snap = self._frozen(self._latest)
            self._durable.append(snap.step)
        return self._write(snap)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.collect(local_only=True)  # no remote calls while the node goes down
        if self._latest is not None:
            self._write(self._frozen(self._latest))
        raise SystemExit(1)

    # -- restoring and reporting -----------------------------------------------------------------
    def restore(self, rank: int) -> dict[str, Any] | None:
        """What rank `rank` needs to continue from the latest complete snapshot, or None (start fresh)."""
        with self._lock:
            snap = self._latest
            if snap is None:
                return None
            # Discard losses of steps past the snapshot: the replay logs them again.
            self._losses = {s: v for s, v in self._losses.items() if s < snap.step}
            part = snap.ranks[rank]
            return {
                "step": snap.step,
                "source": self.source,
                "shared": snap.shared,
                "shared_meta": snap.shared_meta,
                "log": snap.log,
                "arrays": part["arrays"],
                "meta": part["meta"],
            }

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "step": self._latest.step if self._latest else -1,
                "source": self.source,
                "node_id": ray.get_runtime_context().get_node_id(),
                "workers": dict(self._workers),
                "durable": list(self._durable),
            }

    def losses(self) -> dict[int, float]:
        with self._lock:
            return self._mean_losses(max(self._losses, default=-1) + 1)

    def flush(self) -> None:
        """Wait for background durable writes."""
        self._writer.submit(lambda: None).result()
