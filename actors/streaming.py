"""Streaming stages: shards made by a Ray Data actor pool, consumed while they are made, committed as one artifact.

A streaming stage is a function called once per shard (`shard=i`) that returns a table. Ray Data runs it
on an autoscaling actor pool (`map_batches(concurrency=(min, max))`) with a bounded object-store budget,
so a slow consumer holds the producers back instead of filling memory. The consumer stage receives a
`BatchStream`; every batch it reads is also appended, in shard order, to one Arrow IPC artifact that is
committed (and cached) when the stream ends. A cache hit, a restored run or barrier mode gives the same
`BatchStream` over the stored artifact, so consumer code never knows the difference.
"""

from __future__ import annotations

import contextlib
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from actors.errors import ActorsError
from actors.placement import NodeInfo, capacity
from actors.resources import parse_memory
from actors.stage_profile import runqueue_wait_s
from storage import ArtifactRef, ArtifactStore
from storage.formats import ARROW

SHARD_PARAM = "shard"
_BUSY, _SHARD, _PID = b"tierflow.busy_s", b"tierflow.shard", b"tierflow.pid"


class StreamError(ActorsError):
    """A streaming stage is declared wrongly or produced something that cannot be streamed."""


@dataclass(frozen=True)
class Stream:
    """`@stage(stream=Stream(shards=16))`: run the stage once per shard on a pool and stream the results.

    `shards` is a count or the name of a stage parameter holding it. `max_workers=None` sizes the pool
    from the CPUs (and GPUs) free when the stream starts. `buffer` bounds the object-store bytes in flight
    between producers and consumer: past it the pool pauses (backpressure) rather than spill.
    """

    shards: int | str
    min_workers: int = 1
    max_workers: int | None = None
    buffer: int | str | None = "256MiB"

    def __post_init__(self) -> None:
        if isinstance(self.shards, bool) or not isinstance(self.shards, int | str):
            raise StreamError(f"Stream.shards must be a count or a parameter name, not {self.shards!r}")
        if isinstance(self.shards, int) and self.shards < 1:
            raise StreamError(f"Stream.shards must be at least 1, got {self.shards}")
        if self.min_workers < 1 or (self.max_workers is not None and self.max_workers < self.min_workers):
            raise StreamError(
                f"Stream workers need 1 <= min_workers <= max_workers, got {self.min_workers}..{self.max_workers}"
            )
        if self.buffer is not None:
            try:
                parse_memory(self.buffer)
            except ActorsError as exc:
                raise StreamError(f"Stream.buffer={self.buffer!r} is not a size; give bytes or e.g. '256MiB'") from exc

    @property
    def buffer_bytes(self) -> int | None:
        return None if self.buffer is None else parse_memory(self.buffer)


@dataclass(frozen=True)
class StreamSource:
    """Everything a consumer's actor needs to start the stream of an upstream stage."""

    run_id: str
    stage: str
    fn: Callable[..., Any]
    is_class: bool
    params: dict[str, Any]
    spec: Stream
    ray_options: dict[str, Any]
    inputs: dict[str, ArtifactRef] = field(default_factory=dict)
    cache_key: str = ""  # the streaming stage's own, for its record
    attempt: int = 0

    @property
    def n_shards(self) -> int:
        n = self.spec.shards if isinstance(self.spec.shards, int) else self.params[self.spec.shards]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise StreamError(f"stage {self.stage!r}: shard count {self.spec.shards!r} = {n!r} is not a positive int")
        return n


