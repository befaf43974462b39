"""Entry to running a workflow: validate, plan placement, set up (or restore) the run, drive it.

Everything here happens before any compute; `workflows.driver` runs the stages.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from actors.errors import RecordError
from actors.placement import NodeInfo, NodeType, PlacementDecision, decide
from actors.ray_api import cluster_nodes, node_types
from actors.record import RestoredStage, from_record
from storage import ArtifactNotFoundError, ArtifactRef, ArtifactStore, StorageError, StoreConfig, validate_name
from workflows.driver import Driver
from workflows.errors import UnsatisfiableResourcesError, ValidationError
from workflows.hooks import CACHED, DONE, SUCCEEDED, RunHook, RunInfo, StageRecord
from workflows.journal import Journal, Journals
from workflows.model import Workflow
from workflows.node_wait import DEFAULT_NODE_WAIT_S

log = logging.getLogger(__name__)


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def plan(workflow: Workflow, nodes: Iterable[NodeInfo], types: Iterable[NodeType] = ()) -> dict[str, PlacementDecision]:
    """A placement decision per stage against the nodes alive and the node types the autoscaler can
    launch; raise if any stage fits neither (before any compute)."""
    nodes, types = list(nodes), list(types)
    decisions = {name: decide(name, workflow.stages[name].resources, nodes, types) for name in workflow.order}
    bad = [d.reason for d in decisions.values() if not d.feasible]
    if bad:
        head = f"workflow {workflow.name!r} cannot be placed:\n  - "
        raise UnsatisfiableResourcesError(head + "\n  - ".join(bad), bad)
    return decisions


def descendants(workflow: Workflow, names: Iterable[str]) -> set[str]:
    """`names` and everything downstream of them."""
    out: set[str] = set()
    todo = list(names)
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo += workflow.downstream(n)
    return out


def run_workflow(
    workflow: Workflow,
    *,
    params: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    store_config: StoreConfig | None = None,
    hooks: Iterable[RunHook] = (),
    use_cache: bool = True,
    rerun: Iterable[str] = (),
    resume: str | None = None,
    workflow_ref: str = "",
    nodes: list[NodeInfo] | None = None,
    streaming: bool = True,
    keep_warm_s: float = 60.0,
    placement_timeout_s: float = 60.0,
    node_wait_s: float = DEFAULT_NODE_WAIT_S,
    cluster_types: list[NodeType] | None = None,
) -> RunInfo:
    """Run `workflow` on the connected Ray cluster and return its final state.

    `resume=RUN_ID` continues a run whose driver stopped: committed stages are restored, not re-run.
    `rerun` names stages that skip the cache, with everything downstream of them.
    `streaming=False` runs every streaming stage alone to completion before its consumers (barrier mode).
    `keep_warm_s`: after a successful run its idle actors stay warm this long for the next run of this
    process (a notebook, a test suite, a service); 0 ends them with the run. `release_warm_actors()` ends them now.
    `placement_timeout_s`: how long a stage's actor may stay unplaced while nothing else of the run runs.
    `node_wait_s`: how long a stage may wait for a node the autoscaler has to launch for it.
    `cluster_types`: the node types of the cluster's config (`cluster_from_yaml`), used when the cluster
    publishes none itself; their running workers are counted live. `nodes` (a test's fixed inventory) skips both.
    Raises a `ValidationError` before anything starts, or `StageFailedError` after committed work is kept.
    """
    store = ArtifactStore(store_config)
    journals = Journals(store)
    unknown = sorted(set(rerun) - set(workflow.stages))
    if unknown:
        raise ValidationError(f"--rerun names unknown stages {unknown}; stages are {workflow.order}")
    journal: Journal | None = None
    if resume:
        journal = journals.read(validate_name(resume, "run id"))
        values = _resume_params(workflow, journal, params)
        run_id = resume
    else:
        values = workflow.resolve_params(params)
        run_id = validate_name(run_id or new_run_id(), "run id")
        if journals.exists(run_id):
            raise ValidationError(f"run id {run_id!r} is taken; continue it with --resume {run_id} or pick another")
    alive = nodes if nodes is not None else cluster_nodes()
    launchable = [] if nodes is not None else node_types(cluster_types, alive)
    decisions = plan(workflow, alive, launchable)
    run = RunInfo(
        run_id=run_id,
        workflow=workflow,
        params=values,
        records={n: StageRecord(n, decisions[n], values[n]) for n in workflow.order},
        store_config=store.config,
        workflow_ref=workflow_ref or workflow.name,
    )
    if journal is not None:
        _restore(run, journal, store)
    if not (keep_warm_s >= 0 and placement_timeout_s > 0 and node_wait_s > 0):
        raise ValidationError(
            f"keep_warm_s={keep_warm_s!r} must be >= 0, placement_timeout_s={placement_timeout_s!r} and "
            f"node_wait_s={node_wait_s!r} > 0 (seconds)"
        )
    driver = Driver(
        workflow,
        run,
        store,
        list(hooks),
        use_cache,
        descendants(workflow, rerun),
        journals,
        streaming,
        keep_warm_s=keep_warm_s,
        placement_timeout_s=placement_timeout_s,
        node_wait_s=node_wait_s,
        declared_types=cluster_types,
        launchable=launchable,
    )
    return driver.execute()


def _resume_params(workflow: Workflow, journal: Journal, params: Mapping[str, Any] | None) -> dict[str, Any]:
    if journal.workflow != workflow.name:
        raise ValidationError(f"run {journal.run_id!r} belongs to workflow {journal.workflow!r}, not {workflow.name!r}")
    if journal.status == SUCCEEDED:
        raise ValidationError(f"run {journal.run_id!r} already succeeded; nothing to resume")
    if journal.driver_alive():
        raise ValidationError(f"run {journal.run_id!r} is still running (driver pid {journal.pid} on {journal.host})")
    if params and workflow.resolve_params(params) != journal.params:
        raise ValidationError("a resumed run keeps its original parameters; drop --param or start a new run")
    return journal.params


def _restore(run: RunInfo, journal: Journal, store: ArtifactStore) -> None:
    """Mark stages whose outputs are committed (manifest present, blob verifies) as done, with what their
    records say they measured, so hooks can log them as if the driver that ran them had lived."""
    run.resumed = True
    run.started_at = journal.started_at
    run.annotations.update(journal.annotations)
    for name, rec in run.records.items():
        try:
            ref = store.manifest(run.run_id, name)
        except ArtifactNotFoundError:
            continue
        except StorageError as exc:  # torn by a machine crash before its group-commit barrier
            log.warning("run %s: the manifest of %s is unreadable (%s); it will run again", run.run_id, name, exc)
            store.forget(run.run_id, name)
            continue
        if not store.verify_blob(ref.digest):
            log.warning("run %s: committed output of %s is missing or corrupt; it will run again", run.run_id, name)
            store.forget(run.run_id, name)  # else a stage whose output differs run to run could not commit again
            continue
        entry = journal.stages.get(name)
        restored = _restored(run.run_id, name, ref, store)
        if restored is not None:  # it ran in this run (a cache hit adopts a manifest and has no record)
            rec.status = SUCCEEDED
            rec.result, rec.inputs, rec.cache_key = restored.result, restored.inputs, restored.cache_key
            rec.attempts = restored.attempt
        elif entry and entry.status in DONE:
            rec.status = entry.status
        else:  # the journal was behind: an adopted manifest names its producer run
            rec.status = SUCCEEDED if ref.run_id == run.run_id else CACHED
        rec.artifact, rec.restored = ref, True
        if entry:
            rec.annotations.update(entry.annotations)
            rec.attempts = max(rec.attempts, entry.attempts)


def _restored(run_id: str, stage: str, ref: ArtifactRef, store: ArtifactStore) -> RestoredStage | None:
    """The stage's committed record, or None (a cache hit; a manifest older than records; unreadable)."""
    try:
        doc = store.record(run_id, stage)
        return None if doc is None else from_record(doc, ref, run_id=run_id, stage=stage)
    except (RecordError, StorageError) as exc:  # lineage is lost for this stage, not the run
        log.warning("run %s: the record of stage %s is unreadable (%s); it is restored without it", run_id, stage, exc)
        return None
