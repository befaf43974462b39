"""The Ray actor that executes stages, commits their outputs and reports where they ran."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import ray

from actors.context import Metric, SourceInput, StageContext
from actors.energy import EnergyConfig, EnergyMeter
from actors.errors import StageExecutionError
from actors.stage_profile import (
    StageSampler,
    assigned_resources,
    build_profile,
    profile_metrics,
    profile_tags,
    stream_profile,
)
from actors.streaming import BatchStream, LiveStream, StreamCommit, StreamSource, stored_stream
from storage import ArtifactRef, ArtifactStore, StoreConfig
from storage.formats import decode, encode


@dataclass(frozen=True)
class StageCall:
    """Everything an actor needs to run one stage; upstream values arrive as positional args."""

    run_id: str
    stage: str
    fn: Callable[..., Any] | None  # None: the actor has it under `fn_key` from an earlier call of this run
    is_class: bool
    wants_context: bool
    params: dict[str, Any]
    input_params: tuple[str, ...]
    cache_key: str
    # param -> facts about the upstream artifact (digest, uri, and hook annotations like model_version)
    upstream: dict[str, dict[str, str]] = field(default_factory=dict)
    input_refs: dict[str, ArtifactRef] = field(default_factory=dict)
    stream_params: tuple[str, ...] = ()  # inputs from streaming stages: passed as a BatchStream
    stream_source: StreamSource | None = None  # barrier mode: this call runs a streaming stage alone
    attempt: int = 0  # 1 for the first, for the stage's record
    defer_sync: bool = False  # group commit: the driver makes this commit durable with one barrier for many
    fn_key: str = ""  # names `fn` for later calls of the same run on this actor (pickling it is per call)


@dataclass(frozen=True)
class StageResult:
    """Where and how a stage ran, and the manifest of its committed output."""

    stage: str
    artifact: ArtifactRef
    node_id: str
    node_ip: str
    pid: int
    device: str
    gpu_ids: list[Any]
    cuda_visible_devices: str
    started_at: float
    duration_s: float
    metrics: list[Metric] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    sources: list[SourceInput] = field(default_factory=list)
    streams: dict[str, StreamCommit] = field(default_factory=dict)  # upstream stage -> its committed stream
    profile: dict[str, Any] = field(default_factory=dict)  # actors.stage_profile: time, CPU, memory, bytes, energy


def stream_stage_result(consumer: StageResult, commit: StreamCommit) -> StageResult:
    """A fused streaming stage's own result: it ran inside `consumer`'s stage, on the same actor."""
    profile = _stream_profile(commit)
    facts = commit.metrics() | profile_metrics(profile)
    metrics = [Metric(k, float(v), 0, int(commit.started_at * 1000)) for k, v in facts.items()]
    return dataclasses.replace(
        consumer,
        stage=commit.stage,
        artifact=commit.artifact,
        started_at=commit.started_at,
        duration_s=commit.wall_s,
        metrics=metrics,
        tags={"tierflow.stream.consumer": consumer.stage, "tierflow.stream.workers": str(commit.workers)}
        | profile_tags(profile),
        sources=[],
        streams={},
        profile=profile,
    )


def _meter(info: dict[str, Any], resources: dict[str, float]) -> tuple[StageSampler, dict[str, float]]:
    meter = EnergyMeter(
        EnergyConfig.from_env(),
        gpu_ids=list(info["gpu_ids"]),
        on_cuda=info["device"].startswith("cuda"),
        gpu_fraction=resources.get("GPU", 1.0) or 1.0,
    )
    sampler = StageSampler(meter)
    sampler.start()
    return sampler, resources


def _stream_profile(commit: StreamCommit) -> dict[str, Any]:
    return stream_profile(
        wall_s=commit.wall_s,
        busy_s=commit.producer_busy_s,
        workers=commit.workers,
        rows=commit.rows,
        out_bytes=commit.artifact.size_bytes,
        config=EnergyConfig.from_env(),
    )


def detect_device(gpu_ids: list[Any]) -> str:
    """`cuda:N` only when Ray assigned a GPU *and* torch can use CUDA; otherwise `cpu`."""
    if gpu_ids:
        import torch  # noqa: PLC0415  # only GPU stages pay for the import

        if torch.cuda.is_available():
            return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


PROFILE_ENV = "TIERFLOW_ACTOR_PROFILE"  # a directory: each stage actor writes its cProfile there (benchmarks)


class _ActorProfile:
    """cProfile of a stage actor's calls, dumped to `<dir>/actor-<pid>.prof` at most every 2 s (actors are
    killed, not exited, so there is no last chance to write it)."""

    def __init__(self, directory: str) -> None:
        import cProfile  # noqa: PLC0415

        self.path = os.path.join(directory, f"actor-{os.getpid()}.prof")
        self.prof, self.dumped = cProfile.Profile(), time.monotonic()

    @contextlib.contextmanager
    def __call__(self) -> Any:
        self.prof.enable()
        try:
            yield
        finally:
            self.prof.disable()
            if time.monotonic() - self.dumped >= 2.0:
                self.prof.dump_stats(self.path)
                self.dumped = time.monotonic()


class StageActor:
    """A warm process that runs stages of one resource shape. Wrapped with `ray.remote` by the pool."""

    def __init__(self, store_config: StoreConfig) -> None:
        self.store = ArtifactStore(store_config)
        self._instances: dict[Any, Any] = {}
        self._info: dict[str, Any] | None = None  # where this actor runs: fixed for its life, asked once
        self._fns: tuple[str, dict[str, Callable[..., Any]]] = ("", {})  # (run id, fn_key -> stage function)
        self._resources: dict[str, float] | None = None
        where = os.environ.get(PROFILE_ENV)
        self._profile = _ActorProfile(where) if where else None

    def info(self) -> dict[str, Any]:
        if self._info is None:
            rc = ray.get_runtime_context()
            gpu_ids = ray.get_gpu_ids()
            self._info = {
                "node_id": rc.get_node_id(),
                "node_ip": ray.util.get_node_ip_address(),
                "pid": os.getpid(),
                "gpu_ids": gpu_ids,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                "device": detect_device(gpu_ids),
            }
            self._resources = assigned_resources()
        return dict(self._info, gpu_ids=list(self._info["gpu_ids"]))

    def barrier(self) -> None:
        """Make this node's deferred commits durable (group commit across nodes)."""
        self.store.barrier()

    @ray.method(num_returns=2)
    def run(self, call: StageCall, *inputs: Any) -> tuple[StageResult, Any]:
        return self._run_one(call, inputs)

    def run_batch(self, calls: list[StageCall], counts: list[int], *inputs: Any) -> list[Any]:
        """Several short stages in one actor call (called with `num_returns=1 + len(calls)`): Ray's cost of a
        call is paid once for them all. `inputs` holds each call's upstream values in turn (`counts` of them
        each, top-level so Ray resolves them). Returns [their results, then each one's value]; a stage that
        failed has its StageExecutionError in its result's place, and the others still ran."""
        results: list[StageResult | StageExecutionError] = []
        values: list[Any] = []
        at = 0
        for call, n in zip(calls, counts, strict=True):
            try:
                result, value = self._run_one(call, inputs[at : at + n])
            except StageExecutionError as exc:
                result, value = exc, None
            except Exception as exc:  # a store failure while committing: what a lone call would raise
                types = tuple(f"{t.__module__}.{t.__qualname__}" for t in type(exc).__mro__)
                result = StageExecutionError(call.stage, f"{type(exc).__name__}: {exc}", traceback.format_exc(), types)
                value = None
            results.append(result)
            values.append(value)
            at += n
        return [results, *values]

    def _run_one(self, call: StageCall, inputs: tuple[Any, ...]) -> tuple[StageResult, Any]:
        call = self._with_fn(call)
        # The inputs' blobs stay in the cache tiers while the stage uses them.
        pins = self.store.pinned(ref.digest for ref in call.input_refs.values())
        with self._profile() if self._profile else contextlib.nullcontext(), pins:
            return self._run(call, inputs)

    def _run(self, call: StageCall, inputs: tuple[Any, ...]) -> tuple[StageResult, Any]:
        info = self.info()
        live: list[LiveStream] = []
        try:
            kwargs = dict(call.params)
            for pname, value in zip(call.input_params, inputs, strict=True):
                kwargs[pname] = self._input(call, pname, value, live)
            ctx = StageContext(
                call.run_id,
                call.stage,
                info["node_id"],
                info["device"],
                info["gpu_ids"],
                upstream=call.upstream,
                input_refs=call.input_refs,
                store_config=self.store.config,
            )
            if call.wants_context:
                kwargs["ctx"] = ctx
            meter, resources = _meter(info, dict(self._resources or {}))  # started: read just before the stage runs
            prof: dict[str, Any] = {}  # filled once the stage has run; every result made after carries it
            started = time.time()
            t0, cpu0 = time.perf_counter(), time.process_time()

            def result(ref: ArtifactRef, duration_s: float, streams: dict[str, StreamCommit]) -> StageResult:
                return _result(call, info, ctx, ref, started, duration_s, streams, prof)

            barrier: list[StageResult] = []  # this call's result, if it is a stream committed by finish()

            def stream_record(commit: StreamCommit) -> Mapping[str, Any]:
                if commit.stage == call.stage:  # barrier mode: this call is the stream
                    prof.update(_stream_profile(commit))
                    ctx.log_metrics(commit.metrics() | profile_metrics(prof))
                    ctx.tags.update(profile_tags(prof))
                    barrier.append(result(commit.artifact, time.perf_counter() - t0, {}))
                    return to_record(barrier[0], call, call.input_refs)
                src = next(ls.source for ls in live if ls.stage == commit.stage)
                own = stream_stage_result(result(commit.artifact, 0.0, {}), commit)
                return to_record(own, call, src.inputs, cache_key=src.cache_key, attempt=src.attempt)

            try:
                if call.stream_source is not None:
                    live.append(LiveStream(call.stream_source, self.store))
                    value = None
                else:
                    target = self._instance(call.fn) if call.is_class else call.fn  # fn: put back by _with_fn
                    value = target(**kwargs)
                # Unread batches are drained here: a stream is committed whole or not at all.
                streams = {ls.stage: ls.finish(stream_record) for ls in live}
                if call.stream_source is None:
                    fmt, data, schema = encode(value, allow_pickle=self.store.config.allow_pickle)
            except Exception as exc:
                types = tuple(f"{t.__module__}.{t.__qualname__}" for t in type(exc).__mro__)
                raise StageExecutionError(
                    call.stage, f"{type(exc).__name__}: {exc}", traceback.format_exc(), types
                ) from None
            duration = time.perf_counter() - t0
            cpu_s = time.process_time() - cpu0
            energy, waited = meter.stop(cpu_s=cpu_s, wall_s=duration)
        finally:
            for ls in live:
                ls.close()
        if call.stream_source is not None:
            commit = streams[call.stage]
            if barrier:  # committed now, with its record
                return dataclasses.replace(barrier[0], artifact=commit.artifact), None
            ctx.log_metrics(commit.metrics())  # committed by an earlier attempt
            return result(commit.artifact, duration, streams), None
        inputs_read = dict(call.input_refs) | {c.stage: c.artifact for c in streams.values()}  # fused: what it read
        prof.update(
            build_profile(duration, cpu_s, info["device"], inputs_read, schema, len(data), energy, resources, waited)
        )
        ctx.log_metrics(profile_metrics(prof))
        ctx.tags.update(profile_tags(prof))
        encoded = (fmt, data, schema)
        return self._commit(call, ctx, result, encoded, duration, cpu_s, bool(live), streams)

    def _commit(
        self,
        call: StageCall,
        ctx: StageContext,
        result: Callable[[ArtifactRef, float, dict[str, StreamCommit]], StageResult],
        encoded: tuple[str, bytes, dict[str, Any]],
        duration: float,
        cpu_s: float,
        read_live: bool,
        streams: dict[str, StreamCommit],
    ) -> tuple[StageResult, Any]:
        """Commit a (non-streaming) stage's value: its blob, then its record, then its manifest."""
        fmt, data, schema = encoded
        if not read_live:  # a stream consumer's utilisation is its time not waiting for batches
            ctx.log_metric("utilisation", cpu_s / max(duration, 1e-9))  # busy CPU time / wall time
        if "num_rows" in schema:
            ctx.log_metric("rows_per_s", schema["num_rows"] / max(duration, 1e-9))
        inputs = dict(call.input_refs)
        for pname in call.input_params:  # what this consumer saw of each fused stream it read
            commit = streams.get(call.upstream.get(pname, {}).get("stage", ""))
            if commit is not None:
                inputs[pname] = commit.artifact
                ctx.log_metrics(commit.consumer_metrics(pname, duration))
        with self.store.deferred_sync() if call.defer_sync else contextlib.nullcontext():
            ref = self.store.put_encoded(
                fmt,
                data,
                schema,
                run_id=call.run_id,
                stage=call.stage,
                record=lambda r: to_record(result(r, duration, streams), call, inputs),
            )
        # Downstream stages get exactly what a cache hit would load from the store.
        out = decode(fmt, data, allow_pickle=self.store.config.allow_pickle)
        return result(ref, duration, streams), out

    def _input(self, call: StageCall, pname: str, value: Any, live: list[LiveStream]) -> Any:
        if isinstance(value, StreamSource):
            stream = LiveStream(value, self.store)
            live.append(stream)
            return stream
        loaded = self.store.get(value) if isinstance(value, ArtifactRef) else value
        if pname in call.stream_params and not isinstance(loaded, BatchStream):
            return stored_stream(call.upstream.get(pname, {}).get("stage", pname), loaded)
        return loaded

    def _with_fn(self, call: StageCall) -> StageCall:
        """Keep the stage function a call brought, or put back the one an earlier call of the run brought."""
        if not call.fn_key:
            return call
        run, fns = self._fns
        if run != call.run_id:  # functions of earlier runs are not kept
            self._fns = run, fns = call.run_id, {}
        if call.fn is not None:
            fns[call.fn_key] = call.fn
            return call
        if call.fn_key not in fns:  # the driver sends it again after a failure, never relying on a guess
            raise StageExecutionError(call.stage, f"tierflow bug: stage function {call.fn_key} was never sent", "")
        return dataclasses.replace(call, fn=fns[call.fn_key])

    def _instance(self, cls: type) -> Any:
        if cls not in self._instances:
            self._instances[cls] = cls()
        return self._instances[cls]


