"""The run loop: launch ready stages on warm, resource-pinned actors, collect results, retry, time out.

Outputs flow downstream as Ray object references inside a run; each is committed to the durable
tier by its actor before the stage counts as done. Cache hits, restored stages and retries read
their inputs from the store instead, so a lost object or a dead driver never loses committed work.
"""

from __future__ import annotations

import logging
import time
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
from actors.placement import PlacementDecision, decide
from actors.ray_api import ActorPool, cluster_nodes
from actors.runner import StageCall
from storage import ArtifactStore
from workflows.cache import cache_key
from workflows.errors import StageFailedError
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
from workflows.retry import INFRA, TIMEOUT, USER

log = logging.getLogger(__name__)

_INFRA_ERRORS = (RayActorError, WorkerCrashedError, NodeDiedError, OutOfMemoryError, ObjectLostError)


class Driver:
    def __init__(
        self,
        workflow: Workflow,
        run: RunInfo,
        store: ArtifactStore,
        hooks: list[RunHook],
        use_cache: bool,
        rerun: set[str],
        journals: Journals,
    ) -> None:
        self.wf = workflow
        self.run = run
        self.store = store
        self.hooks = hooks
        self.use_cache = use_cache
        self.rerun = rerun
        self.journals = journals
        self.pool = ActorPool(store.config)
        # stage -> ObjectRef (ran in this driver) or ArtifactRef (cache hit / restored / retry input)
        self.outputs: dict[str, Any] = {n: r.artifact for n, r in run.records.items() if r.status in DONE}
        self.inflight: dict[Any, tuple[str, Any, float | None]] = {}  # result ref -> (stage, actor, deadline)
        self.retry_at: dict[str, float] = {}
        self.failure: StageFailedError | None = None

    # -- lifecycle ------------------------------------------------------------------------------
    def execute(self) -> RunInfo:
        error: BaseException | None = None
        try:
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
            self.pool.shutdown()  # ends every actor we made: no reservation outlives the run
            for rec in self.run.records.values():
                if rec.status in (PENDING, RUNNING, RETRYING):
                    rec.status = CANCELLED if self.run.status == CANCELLED else NOT_RUN
            self.run.ended_at = time.time()
            self._journal()
            for h in self.hooks:
                h.on_run_end(run=self.run, error=error)
        return self.run

    def _loop(self) -> None:
        while True:
            if self.failure is None:
                self._launch_ready()
            if not self.inflight:
                if self.failure is None and self.retry_at:
                    time.sleep(max(0.0, min(self.retry_at.values()) - time.monotonic()))
                    continue
                return
            done, _ = ray.wait(list(self.inflight), num_returns=1, timeout=self._wait_s())
            for ref in done:
                self._collect(ref)
            self._expire()

    def _wait_s(self) -> float | None:
        now = time.monotonic()
        times = [d for _, _, d in self.inflight.values() if d is not None]
        if self.failure is None:
            times += list(self.retry_at.values())
        return max(0.0, min(times) - now) if times else None

    # -- launching ------------------------------------------------------------------------------
    def _ready(self) -> list[str]:
        recs, now = self.run.records, time.monotonic()
        out = []
        for n in self.wf.order:
            due = recs[n].status == RETRYING and self.retry_at.get(n, 0) <= now
            if (recs[n].status == PENDING or due) and all(recs[e.upstream].status in DONE for e in self.wf.upstream(n)):
                out.append(n)
        return out

    def _launch_ready(self) -> None:
        # Cache hits complete at once and may make more stages ready: repeat until stable.
        while ready := self._ready():
            for name in ready:
                self._launch(name)

    def _launch(self, name: str) -> None:
        stage, rec = self.wf.stages[name], self.run.records[name]
        edges = self.wf.upstream(name)
        rec.inputs = {e.param: self.run.records[e.upstream].artifact for e in edges}  # type: ignore[misc]
        if rec.status == PENDING:
            rec.cache_key = cache_key(stage, rec.params, {p: a.digest for p, a in rec.inputs.items()})
            cacheable = self.use_cache and stage.cache and name not in self.rerun
            if cacheable and (hit := self.store.lookup_cache(rec.cache_key)):
                rec.status, rec.artifact = CACHED, self.store.adopt(hit, run_id=self.run.run_id, stage=name)
                self.outputs[name] = rec.artifact
                self._notify(rec)
                return
        self.retry_at.pop(name, None)
        retrying = rec.attempts > 0
        effective = rec.decision.effective
        assert effective is not None  # plan() refused infeasible stages
        actor = self.pool.acquire(effective, rec.decision.ray_options())
        call = StageCall(
            run_id=self.run.run_id,
            stage=name,
            fn=stage.fn,
            is_class=stage.is_class,
            wants_context=stage.wants_context,
            params=rec.params,
            input_params=tuple(e.param for e in edges),
            cache_key=rec.cache_key,
            upstream={e.param: self._upstream_facts(e.upstream) for e in edges},
            input_refs=dict(rec.inputs),
        )
        # A retry reads inputs from the store: the objects of a dead worker may be gone.
        args = [self.run.records[e.upstream].artifact if retrying else self.outputs[e.upstream] for e in edges]
        result_ref, value_ref = actor.run.remote(call, *args)
        rec.attempts += 1
        rec.status = RUNNING
        for h in self.hooks:
            if hasattr(h, "on_stage_start"):
                h.on_stage_start(run=self.run, record=rec)
        self.outputs[name] = value_ref
        timeout = stage.retry.timeout_s
        self.inflight[result_ref] = (name, actor, time.monotonic() + timeout if timeout else None)

    def _upstream_facts(self, name: str) -> dict[str, str]:
        rec = self.run.records[name]
        art = rec.artifact
        assert art is not None
        return {"digest": art.digest, "uri": art.uri, "run_id": art.run_id, "stage": name, **rec.annotations}

    # -- results --------------------------------------------------------------------------------
    def _collect(self, ref: Any) -> None:
        name, actor, _ = self.inflight.pop(ref)
        rec = self.run.records[name]
        try:
            result = ray.get(ref)
        except RayTaskError as exc:
            if isinstance(exc.cause, StageExecutionError):
                c = exc.cause
                self._failed(rec, actor, USER, c.cause, c.traceback, c.cause_types)
            elif isinstance(exc.cause, _INFRA_ERRORS):
                self._failed(rec, actor, INFRA, f"{type(exc.cause).__name__}: {exc.cause}", "", ())
            else:
                self._failed(rec, actor, USER, str(exc), str(exc), ())
            return
        except _INFRA_ERRORS as exc:
            self._failed(rec, actor, INFRA, f"its worker died ({type(exc).__name__}): {exc}", "", ())
            return
        self.pool.release(rec.decision.effective, actor)  # type: ignore[arg-type]
        rec.status, rec.result, rec.artifact, rec.error = SUCCEEDED, result, result.artifact, ""
        if self.wf.stages[name].cache:
            self.store.record_cache(rec.cache_key, result.artifact)
        self._notify(rec)

    def _expire(self) -> None:
        now = time.monotonic()
        for ref, (name, actor, deadline) in list(self.inflight.items()):
            if deadline is not None and now >= deadline:
                del self.inflight[ref]
                timeout = self.wf.stages[name].retry.timeout_s
                cause = f"TimeoutError: stage {name!r} ran longer than timeout_s={timeout:g}"
                self._failed(self.run.records[name], actor, TIMEOUT, cause, "", ("builtins.TimeoutError",))

    def _failed(self, rec: StageRecord, actor: Any, kind: str, cause: str, tb: str, types: tuple[str, ...]) -> None:
        self.pool.discard(actor)  # a broken or busy process is never reused
        policy = self.wf.stages[rec.name].retry
        decision = policy.decide(rec.attempts, kind, types)
        fresh = self._replan(rec) if decision.retry else None
        unplaceable = fresh is not None and not fresh.feasible
        if unplaceable:
            cause = f"{cause}; cannot retry: {fresh.reason}"  # type: ignore[union-attr]
        elif fresh is not None:
            rec.decision = fresh
        if decision.retry and not unplaceable and self.failure is None:
            log.warning(
                "stage %s attempt %d failed (%s); retrying in %.1fs: %s",
                rec.name,
                rec.attempts,
                kind,
                decision.delay_s,
                cause,
            )
            rec.status, rec.error = RETRYING, cause
            self.retry_at[rec.name] = time.monotonic() + decision.delay_s
            self._journal()
            return
        rec.status = FAILED
        rec.error = f"{cause} ({decision.reason})" if rec.attempts > 1 or not decision.retry else cause
        log.error("stage %s failed: %s", rec.name, rec.error)
        if self.failure is None:  # keep the first; in-flight stages finish and commit
            self.failure = StageFailedError(rec.name, rec.error, tb, self.run.run_id)
        self._notify(rec)

    def _replan(self, rec: StageRecord) -> PlacementDecision:
        """After a failure (perhaps a lost node), decide again against the nodes alive now."""
        return decide(rec.name, self.wf.stages[rec.name].resources, cluster_nodes())

    def _notify(self, rec: StageRecord) -> None:
        for h in self.hooks:
            h.on_stage_end(run=self.run, record=rec)
        self._journal()

    def _journal(self) -> None:
        self.journals.write(self.run, self.run.workflow_ref)
