"""The driver: validate, then run ready stages on warm, resource-pinned actors as their inputs land.

Outputs flow to downstream stages as Ray object references inside a run and are committed to the
durable tier by the actor before the stage counts as done; cache hits flow as manifests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from actors.errors import StageExecutionError
from actors.placement import NodeInfo, PlacementDecision, decide
from actors.ray_api import ActorPool, cluster_nodes
from actors.runner import StageCall
from storage import ArtifactStore, StoreConfig, validate_name
from workflows.errors import StageFailedError, UnsatisfiableResourcesError
from workflows.hooks import (
    CACHED,
    DONE,
    FAILED,
    NOT_RUN,
    PENDING,
    RUNNING,
    SUCCEEDED,
    RunHook,
    RunInfo,
    StageRecord,
)
from workflows.model import Stage, Workflow

log = logging.getLogger(__name__)

# Bump when the on-store encoding changes: old cache entries then miss instead of misleading.
FORMAT_VERSION = "1"


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def cache_key(stage: Stage, params: Mapping[str, Any], input_digests: Mapping[str, str]) -> str:
    """Code + version + params + input digests + format version. Not resources, not the node."""
    payload = {
        "source": stage.source(),
        "version": stage.version,
        "params": params,
        "inputs": dict(sorted(input_digests.items())),
        "format": FORMAT_VERSION,
    }
    blob = json.dumps(payload, sort_keys=True, default=repr).encode()
    return hashlib.sha256(blob).hexdigest()


def plan(workflow: Workflow, nodes: Iterable[NodeInfo]) -> dict[str, PlacementDecision]:
    """A placement decision per stage; raise if any stage fits no node (before any compute)."""
    nodes = list(nodes)
    decisions = {name: decide(name, workflow.stages[name].resources, nodes) for name in workflow.order}
    bad = [d.reason for d in decisions.values() if not d.feasible]
    if bad:
        raise UnsatisfiableResourcesError(
            f"workflow {workflow.name!r} cannot be placed:\n  - " + "\n  - ".join(bad), bad
        )
    return decisions


def run_workflow(
    workflow: Workflow,
    *,
    params: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    store_config: StoreConfig | None = None,
    hooks: Iterable[RunHook] = (),
    use_cache: bool = True,
    nodes: list[NodeInfo] | None = None,
) -> RunInfo:
    """Run `workflow` on the connected Ray cluster and return its final state.

    Raises a `ValidationError` before anything starts, or `StageFailedError` after committed work is kept.
    """
    values = workflow.resolve_params(params)
    decisions = plan(workflow, nodes if nodes is not None else cluster_nodes())
    run_id = validate_name(run_id or new_run_id(), "run id")
    store = ArtifactStore(store_config)
    run = RunInfo(
        run_id=run_id,
        workflow=workflow,
        params=values,
        records={n: StageRecord(n, decisions[n], values[n]) for n in workflow.order},
        store_config=store.config,
    )
    return _Driver(workflow, run, store, list(hooks), use_cache).execute()


class _Driver:
    def __init__(
        self, workflow: Workflow, run: RunInfo, store: ArtifactStore, hooks: list[RunHook], use_cache: bool
    ) -> None:
        self.wf = workflow
        self.run = run
        self.store = store
        self.hooks = hooks
        self.use_cache = use_cache
        self.pool = ActorPool(store.config)
        self.outputs: dict[str, Any] = {}  # stage -> ObjectRef (this run) or ArtifactRef (cache hit)
        self.inflight: dict[Any, tuple[str, Any]] = {}  # result ref -> (stage, actor)
        self.failure: StageFailedError | None = None

    def execute(self) -> RunInfo:
        error: BaseException | None = None
        try:
            for h in self.hooks:
                h.on_run_start(run=self.run)
            self._loop()
            if self.failure:
                raise self.failure
            self.run.status = SUCCEEDED
        except BaseException as exc:
            error = exc
            self.run.status = "cancelled" if isinstance(exc, KeyboardInterrupt) else FAILED
            raise
        finally:
            self.pool.shutdown()
            for rec in self.run.records.values():
                if rec.status in (PENDING, RUNNING):
                    rec.status = NOT_RUN
            self.run.ended_at = time.time()
            for h in self.hooks:
                h.on_run_end(run=self.run, error=error)
        return self.run

    def _loop(self) -> None:
        while True:
            if self.failure is None:
                self._launch_ready()
            if not self.inflight:
                return
            done, _ = ray.wait(list(self.inflight), num_returns=1)
            for ref in done:
                self._collect(ref)

    def _ready(self) -> list[str]:
        recs = self.run.records
        return [
            n
            for n in self.wf.order
            if recs[n].status == PENDING and all(recs[e.upstream].status in DONE for e in self.wf.upstream(n))
        ]

    def _launch_ready(self) -> None:
        # Cache hits complete instantly and may make more stages ready: repeat until stable.
        while ready := self._ready():
            for name in ready:
                self._launch(name)

    def _launch(self, name: str) -> None:
        stage = self.wf.stages[name]
        rec = self.run.records[name]
        edges = self.wf.upstream(name)
        rec.inputs = {e.param: self.run.records[e.upstream].artifact for e in edges}  # type: ignore[misc]
        rec.cache_key = cache_key(stage, rec.params, {p: a.digest for p, a in rec.inputs.items()})
        if self.use_cache and stage.cache and (hit := self.store.lookup_cache(rec.cache_key)):
            rec.status, rec.artifact = CACHED, self.store.adopt(hit, run_id=self.run.run_id, stage=name)
            self.outputs[name] = rec.artifact
            self._notify(rec)
            return
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
        result_ref, value_ref = actor.run.remote(call, *(self.outputs[e.upstream] for e in edges))
        self.outputs[name] = value_ref
        self.inflight[result_ref] = (name, actor)
        rec.status = RUNNING

    def _upstream_facts(self, name: str) -> dict[str, str]:
        rec = self.run.records[name]
        art = rec.artifact
        assert art is not None
        return {"digest": art.digest, "uri": art.uri, "run_id": art.run_id, "stage": name, **rec.annotations}

    def _collect(self, ref: Any) -> None:
        name, actor = self.inflight.pop(ref)
        rec = self.run.records[name]
        try:
            result = ray.get(ref)
        except RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, StageExecutionError) else None
            self._fail(rec, actor, cause.cause if cause else str(exc), cause.traceback if cause else str(exc))
            return
        except RayActorError as exc:
            self._fail(rec, actor, f"its actor died ({type(exc).__name__}): {exc}", "")
            return
        stage = self.wf.stages[name]
        self.pool.release(rec.decision.effective, actor)  # type: ignore[arg-type]
        rec.status, rec.result, rec.artifact = SUCCEEDED, result, result.artifact
        if stage.cache:
            self.store.record_cache(rec.cache_key, result.artifact)
        self._notify(rec)

    def _fail(self, rec: StageRecord, actor: Any, cause: str, tb: str) -> None:
        rec.status, rec.error = FAILED, cause
        self.pool.discard(actor)
        log.error("stage %s failed: %s", rec.name, cause)
        if self.failure is None:  # keep the first; let in-flight stages finish and commit
            self.failure = StageFailedError(rec.name, cause, tb, self.run.run_id)
        self._notify(rec)

    def _notify(self, rec: StageRecord) -> None:
        for h in self.hooks:
            h.on_stage_end(run=self.run, record=rec)
