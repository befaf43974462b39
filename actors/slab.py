"""Per-step training snapshots in host shared memory: the cheap half of just-in-time checkpointing.

Each rank copies its share of the training state into one of two memory-mapped files under /dev/shm
(tmpfs: RAM that outlives the worker process), alternating slots so the previous copy stays whole
while the next one is written; for a large share, only every K steps, and its share of each step's
gradients into a ring of K + 1 more slots in between (the gradient log, actors.ddp_worker). That
costs one memcpy: no Ray call, no serialisation, no other process woken. A Ray call per step cost
more than a whole digits step (3 ms) on two cores; see BENCHMARKS.md. The slabs are read only when needed: after a
failure and on SIGTERM (`SnapshotKeeper.collect`). A node's slabs die with the node, which survivor
rescue (actors.snapshot) covers; a dead process's slabs stay readable.

Slot layout, no pickle: a 40-byte prefix (magic, step, header length, data start, data length), the
JSON header (array names, dtypes, shapes, offsets; the rank's meta), then the arrays at 64-byte-aligned
offsets. The header area is reserved in 4 KiB units so the arrays stay put from step to step, and the
writer reuses its views of them and the JSON of unchanged meta: a small share costs ~tens of µs.
A writer stamps the slot invalid (step -1) before writing and stamps the step last; a reader keeps a
slot only when the same valid step reads before and after its copy.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import re
import struct
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.errors import ActorsError

_MAGIC = b"TFSLAB01"
_PREFIX = struct.Struct("<8sqqqq")  # magic, step, header bytes, data start, data bytes
_STEP_AT = 8  # byte offset of the step stamp
_ALIGN = 64
_HEADER_UNIT = 4096
INLINE_BYTES = 1 << 20  # shares up to this size are copied on the training thread: a thread hop costs more
_HEADER_ROOM = 64 << 10  # what `reserve` sets aside for a slot's header (array specs, meta, ~256 losses)
# Map every page up front: faulting 4 KiB pages in during a slot's first copy made it ~5x slower.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class SlabError(ActorsError):
    """A shared-memory snapshot slot cannot be written (no room in /dev/shm) or read."""


class RawJSON(str):
    """Meta already encoded as JSON by its owner (e.g. a list grown one item per step)."""


def slab_dir() -> Path:
    """The tmpfs at /dev/shm where it exists (Linux); else the temp dir: disk, but it outlives the process."""
    configured = os.environ.get("TIERFLOW_SNAPSHOT_DIR")
    if configured:
        return Path(configured)
    shm = Path("/dev/shm")  # noqa: S108  # files are created O_EXCL|O_NOFOLLOW, mode 0600
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def slab_paths(run_id: str, stage: str, rank: int, directory: Path | None = None, log_slots: int = 0) -> list[str]:
    """The rank's two state slots, then its `log_slots` gradient-log slots."""
    base = directory or slab_dir()
    name = _UNSAFE.sub("_", f"tierflow-snap-{run_id}-{stage}-rank{rank}")
    return [str(base / f"{name}.{slot}") for slot in (0, 1)] + [str(base / f"{name}.g{i}") for i in range(log_slots)]


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; the copy reads it in place
        return value.detach().cpu().numpy()
    return np.asarray(value)