def _result(
    call: StageCall,
    info: dict[str, Any],
    ctx: StageContext,
    ref: ArtifactRef,
    started: float,
    duration_s: float,
    streams: dict[str, StreamCommit],
    profile: dict[str, Any] | None = None,
) -> StageResult:
    return StageResult(
        stage=call.stage,
        artifact=ref,
        node_id=info["node_id"],
        node_ip=info["node_ip"],
        pid=info["pid"],
        device=info["device"],
        gpu_ids=info["gpu_ids"],
        cuda_visible_devices=info["cuda_visible_devices"],
        started_at=started,
        duration_s=duration_s,
        metrics=list(ctx.metrics),
        tags=dict(ctx.tags),
        sources=list(ctx.sources),
        streams={k: v for k, v in streams.items() if k != call.stage},
        profile=dict(profile or {}),
    )


def to_record(
    res: StageResult,
    call: StageCall,
    inputs: Mapping[str, ArtifactRef],
    *,
    cache_key: str | None = None,
    attempt: int | None = None,
) -> dict[str, Any]:
    from actors.record import to_record as build  # noqa: PLC0415  # record imports StageResult from here

    return build(
        res,
        run_id=call.run_id,
        cache_key=call.cache_key if cache_key is None else cache_key,
        attempt=call.attempt if attempt is None else attempt,
        inputs=dict(inputs),
    )