@dataclass(frozen=True)
class StreamCommit:
    """What a finished stream committed and how its producers and consumer spent their time."""

    stage: str
    artifact: ArtifactRef
    rows: int
    batches: int
    workers: int
    started_at: float
    wall_s: float
    first_batch_s: float
    producer_busy_s: float
    consumer_wait_s: float
    consumer_setup_s: float = 0.0  # stream start to the consumer's first request for a batch
    consumer_setup_wait_s: float = 0.0  # of which its thread waited for a CPU (Linux schedstat)

    def metrics(self) -> dict[str, float]:
        """The streaming stage's own figures, logged on its MLflow run."""
        wall = max(self.wall_s, 1e-9)
        return {
            "rows": self.rows,
            "batches": self.batches,
            "workers": self.workers,
            "rows_per_s": self.rows / wall,
            "first_batch_s": self.first_batch_s,
            # busy time / (wall time x workers): how much of the pool's time went into the shard function
            "utilisation": self.producer_busy_s / (wall * max(self.workers, 1)),
        }

    def consumer_metrics(self, param: str, duration_s: float) -> dict[str, float]:
        """The consumer's side: its share of time not spent waiting for this input, and its rate."""
        wall = max(duration_s, 1e-9)
        return {
            f"{param}.wait_s": self.consumer_wait_s,
            # what the consumer did before it read (imports, a model): the planner's fixed part of its time
            f"{param}.setup_s": self.consumer_setup_s,
            f"{param}.setup_runqueue_s": self.consumer_setup_wait_s,
            f"{param}.rows_per_s": self.rows / wall,
            "utilisation": max(0.0, 1.0 - self.consumer_wait_s / wall),
        }


def _as_table(value: Any, stage: str, shard: int) -> pa.Table:
    if isinstance(value, pa.RecordBatch):
        return pa.Table.from_batches([value])
    if isinstance(value, pa.Table):
        return value
    if isinstance(value, dict):
        return pa.table({k: np.asarray(v) if not isinstance(v, pa.Array) else v for k, v in value.items()})
    raise StreamError(
        f"stage {stage!r} shard {shard} returned {type(value).__name__}; a streaming stage returns a "
        "pyarrow Table or RecordBatch, or a dict of columns"
    )


class _ShardFn:
    """The callable class Ray Data runs on each pool actor: inputs are loaded once per actor."""

    def __init__(self, source: StreamSource, store_config: Any) -> None:
        store = ArtifactStore(store_config)
        self.source = source
        self.kwargs = {**source.params, **{p: store.get(ref) for p, ref in source.inputs.items()}}
        self.target = source.fn() if source.is_class else source.fn

    def __call__(self, batch: pa.Table) -> pa.Table:
        shard = int(batch["shard"][0].as_py())
        t0 = time.perf_counter()
        table = _as_table(self.target(**self.kwargs, shard=shard), self.source.stage, shard)
        busy = time.perf_counter() - t0
        meta = dict(table.schema.metadata or {})
        meta.update({_BUSY: repr(busy).encode(), _SHARD: str(shard).encode(), _PID: str(os.getpid()).encode()})
        return table.replace_schema_metadata(meta)


def pool_bounds(spec: Stream, ray_options: dict[str, Any], available: dict[str, float]) -> tuple[int, int]:
    """(min, max) pool size: `max_workers`, or as many actors as fit in what is free now (at least min)."""
    if spec.max_workers is not None:
        return spec.min_workers, spec.max_workers
    request = {"CPU": float(ray_options.get("num_cpus", 1) or 0), "GPU": float(ray_options.get("num_gpus", 0) or 0)}
    request.update(ray_options.get("resources", {}))
    fit = capacity(request, [NodeInfo("free", available)], unbounded=max(1, int(available.get("CPU", 1))))
    return spec.min_workers, max(spec.min_workers, fit)