class InFlight:
    """At most one background job; `wait` blocks until it is done (re-raising its error) and adds the
    time the caller spent blocked to `wait_s`. `cpu_s` is the CPU time the jobs used: on busy cores a
    background copy still costs the training thread about that much."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._pool: ThreadPoolExecutor | None = None
        self._job: Future | None = None
        self.wait_s = 0.0
        self.cpu_s = 0.0

    def submit(self, fn: Any, *args: Any) -> None:
        self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=self._name)
        self._job = self._pool.submit(self._timed, fn, *args)

    def _timed(self, fn: Any, *args: Any) -> None:
        t0 = time.thread_time()
        try:
            fn(*args)
        finally:
            self.cpu_s += time.thread_time() - t0

    def wait(self) -> None:
        if self._job is not None:
            t0 = time.perf_counter()
            try:
                self._job.result()
            finally:
                self._job = None
                self.wait_s += time.perf_counter() - t0

    def shutdown(self, finish: bool) -> None:
        """`finish`: let the job end first (its error is dropped); else cancel what has not started."""
        if self._pool is not None:
            self._pool.shutdown(wait=finish, cancel_futures=not finish)
            self._pool = None
        self._job = None


class _Slot:
    """One memory-mapped slot file, grown when the state grows (Adam's moments appear after step 1)."""

    def __init__(self, path: str) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):  # a previous attempt's slot would look valid
            os.unlink(path)
        self.size = 0
        self.map: mmap.mmap | None = None
        self._created = False
        self.layout: tuple = ()  # what `views` were made for: (array specs, data start, mapping size)
        self.views: dict[str, np.ndarray] = {}

    def ensure(self, size: int) -> mmap.mmap:
        if self.map is not None and size <= self.size:
            return self.map
        self.close()
        # A shared directory: never follow a planted link, never reuse a file we did not create.
        flags = os.O_RDWR | os.O_NOFOLLOW | (0 if self._created else os.O_CREAT | os.O_EXCL)
        fd = os.open(self.path, flags, 0o600)
        self._created = True
        try:
            try:  # reserve the pages now: a full tmpfs then fails here, not with SIGBUS mid-copy
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EFBIG):
                    raise SlabError(
                        f"no room for a {size / 2**20:.0f} MiB training snapshot in {Path(self.path).parent} "
                        "(raise the container's --shm-size, or set TIERFLOW_SNAPSHOT_DIR)"
                    ) from exc
                raise
            self.map = mmap.mmap(fd, size, flags=_MAP_FLAGS)
            self.size = size
        finally:
            os.close(fd)
        return self.map

    def close(self) -> None:
        self.layout, self.views = (), {}
        if self.map is not None:
            self.map.close()
            self.map = None

    def unlink(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class SlabWriter:
    """Worker side: `push` a step's arrays + JSON meta into the next slot (round robin, so the last
    len(paths) - 1 pushes stay whole while one is written); `wait` before the arrays change.

    Small pushes are copied inline; larger ones on a thread (torch and numpy copies release the GIL),
    overlapping the training work that only reads what is being copied.
    """

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self._slots = [_Slot(p) for p in paths]
        self._pushes = 0
        self.copies = InFlight("slab")  # its wait_s: time spent waiting for the copy thread (callers time push)
        self._memo: dict[str, tuple[Any, str]] = {}  # meta key -> (value, its JSON): most meta never changes
        # The last `arrays` pushed, their numpy views, the JSON of their specs and their data bytes.
        self._last: tuple[Any, dict[str, np.ndarray], str, int] = (None, {}, "", 0)

    def reserve(self, nbytes: int, arrays: int = 1) -> None:
        """Allocate and map every slot for pushes of about `nbytes` in `arrays` arrays now, before
        training: a slot's pages otherwise come into memory during its first copy, on the step."""
        for slot in self._slots:
            slot.ensure(_HEADER_ROOM + _aligned(nbytes) + _ALIGN * arrays)

    def push(self, step: int, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
        """Snapshot `arrays` as of `step`. Passing the same dict object again (unmodified) reuses its
        layout: the steady state of a training loop."""
        self.wait()
        if arrays is not self._last[0]:
            views = {k: _as_numpy(v) for k, v in arrays.items()}
            specs, offset = {}, 0
            for name, a in views.items():
                specs[name] = [a.dtype.str, list(a.shape), offset]
                offset = _aligned(offset + a.nbytes)
            self._last = (arrays, views, json.dumps(specs, separators=(",", ":")), offset)
        _, views, specs, nbytes = self._last
        slot = self._slots[self._pushes % len(self._slots)]
        self._pushes += 1
        if nbytes <= INLINE_BYTES:
            self._write(slot, step, views, specs, nbytes, meta)
        else:
            self.copies.submit(self._write, slot, step, views, specs, nbytes, meta)

    def _json(self, key: str, value: Any) -> str:
        if isinstance(value, RawJSON):
            return value
        memo = self._memo.get(key)
        if memo is None or memo[0] != value:
            memo = self._memo[key] = (value, json.dumps(value, separators=(",", ":")))
        return memo[1]

    def _write(
        self, slot: _Slot, step: int, views: dict[str, np.ndarray], specs: str, nbytes: int, meta: dict[str, Any]
    ) -> None:
        fields = ",".join(f"{json.dumps(k)}:{self._json(k, v)}" for k, v in meta.items())
        header = f'{{"step":{step},"arrays":{specs},"meta":{{{fields}}}}}'.encode()
        start = max(
            slot.layout[1] if slot.layout else 0, -(-(_PREFIX.size + len(header)) // _HEADER_UNIT) * _HEADER_UNIT
        )
        buf = slot.ensure(start + max(nbytes, _ALIGN))
        layout = (specs, start, slot.size)
        if slot.layout != layout:
            slot.layout = layout
            offsets = json.loads(specs)
            slot.views = {
                name: np.frombuffer(buf, dtype=a.dtype, count=a.size, offset=start + offsets[name][2]).reshape(a.shape)
                for name, a in views.items()
            }
        struct.pack_into("<q", buf, _STEP_AT, -1)  # invalid until the last byte is in
        buf[_PREFIX.size : _PREFIX.size + len(header)] = header
        for name, a in views.items():
            np.copyto(slot.views[name], a, casting="no")
        _PREFIX.pack_into(buf, 0, _MAGIC, step, len(header), start, nbytes)

    def wait(self) -> None:
        self.copies.wait()

    def close(self, unlink: bool = False) -> None:
        self.copies.shutdown(finish=True)
        for slot in self._slots:
            slot.unlink() if unlink else slot.close()


def _read_slot(path: str, with_arrays: bool = True) -> dict[str, Any] | None:
    """{"step", "arrays" (owned copies; {} without `with_arrays`), "meta", "path"} of a whole slot, or
    None (missing, torn or foreign)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < _PREFIX.size:
                return None
            buf = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    except (FileNotFoundError, ValueError):
        return None
    try:
        magic, step, hlen, start, dlen = _PREFIX.unpack_from(buf, 0)
        if magic != _MAGIC or step < 0 or start < _PREFIX.size + hlen or start + dlen > size:
            return None
        header = json.loads(bytes(buf[_PREFIX.size : _PREFIX.size + hlen]))
        arrays = {}
        for name, (dtype, shape, offset) in header["arrays"].items() if with_arrays else ():
            dt = np.dtype(dtype)
            count = int(np.prod(shape, dtype=np.int64))
            arrays[name] = np.frombuffer(buf, dtype=dt, count=count, offset=start + offset).reshape(shape).copy()
        if struct.unpack_from("<q", buf, _STEP_AT)[0] != step or header["step"] != step:
            return None  # rewritten while we copied
        return {"step": step, "arrays": arrays, "meta": header["meta"], "path": path}
    except (ValueError, KeyError, TypeError, struct.error):
        return None
    finally:
        buf.close()


def read_slab(paths: list[str], with_arrays: bool = True) -> list[dict[str, Any]]:
    """Every whole slot of one rank's slab (headers only without `with_arrays`)."""
    return [slot for p in paths if (slot := _read_slot(p, with_arrays)) is not None]


def unlink_slab(paths: list[str]) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


_read_remote = ray.remote(num_cpus=0, max_retries=0)(read_slab)
_unlink_remote = ray.remote(num_cpus=0, max_retries=0)(unlink_slab)


def _on_nodes(
    fn: Any, remote: Any, slabs: list[dict[str, Any] | None], local_only: bool, timeout_s: float, *args: Any
) -> list:
    """fn(paths, *args) per rank: here for slabs on this node (node_id None: this host), else in a task
    pinned to the slab's node."""
    here = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    results: list[Any] = [None] * len(slabs)
    refs = {}
    for r, info in enumerate(slabs):
        if info is None:
            continue
        if info["node_id"] in (here, None):
            results[r] = fn(info["paths"], *args)
        elif not local_only and here is not None:
            strategy = NodeAffinitySchedulingStrategy(info["node_id"], soft=False)
            refs[r] = remote.options(scheduling_strategy=strategy).remote(info["paths"], *args)
    deadline = time.monotonic() + timeout_s
    for r, ref in refs.items():
        try:  # a dead node's task fails or never runs: its slab is gone with it
            results[r] = ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
        except Exception:  # any failure means "no slab from that node"
            ray.cancel(ref, force=True)
    return results


def read_slabs(
    slabs: list[dict[str, Any] | None], local_only: bool = False, timeout_s: float = 10.0, with_arrays: bool = True
) -> list:
    """Per rank (`{"node_id", "paths"}` or None), its whole slots; [] where unreadable."""
    found = _on_nodes(read_slab, _read_remote, slabs, local_only, timeout_s, with_arrays)
    return [slots or [] for slots in found]


def discard_slabs(slabs: list[dict[str, Any] | None], timeout_s: float = 5.0) -> None:
    _on_nodes(unlink_slab, _unlink_remote, slabs, False, timeout_s)


__all__ = [
    "INLINE_BYTES",
    "InFlight",
    "RawJSON",
    "SlabError",
    "SlabWriter",
    "discard_slabs",
    "read_slab",
    "read_slabs",
    "slab_dir",
    "slab_paths",
    "unlink_slab",
]
