"""The run loop: launch ready stages on warm, resource-pinned actors, collect results, retry, time out.

Outputs flow downstream as Ray object references inside a run; each is committed to the durable
tier by its actor before the stage counts as done. Cache hits, restored stages and retries read
their inputs from the store instead, so a lost object or a dead driver never loses committed work.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import deque
from typing import Any

import ray
from ray.exceptions import (
    NodeDiedError,
    ObjectLostError,
    OutOfMemoryError,
    RayActorError,
    RayTaskError,
    WorkerCrashedError,
)

from actors.errors import StageExecutionError
from actors.placement import NodeType, ray_options
from actors.pool import shared_pools
from actors.resources import Resources
from actors.runner import StageCall, StageResult, stream_stage_result
from actors.streaming import StreamSource
from storage import ArtifactStore
from workflows.cache import cache_key
from workflows.commits import GroupCommit
from workflows.dispatch import MAX_BATCH, PIPELINE_MAX_S, ActorCalls
from workflows.errors import StageFailedError
from workflows.failures import Failures
from workflows.hooks import (
    CACHED,
    CANCELLED,
    DONE,
    FAILED,
    NOT_RUN,
    PENDING,
    RETRYING,
    RUNNING,
    SUCCEEDED,
    RunHook,
    RunInfo,
    StageRecord,
)
from workflows.journal import Journals
from workflows.model import Workflow
from workflows.node_wait import DEFAULT_NODE_WAIT_S, NodeWaits
from workflows.retry import USER

log = logging.getLogger(__name__)

# The journal is for `runs`/`show` and resume's bookkeeping; what is committed is decided from manifests,
# and MLflow children are found by search, so a journal at most this far behind loses nothing.
JOURNAL_EVERY_S = 0.2
# A flush appends what changed; on a tier without appends (object stores, encryption) it rewrites the log,
# so the next flush waits this many times as long as the last one took: the journal's share stays bounded.
_JOURNAL_BUDGET = 20
_TURN_S = 0.5  # the longest the driver blocks in one turn
# Reserves almost nothing, so a barrier-mode stream leaves the CPUs to its own pool.
_STREAM_COORDINATOR = Resources(cpus=0.01)
_INFRA_ERRORS = (RayActorError, WorkerCrashedError, NodeDiedError, OutOfMemoryError, ObjectLostError)
_COMMIT_POLL_S = 0.002  # how often a turn looks for a finished barrier while one runs


class Driver(Failures):
    def __init__(
        self,
        workflow: Workflow,
        run: RunInfo,
        store: ArtifactStore,
        hooks: list[RunHook],
        use_cache: bool,
        rerun: set[str],
        journals: Journals,
        streaming: bool = True,
        keep_warm_s: float = 0.0,
        placement_timeout_s: float = 60.0,
        node_wait_s: float = DEFAULT_NODE_WAIT_S,
        declared_types: list[NodeType] | None = None,
        launchable: list[NodeType] | None = None,
    ) -> None:
        self.wf = workflow
        self.run = run
        self.store = store
        self.hooks = hooks
        self.use_cache = use_cache
        self.rerun = rerun
        self.journals = journals
        self.keep_warm_s = keep_warm_s
        self.placement_timeout_s = placement_timeout_s
        self.pool = shared_pools.borrow(store.config)  # warm actors of an earlier run of this process
        # On an autoscaling cluster the pool counts launchable nodes too, and ends actors the run no longer
        # needs, so that nodes come up for a fan-out and go again once it drained.
        self.pool.configure(launchable or [], workflow.max_actors)
        self.declared_types = declared_types  # the cluster.yaml's node types, for a replan after a failure
        self.node_waits = NodeWaits(node_wait_s)
        self._unplaced_since: float | None = None  # when an actor began waiting with nothing of ours running
        self._start_failures: dict[tuple, int] = {}  # shape -> actors in a row that could not start
        # stage -> ObjectRef (ran in this driver) or ArtifactRef (cache hit / restored / retry input)
        self.outputs: dict[str, Any] = {n: r.artifact for n, r in run.records.items() if r.status in DONE}
        self.inflight: dict[Any, tuple[str, Any, float | None]] = {}  # result ref -> (stage, actor, deadline)
        self.calls = ActorCalls()  # short stages queue in busy actors and share calls (workflows.dispatch)
        self._requeued: set[str] = set()  # stages put back uncounted once (see _lost)
        self.retry_at: dict[str, float] = {}
        self.failure: StageFailedError | None = None
        self._pos = {n: i for i, n in enumerate(workflow.order)}
        # Edge lists once: Workflow.upstream/downstream copy (and sort) per call, O(fan-in) for a sink of N.
        self._up = {n: workflow.upstream(n) for n in workflow.order}
        self._down = {n: workflow.downstream(n) for n in workflow.order}
        # Consumers not yet launched per stage: once none is left its in-run object is dropped, so the
        # driver does not keep every stage's output alive (a retry reads the committed artifact).
        self._unlaunched = {n: len(self._down[n]) for n in workflow.order}
        self._keyed: set[str] = set()  # stages whose cache key (and cache lookup) this driver has done
        self._launched: set[str] = set()  # stages counted as consumers in _unlaunched
        self._sources: dict[int, str] = {}  # id(stage function) -> its source (the workflow holds the functions)
        # A streaming stage with one consumer runs inside that consumer's stage (fused); otherwise it
        # runs alone and commits before anything downstream starts (barrier).
        self.fused: dict[str, str] = {}
        for n, st in workflow.stages.items():
            if streaming and st.stream is not None and len(consumers := workflow.downstream(n)) == 1:
                self.fused[n] = consumers[0]
        self._candidates: set[str] = set(workflow.order)
        self._scan: dict[str, int] = {}  # stage -> upstream edges already seen done
        self._waiting: dict[tuple, deque[str]] = {}  # shape -> ready stages waiting for an actor
        self._unstarted: dict[tuple, int] = {}  # shape -> stages of it not launched yet (actors beyond: surplus)
        for n in workflow.order:
            if run.records[n].status not in DONE and n not in self.fused:
                shape = self._actor_resources(n).shape()
                self._unstarted[shape] = self._unstarted.get(shape, 0) + 1
        self._journal_at = 0.0
        self._journal_gap = JOURNAL_EVERY_S
        self._changed: dict[str, None] = {}  # stages whose journal entry is behind their record (ordered)
        self._journal_started = False
        self._interrupted = False  # Ctrl-C seen; raised as KeyboardInterrupt at the next turn
        # Group commit (workflows.commits) where the durable tier is a local file system: actors skip their
        # per-file fsyncs and one barrier in the driver's process commits a batch of stages.
        self.commits: GroupCommit[tuple[StageRecord, StageResult]] = GroupCommit(store)
        self._group = store.group_commits
        self._node_id = ray.get_runtime_context().get_node_id() if self._group else ""

    # -- lifecycle ------------------------------------------------------------------------------
    def execute(self) -> RunInfo:
        error: BaseException | None = None
        # Ctrl-C only sets a flag, acted on between driver turns: a KeyboardInterrupt raised inside a hook,
        # a journal write or a Ray call could leave MLflow or the store half-written, and hang the cleanup.
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            # Warm actors of shapes this run never uses would only hold resources others need.
            self.pool.end_idle(keep_shapes={self._actor_resources(n).shape() for n in self.wf.order})
            for h in self.hooks:
                h.on_run_start(run=self.run)
            self._journal()
            for rec in self.run.records.values():
                if rec.restored:
                    self._notify(rec)  # hooks skip what they already recorded
            self._loop()
            if self.failure:
                raise self.failure
            self.run.status = SUCCEEDED
        except BaseException as exc:
            error = exc
            self.run.status = CANCELLED if isinstance(exc, KeyboardInterrupt) else FAILED
            raise
        finally:
            self.commits.close()
            # A finished run parks its idle actors for the next run of this process (ended after
            # keep_warm_s); a failed or cancelled one ends them all: no reservation outlives it.
            if self.run.status == SUCCEEDED:
                shared_pools.park(self.pool, self.keep_warm_s)
            else:
                self.pool.shutdown()
            for rec in self.run.records.values():
                if rec.status in (PENDING, RUNNING, RETRYING):
                    rec.status = CANCELLED if self.run.status == CANCELLED else NOT_RUN
            self.run.ended_at = time.time()
            self.journals.finish(self.run, self.run.workflow_ref)
            for h in self.hooks:
                h.on_run_end(run=self.run, error=error)
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        return self.run

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self._interrupted = True

    def _check_interrupt(self) -> None:
        if self._interrupted:
            raise KeyboardInterrupt

    def _loop(self) -> None:
        while True:
            self._check_interrupt()
            for rec, result in self.commits.poll():
                self._committed(rec, result)
            if self.failure is None:
                self._launch_ready()
            if self._changed and time.monotonic() >= self._journal_at + self._journal_gap:
                self._journal()
            # Actors still starting matter only while a stage waits for one (a faster actor may have served it).
            starting = self.pool.ready_refs() if self.failure is None and any(self._waiting.values()) else []
            if not self.inflight and not starting and self.commits.pending:
                for rec, result in self.commits.drain():  # nothing else to wait for
                    self._committed(rec, result)
                continue
            if not self.inflight and not starting:
                if self.failure is None and self.retry_at:
                    if self._changed:
                        self._journal()  # a retry's backoff is no reason to leave the journal behind
                    time.sleep(min(_TURN_S, max(0.0, min(self.retry_at.values()) - time.monotonic())))
                    self._check_interrupt()
                    continue
                if self.failure is None and any(self._waiting.values()):
                    raise RuntimeError(f"tierflow bug: stages wait with no actor coming: {self._queued()}")
                return
            refs = list(self.inflight) + starting
            done, rest = ray.wait(refs, num_returns=1, timeout=self._wait_s())
            if done and rest:  # collect everything already finished in the same turn
                done += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            finished = set(done)
            for ref in [r for r in self.inflight if r in finished]:  # in launch order: see _lost
                self._collect(ref)
            if starting:
                for failure in self.pool.poll(done):
                    self._start_failed(failure)
            self._expire()
            self._check_placement()
            self._check_interrupt()

    def _wait_s(self) -> float | None:
        now = time.monotonic()
        times = [d for _, _, d in self.inflight.values() if d is not None]
        if self._changed:
            times.append(self._journal_at + self._journal_gap)
        times.append(now + _TURN_S)  # wake up to notice a Ctrl-C
        if self.commits.pending:
            times.append(now + _COMMIT_POLL_S)
        if self.failure is None:
            times += list(self.retry_at.values())
        return max(0.0, min(times) - now) if times else None

    # -- launching ------------------------------------------------------------------------------
    def _ready(self) -> list[str]:
        """Candidates whose upstream is done, in topological order.

        Only stages downstream of a newly finished one (or due for a retry) are candidates, and each
        remembers how far its upstream check got, so a wide fan-out costs O(edges) in all.
        """
        recs, now = self.run.records, time.monotonic()
        out = []
        for n in sorted(self._candidates, key=self._pos.__getitem__):
            status = recs[n].status
            if status == RETRYING and self.retry_at.get(n, 0) > now:
                continue
            self._candidates.discard(n)  # back when an upstream stage finishes or a retry is due
            if status not in (PENDING, RETRYING):
                continue
            edges = self._up[n]
            i = self._scan.get(n, 0)
            while i < len(edges) and self._satisfied(edges[i].upstream, n):
                i += 1
            self._scan[n] = i
            if i == len(edges):
                out.append(n)
        return out

    def _satisfied(self, upstream: str, name: str) -> bool:
        status = self.run.records[upstream].status
        return status in DONE or (status == RUNNING and self.fused.get(upstream) == name)

    def _launch_ready(self) -> None:
        """Launch what is ready; a stage whose shape has no free actor queues (FIFO) for that shape.

        Cache hits complete at once and may make more stages ready: repeat until nothing launches.
        """
        progress = True
        while progress:
            progress = False
            for queue in self._waiting.values():
                while queue and self._launch(queue[0], queue):
                    queue.popleft()
                    progress = True
            for name in self._ready():
                queue = self._waiting.setdefault(self._actor_resources(name).shape(), deque())
                if not queue and self._launch(name):
                    progress = True
                else:
                    queue.append(name)  # no placed actor of this shape is free: wait for one
        if self.failure is None:
            for queue in self._waiting.values():
                if queue:  # actors for the waiting stages, as many as the cluster holds (lent once placed)
                    res = self._actor_resources(queue[0])
                    self.pool.want(res, ray_options(res), len(queue))
        # An actor waiting for placement may need what idle actors of other shapes hold (not one waiting for
        # a node to be launched: it needs none of theirs).
        self.pool.reclaim(ignore=self.node_waits.shapes())
        if self.pool.autoscaling:
            self.pool.trim(self._unstarted)

    def _actor_resources(self, name: str) -> Resources:
        """What the stage's actor reserves: its placement, or almost nothing for a barrier-mode stream's driver."""
        if self.wf.stages[name].stream is not None and name not in self.fused:
            return _STREAM_COORDINATOR  # the stream's own pool does the work
        effective = self.run.records[name].decision.effective
        assert effective is not None  # plan() refused infeasible stages
        return effective

    def _launch(self, name: str, queue: deque[str] | None = None) -> bool:
        """Start `name` (or complete it from the cache); False when no actor of its shape is free.

        A stage queued for an actor is tried again every turn: the cache key and lookup are done once.
        `queue`: the stages waiting behind `name` for the same shape; short ones may go in the same call.
        """
        rec = self.run.records[name]
        edges = self._up[name]
        if self._from_cache(name):
            return True
        if name in self.fused:
            live = {e.param for e in edges if self._is_live(e.upstream)}
            rec.inputs = {e.param: self.run.records[e.upstream].artifact for e in edges if e.param not in live}  # type: ignore[misc]
            self._consumed(name)
            return self._start_fused(rec)
        live = {e.param for e in edges if self._is_live(e.upstream)}
        queue_ok = self._batchable(name) and not live  # a deadline starts at launch: never queued
        behind = (lambda a: self.calls.may_queue_behind(a, self._fn)) if queue_ok else None
        actor = self.pool.acquire(self._actor_resources(name), behind)
        if actor is None:
            return False
        batch = [name, *self._companions(name, queue)] if queue_ok and queue else [name]
        if len(batch) == 1:
            call, args = self._call(name, actor, live)
            result_ref, value_ref = actor.run.remote(call, *args)
            self._submitted(name, actor, result_ref, value_ref)
            return True
        calls, counts, flat = [], [], []
        for n in batch:
            call, args = self._call(n, actor, set())
            calls.append(call)
            counts.append(len(args))
            flat += args
        refs = actor.run_batch.options(num_returns=1 + len(batch)).remote(calls, counts, *flat)
        self.calls.batches[refs[0]] = tuple(batch)
        for n, value_ref in zip(batch, refs[1:], strict=True):
            self._submitted(n, actor, refs[0], value_ref)
        return True

    def _from_cache(self, name: str) -> bool:
        """Compute the stage's cache key (once) and complete it from the cache if it may and can."""
        stage, rec = self.wf.stages[name], self.run.records[name]
        if rec.status != PENDING or name in self._keyed:
            return False
        self._keyed.add(name)
        # Stages of one function (a sweep, a fan-out) share its source: read it once per run, not per stage.
        source = self._sources.get(id(stage.fn)) or self._sources.setdefault(id(stage.fn), stage.source())
        rec.cache_key = cache_key(stage, rec.params, self._input_keys(name), source)
        cacheable = self.use_cache and stage.cache and name not in self.rerun
        if not (cacheable and (hit := self.store.lookup_cache(rec.cache_key))):
            return False
        rec.inputs = {e.param: self.run.records[e.upstream].artifact for e in self._up[name]}  # type: ignore[misc]
        rec.status, rec.artifact = CACHED, self.store.adopt(hit, run_id=self.run.run_id, stage=name)
        self.outputs[name] = rec.artifact
        self._consumed(name)
        self._notify(rec)
        return True

    def _batchable(self, name: str) -> bool:
        """May the stage wait in a busy actor or share a call? Not with a deadline (it starts at launch), a
        stream, or a fused streaming input."""
        stage = self.wf.stages[name]
        return stage.retry.timeout_s is None and stage.stream is None and name not in self.fused.values()

    def _companions(self, name: str, queue: deque[str]) -> list[str]:
        """Short stages waiting behind `name` (queue[0]) that go in its call, taken out of the queue, while the
        call's known time stays under PIPELINE_MAX_S. Cache hits met on the way complete (and leave) too."""
        took = self.calls.short(self._fn(name))
        if took is None:
            return []
        out, budget = [], PIPELINE_MAX_S - took
        while len(queue) > 1 and len(out) < MAX_BATCH - 1:
            n = queue[1]
            if self._from_cache(n):
                del queue[1]
                continue
            t = self.calls.short(self._fn(n))
            if t is None or t >= budget or not self._batchable(n):
                break
            budget -= t
            out.append(n)
            del queue[1]
        return out

    def _call(self, name: str, actor: Any, live: set[str]) -> tuple[StageCall, list[Any]]:
        """The call that runs `name` on `actor`, and its upstream values as the call's arguments."""
        stage, rec = self.wf.stages[name], self.run.records[name]
        edges = self._up[name]
        rec.inputs = {e.param: self.run.records[e.upstream].artifact for e in edges if e.param not in live}  # type: ignore[misc]
        self.retry_at.pop(name, None)
        retrying = rec.attempts > 0
        call = StageCall(
            run_id=self.run.run_id,
            stage=name,
            fn=None if self.calls.has_fn(actor, stage.fn) else stage.fn,
            is_class=stage.is_class,
            wants_context=stage.wants_context,
            params=rec.params,
            input_params=tuple(e.param for e in edges),
            cache_key=rec.cache_key,
            upstream={e.param: self._upstream_facts(e.upstream) for e in edges},
            input_refs=dict(rec.inputs),
            stream_params=tuple(e.param for e in edges if self.wf.stages[e.upstream].stream is not None),
            stream_source=self._stream_source(name) if stage.stream is not None else None,
            attempt=rec.attempts + 1,
            defer_sync=self._group,
            fn_key=str(id(stage.fn)),  # the workflow holds its functions: ids are unique within the run
        )
        # A retry reads inputs from the store: the objects of a dead worker may be gone. A streaming
        # input is a recipe the consumer's actor starts, or the committed stream.
        args = [
            self._stream_source(e.upstream)
            if e.param in live
            else self.run.records[e.upstream].artifact
            if retrying or self.wf.stages[e.upstream].stream is not None
            else self.outputs.get(e.upstream, self.run.records[e.upstream].artifact)
            for e in edges
        ]
        return call, args

    def _submitted(self, name: str, actor: Any, result_ref: Any, value_ref: Any) -> None:
        rec, timeout = self.run.records[name], self.wf.stages[name].retry.timeout_s
        rec.attempts += 1
        rec.status = RUNNING
        self._started(rec)
        self.outputs[name] = value_ref
        self._consumed(name)
        if result_ref not in self.inflight:  # a batch's stages share their result ref
            self.inflight[result_ref] = (name, actor, time.monotonic() + timeout if timeout else None)
        self.calls.submitted(actor, name)

    def _fn(self, name: str) -> Any:
        return self.wf.stages[name].fn

    def _consumed(self, name: str) -> None:
        """`name` launched (or completed from the cache): its upstream objects may have no consumer left."""
        if name in self._launched:  # a retry is no new consumer
            return
        self._launched.add(name)
        if name not in self.fused:
            shape = self._actor_resources(name).shape()
            self._unstarted[shape] = self._unstarted.get(shape, 0) - 1
        for up in {e.upstream for e in self._up[name]}:
            self._unlaunched[up] -= 1
            if self._unlaunched[up] <= 0:
                self.outputs.pop(up, None)

    def _started(self, rec: StageRecord) -> None:
        self._changed[rec.name] = None
        for h in self.hooks:
            if hasattr(h, "on_stage_start"):
                h.on_stage_start(run=self.run, record=rec)

    # -- streaming ------------------------------------------------------------------------------
    def _is_live(self, name: str) -> bool:
        return name in self.fused and self.run.records[name].status == RUNNING

    def _start_fused(self, rec: StageRecord) -> bool:
        """A fused streaming stage needs no actor: it starts inside its consumer's stage."""
        rec.attempts += 1
        rec.status = RUNNING
        self._started(rec)
        self._candidates.add(self.fused[rec.name])
        return True

    def _stream_source(self, name: str) -> StreamSource:
        st, rec = self.wf.stages[name], self.run.records[name]
        assert st.stream is not None
        return StreamSource(
            run_id=self.run.run_id,
            stage=name,
            fn=st.fn,
            is_class=st.is_class,
            params=rec.params,
            spec=st.stream,
            ray_options=rec.decision.ray_options(),
            inputs={e.param: self.run.records[e.upstream].artifact for e in self._up[name]},  # type: ignore[misc]
            cache_key=rec.cache_key,
            attempt=rec.attempts,
        )

    def _input_keys(self, name: str) -> dict[str, str]:
        """What a cache key depends on per input: the digest, or for a stream the producer's own key (a
        live stream's digest is known only once it ends, and both name the same deterministic bytes)."""
        out = {}
        for e in self._up[name]:
            up = self.run.records[e.upstream]
            if self.wf.stages[e.upstream].stream is not None and up.cache_key:
                out[e.param] = "stream:" + up.cache_key
            else:
                out[e.param] = up.artifact.digest  # type: ignore[union-attr]
        return out

    def _commit_streams(self, consumer: StageRecord, result: StageResult) -> None:
        """Record the streams a consumer committed as the results of their own stages."""
        for name, commit in result.streams.items():
            rec = self.run.records[name]
            rec.status, rec.artifact, rec.error = SUCCEEDED, commit.artifact, ""
            rec.result = stream_stage_result(result, commit)  # as its record says (the actor wrote it)
            for e in self._up[consumer.name]:  # the consumer's metrics of it came with its result
                if e.upstream == name:
                    consumer.inputs[e.param] = commit.artifact
            if self.wf.stages[name].cache:
                self.store.record_cache(rec.cache_key, commit.artifact)
            self._notify(rec)

    def _upstream_facts(self, name: str) -> dict[str, str]:
        rec = self.run.records[name]
        art = rec.artifact
        if art is None:  # a live stream: its digest is known when it ends
            return {"stage": name, "stream": "live", **rec.annotations}
        return {"digest": art.digest, "uri": art.uri, "run_id": art.run_id, "stage": name, **rec.annotations}

    # -- results --------------------------------------------------------------------------------
    def _collect(self, ref: Any) -> None:
        first, actor, _ = self.inflight.pop(ref)
        batch = self.calls.batches.pop(ref, None)
        names = batch or (first,)
        # A call that died while an earlier call on its actor is unaccounted for waited behind it: never ran.
        behind = self.calls.running.get(actor, [first])[0] not in names
        orphans = self.calls.returned(actor, names) | (set(names) if behind else set())
        try:
            got = ray.get(ref)
        except RayTaskError as exc:
            if isinstance(exc.cause, _INFRA_ERRORS):
                self._lost(names, orphans, actor, f"{type(exc.cause).__name__}: {exc.cause}")
                return
            self.pool.release(actor)
            if isinstance(exc.cause, StageExecutionError):  # a lone call's stage raised
                c = exc.cause
                self._failed(self.run.records[first], actor, USER, c.cause, c.traceback, c.cause_types)
            else:
                for name in names:
                    self._failed(self.run.records[name], actor, USER, str(exc), str(exc), ())
            return
        except _INFRA_ERRORS as exc:
            self._lost(names, orphans, actor, f"its worker died ({type(exc).__name__}): {exc}")
            return
        results = got if batch else [got]  # a batch: each stage's result, or the error it raised
        ok = [(self.run.records[n], r) for n, r in zip(names, results, strict=True) if isinstance(r, StageResult)]
        for rec, result in ok:
            self.calls.finished(actor, self._fn(rec.name), result.duration_s, result.artifact.size_bytes)
        if self._group and any(result.node_id != self._node_id for _, result in ok):
            ray.get(actor.barrier.remote())  # the barrier here cannot reach another node's page cache
        self.pool.release(actor)
        for rec, result in ok:
            cacheable = self.wf.stages[rec.name].cache
            if self._group:
                self.commits.add((rec, result), (rec.cache_key, result.artifact) if cacheable else None)
                continue
            if cacheable:
                self.store.record_cache(rec.cache_key, result.artifact)
            self._committed(rec, result)
        for name, r in zip(names, results, strict=True):  # a stage of a batch that raised
            if isinstance(r, StageExecutionError):
                self._failed(self.run.records[name], actor, USER, r.cause, r.traceback, r.cause_types)

    def _committed(self, rec: StageRecord, result: StageResult) -> None:
        """The stage's output is durable (and its cache entry written): it counts as done."""
        self._commit_streams(rec, result)
        rec.status, rec.result, rec.artifact, rec.error = SUCCEEDED, result, result.artifact, ""
        self._notify(rec)

    def _notify(self, rec: StageRecord) -> None:
        if rec.status in DONE:
            self._candidates.update(self._down[rec.name])
        for h in self.hooks:
            h.on_stage_end(run=self.run, record=rec)
        self._changed[rec.name] = None

    def _journal(self) -> None:
        """Bring the journal up to the records: the head once, then only the entries that changed."""
        t0 = time.monotonic()
        if not self._journal_started:
            self._journal_started = True
            self.journals.start(self.run, self.run.workflow_ref)  # writes every entry that is not the default
            self._changed = {}
        changed, self._changed = list(self._changed), {}
        self.journals.append(self.run, changed)
        self._journal_at = time.monotonic()
        self._journal_gap = max(JOURNAL_EVERY_S, _JOURNAL_BUDGET * (self._journal_at - t0))