class BatchStream:
    """The input a consumer stage receives from a streaming stage: iterate it for pyarrow Tables.

    Live streams commit on `finish()` (the runner calls it after the consumer returns; unread batches are
    drained then, so the artifact is always whole). Stored streams replay the committed batches.
    """

    def __init__(self, stage: str, batches: Iterator[pa.Table], live: bool) -> None:
        self.stage = stage
        self.live = live
        self._batches = batches
        self._consumed = False

    def __iter__(self) -> Iterator[pa.Table]:
        if self._consumed:
            raise StreamError(f"the stream of {self.stage!r} can be iterated once; keep what you need from it")
        self._consumed = True
        return self._batches

    def iter_batches(self, batch_size: int | None = None) -> Iterator[pa.Table]:
        """Tables of exactly `batch_size` rows (the last may be shorter); None keeps the producer's batches."""
        if batch_size is None:
            yield from self
            return
        pending: list[pa.Table] = []
        have = 0
        for table in self:
            pending.append(table)
            have += table.num_rows
            while have >= batch_size:
                merged = pa.concat_tables(pending)
                yield merged.slice(0, batch_size)
                rest = merged.slice(batch_size)
                pending, have = ([rest] if rest.num_rows else []), rest.num_rows
        if have:
            yield pa.concat_tables(pending)

    def iter_torch_batches(self, batch_size: int | None = None, columns: list[str] | None = None) -> Iterator[dict]:
        """Dicts of torch tensors per batch (numeric columns only, zero-copy where Arrow allows)."""
        import torch  # noqa: PLC0415  # only consumers that ask for torch pay for it

        for table in self.iter_batches(batch_size):
            numeric = [f.name for f in table.schema if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)]
            names = columns or numeric
            yield {n: torch.from_numpy(table[n].to_numpy()) for n in names}

    def to_table(self) -> pa.Table:
        tables = list(self)
        return pa.concat_tables(tables) if tables else pa.table({})


def stored_stream(stage: str, table: pa.Table) -> BatchStream:
    """Replay a committed stream batch by batch (each stored record batch is one produced batch)."""
    return BatchStream(stage, iter(pa.Table.from_batches([b]) for b in table.to_batches()), live=False)


class LiveStream(BatchStream):
    """Runs the producers on a Ray Data pool, tees every batch into a temp IPC file, commits on finish."""

    def __init__(self, source: StreamSource, store: ArtifactStore) -> None:
        self.source = source
        self.store = store
        self._tmp = tempfile.TemporaryDirectory(prefix="tierflow-stream-")
        self._path = Path(self._tmp.name) / "stream.arrows"
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._writer_schema = pa.schema([])
        self._sink: pa.OSFile | None = None
        self._rows = self._batches_n = 0
        self._busy: dict[int, float] = {}
        self._pids: set[str] = set()
        self._wait_s = 0.0
        self._first_batch_s = 0.0
        self._setup_s = self._setup_wait_s = 0.0
        self._rq0 = runqueue_wait_s()  # made on the consumer's thread, which also reads it
        self._started_at = time.time()
        self._t0 = time.perf_counter()
        # The stream starts now, on a thread, so Ray Data's start-up and the pool's first shards overlap
        # with whatever the consumer does before it reads (importing torch, building a model).
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=2)
        self._stop = threading.Event()
        self._pump = threading.Thread(target=self._produce, name=f"tierflow-stream-{source.stage}", daemon=True)
        self._pump.start()
        self._it = self._tee(self._received())
        super().__init__(source.stage, self._it, live=True)

    def _produce(self) -> None:
        batches = self._dataset_batches()
        try:
            for table in batches:
                if not self._first_batch_s:
                    self._first_batch_s = time.perf_counter() - self._t0
                while not self._stop.is_set():
                    try:
                        self._queue.put(("batch", table), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._queue.put(("end", None))
        except BaseException as exc:  # handed to the consumer's thread, which raises it
            self._queue.put(("error", exc))
        finally:
            batches.close()  # stops the Ray Data executor early when the consumer is gone

    def _received(self) -> Iterator[pa.Table]:
        while True:
            kind, item = self._queue.get()
            if kind == "batch":
                yield item
            elif kind == "error":
                raise item
            else:
                return

    def _dataset_batches(self) -> Iterator[pa.Table]:
        import ray  # noqa: PLC0415
        from ray.data import DataContext, ExecutionResources  # noqa: PLC0415

        ctx = DataContext.get_current()
        ctx.execution_options.preserve_order = True  # the artifact's bytes must not depend on timing
        ctx.enable_progress_bars = False
        if (budget := self.source.spec.buffer_bytes) is not None:
            ctx.execution_options.resource_limits = ExecutionResources(object_store_memory=budget)
        lo, hi = pool_bounds(self.source.spec, self.source.ray_options, ray.available_resources())
        n = self.source.n_shards
        ds = ray.data.from_items([{"shard": i} for i in range(n)], override_num_blocks=n).map_batches(
            _ShardFn,
            fn_constructor_args=(self.source, self.store.config),
            batch_size=1,
            batch_format="pyarrow",
            zero_copy_batch=True,
            concurrency=(lo, hi),
            **self.source.ray_options,
        )
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1)

    def _tee(self, batches: Iterator[pa.Table]) -> Iterator[pa.Table]:
        self._setup_s = time.perf_counter() - self._t0  # a generator's body starts at the first next()
        if self._rq0 is not None and (rq := runqueue_wait_s()) is not None:
            self._setup_wait_s = min(self._setup_s, max(0.0, rq - self._rq0))
        while True:
            t = time.perf_counter()
            try:
                table = next(batches)
            except StopIteration:
                return
            self._wait_s += time.perf_counter() - t
            yield self._record(table)

    def _record(self, table: pa.Table) -> pa.Table:
        meta = dict(table.schema.metadata or {})
        shard = int(meta.pop(_SHARD, b"-1"))
        self._busy[shard] = float(meta.pop(_BUSY, b"0"))
        self._pids.add(meta.pop(_PID, b"?").decode())
        table = table.replace_schema_metadata(meta or None)
        if self._writer is None:
            self._sink = pa.OSFile(str(self._path), "wb")
            self._writer = pa.ipc.new_stream(self._sink, table.schema)
            self._writer_schema = table.schema
        elif not table.schema.equals(self._writer_schema, check_metadata=False):
            raise StreamError(
                f"stage {self.stage!r} shard {shard} returned columns {table.schema.names} "
                f"({table.schema.types}); earlier shards returned {self._writer_schema.names}: every shard "
                "must return the same schema"
            )
        if table.num_rows:  # one record batch per produced batch, so a replay yields the same batches
            self._writer.write_batch(table.combine_chunks().to_batches()[0])
            self._rows += table.num_rows
            self._batches_n += 1
        return table

    def finish(self, record: Callable[[StreamCommit], Mapping[str, Any]] | None = None) -> StreamCommit:
        """Drain what the consumer did not read, then commit the whole stream as one Arrow artifact
        (with `record(commit)` as the stage's record, written just before its manifest)."""
        for _ in self._it:
            pass
        wall = time.perf_counter() - self._t0
        if self._writer is None:
            raise StreamError(f"stage {self.stage!r} produced no batches; Stream.shards must be at least 1")
        self._writer.close()
        assert self._sink is not None
        self._sink.close()

        def commit(ref: ArtifactRef) -> StreamCommit:
            return StreamCommit(
                stage=self.stage,
                artifact=ref,
                rows=self._rows,
                batches=self._batches_n,
                workers=len(self._pids),
                started_at=self._started_at,
                wall_s=wall,
                first_batch_s=self._first_batch_s,
                producer_busy_s=sum(self._busy.values()),
                consumer_wait_s=self._wait_s,
                consumer_setup_s=self._setup_s,
                consumer_setup_wait_s=self._setup_wait_s,
            )

        with pa.memory_map(str(self._path)) as mapped:
            data = memoryview(mapped.read_buffer())
            schema = {
                "columns": {f.name: str(f.type) for f in self._writer_schema},
                "num_rows": self._rows,
                "stream": {"batches": self._batches_n},
            }
            ref = self.store.put_encoded(
                ARROW,
                data,
                schema,
                run_id=self.source.run_id,
                stage=self.stage,
                record=None if record is None else lambda r: record(commit(r)),
            )
            del data
        self.close()
        return commit(ref)

    def close(self) -> None:
        """Stop the producers (if still running) and remove the temp file."""
        self._it.close()
        self._stop.set()
        while self._pump.is_alive():  # unblock a pump waiting to hand over a batch
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.1)
        if self._sink is not None and not self._sink.closed:
            self._sink.close()
        self._tmp.cleanup()
