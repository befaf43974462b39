"""MLflow as the system of record: one parent run per workflow run, one nested run per stage.

Written from the driver only (actors return their metrics), so a sqlite backend sees one writer and
an `mlflow server` sees ordinary REST calls. The schema is documented in README.md.

Large runs (more stages than `summary_above`, default 500): a nested run costs ~4 tracking-store
transactions (create, batch, inputs, terminate), tens of seconds per thousand stages on sqlite, and the
MLflow UI lists runs 100 at a time. Above the threshold every stage is a row of one table artifact on
the parent run (`tierflow/stages.json`, MLflow's `log_table` format, shown by the UI's artifact viewer),
its duration a point of the parent's `stage.duration_s` series (step = position in the workflow),
logged in batches; only stages a person looks at one by one keep a nested run: failed stages and
stages that register a model or gate one.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

from serving.contract import ModelContractError
from storage import ArtifactRef, ArtifactStore
from storage.config import RAY_JOB_ENV, default_home
from workflows.errors import StageFailedError
from workflows.hooks import CACHED, FAILED, SUCCEEDED, RunInfo, StageRecord
from workflows.summary import description, markdown

log = logging.getLogger(__name__)

ENV_URI = "MLFLOW_TRACKING_URI"
_PARENT_TAGS = ("tierflow.endpoint", "tierflow.model_name", "tierflow.model_version")
GATE_TAG = "tierflow.gate"
_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch
SUMMARY_ABOVE = 500  # stages; `$TIERFLOW_MLFLOW_SUMMARY_ABOVE` overrides
ENV_SUMMARY = "TIERFLOW_MLFLOW_SUMMARY_ABOVE"
TABLE = "tierflow/stages.json"
# MLflow 3 opens an experiment in the view its kind names; untagged ones open in the GenAI (traces) view.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
NOTE = "mlflow.note.content"  # a run's description in the MLflow UI (markdown)


def default_tracking_uri() -> str:
    """`$MLFLOW_TRACKING_URI`, else `./mlflow.db` (`~/.tierflow/mlflow.db` inside a submitted Ray job)."""
    if uri := os.environ.get(ENV_URI):
        return uri
    if os.environ.get(RAY_JOB_ENV):
        return f"sqlite:///{os.path.join(default_home(), 'mlflow.db')}"
    return f"sqlite:///{os.path.abspath('mlflow.db')}"


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class MLflowHook:
    """Records runs, stages, datasets and registered models in MLflow."""

    def __init__(self, tracking_uri: str | None = None, *, summary_above: int | None = None) -> None:
        self.tracking_uri = tracking_uri or default_tracking_uri()
        if summary_above is None:
            summary_above = int(os.environ.get(ENV_SUMMARY, SUMMARY_ABOVE))
        self.summary_above = summary_above
        self.summary = False  # this run logs stages as rows of one table (more stages than summary_above)
        self.rows: dict[str, dict[str, Any]] = {}  # stage -> its row (summary mode; the last event wins)
        self._points: list[Metric] = []  # stage.duration_s points not yet sent
        self._position: dict[str, int] = {}
        if self.tracking_uri.startswith("sqlite:///"):  # sqlite will not create the directory
            os.makedirs(os.path.dirname(self.tracking_uri.removeprefix("sqlite:///")) or ".", exist_ok=True)
        self.client = MlflowClient(self.tracking_uri)
        self.experiment_id = ""
        self.parent_run_id = ""
        self.recorded: dict[str, str] = {}  # stage -> nested run id, for resumed runs

    # -- run ------------------------------------------------------------------------------------
    def on_run_start(self, *, run: RunInfo) -> None:
        self.summary = len(run.records) > self.summary_above
        self._position = {n: i for i, n in enumerate(run.records)}
        if run.resumed and run.annotations.get("mlflow_run_id"):
            self._reopen(run)
            return
        name = run.workflow.name
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                self.experiment_id = self.client.create_experiment(name, tags=EXPERIMENT_KIND)
            except mlflow.exceptions.MlflowException:  # created concurrently
                self.experiment_id = self.client.get_experiment_by_name(name).experiment_id
        else:
            self.experiment_id = exp.experiment_id
            if not exp.tags.get("mlflow.experimentKind"):  # created before tierflow set a kind
                for key, value in EXPERIMENT_KIND.items():
                    self.client.set_experiment_tag(self.experiment_id, key, value)
        parent = self.client.create_run(
            self.experiment_id,
            start_time=_ms(run.started_at),
            run_name=run.run_id,
            tags={
                "tierflow.run_id": run.run_id,
                "tierflow.workflow": name,
                "tierflow.store": run.store_config.durable_url,
                "mlflow.source.name": f"tierflow run {name}",
                "tierflow.lineage": "summary" if self.summary else "nested",
                "tierflow.stages": str(len(run.records)),
            },
        )
        self.parent_run_id = parent.info.run_id
        run.annotations["mlflow_run_id"] = self.parent_run_id
        run.annotations["mlflow_experiment_id"] = self.experiment_id
        # Summary mode: each stage's params are in its table row; 10,000 parent params took ~23 s on sqlite here.
        flat = (
            []
            if self.summary
            else [Param(f"{s}.{k}", _param(v)) for s, ps in run.params.items() for k, v in ps.items()]
        )
        if flat:
            self.client.log_batch(self.parent_run_id, params=flat)

    def _reopen(self, run: RunInfo) -> None:
        """Continue the parent run of a resumed run; remember which stages it already records."""
        self.parent_run_id = run.annotations["mlflow_run_id"]
        self.experiment_id = run.annotations["mlflow_experiment_id"]
        self.client.update_run(self.parent_run_id, status="RUNNING")
        self.client.set_tag(self.parent_run_id, "tierflow.resumed", "true")
        children = self.client.search_runs(
            [self.experiment_id], f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'", max_results=10_000
        )
        for c in children:
            if c.data.tags.get("tierflow.status") not in (SUCCEEDED, CACHED):
                continue
            if c.info.status == "FINISHED":  # terminated last, so fully logged
                self.recorded[c.data.tags["tierflow.stage"]] = c.info.run_id
            else:  # its driver died while logging it: logged again, whole, from the stage's record
                self.client.delete_run(c.info.run_id)

    def on_run_end(self, *, run: RunInfo, error: BaseException | None) -> None:
        if not self.parent_run_id:
            return
        if self.summary:
            self._flush_points()
            self._log_table(run)
        status = {SUCCEEDED: "FINISHED", "cancelled": "KILLED"}.get(run.status, "FAILED")
        tags = [RunTag("tierflow.status", run.status), RunTag(NOTE, markdown(run))]
        if error is not None:
            tags.append(RunTag("tierflow.error", str(error)[:4000]))
        self.client.log_batch(
            self.parent_run_id,
            metrics=[Metric("duration_s", run.duration_s, _ms(time.time()), 0)],
            tags=tags,
        )
        self.client.set_terminated(self.parent_run_id, status, end_time=_ms(run.ended_at or time.time()))

    # -- stages ---------------------------------------------------------------------------------
    def on_stage_end(self, *, run: RunInfo, record: StageRecord) -> None:
        if record.restored and record.name in self.recorded:  # logged by the driver that committed it
            record.annotations["mlflow_run_id"] = self.recorded[record.name]
            return
        stage = run.workflow.stages[record.name]
        if self.summary and not (stage.register_model or stage.gate or record.status == FAILED):
            self._row(record)
            return
        res = record.result
        started = res.started_at if res else time.time()
        child = self.client.create_run(
            self.experiment_id,
            start_time=_ms(started),
            run_name=record.name,
            tags={"mlflow.parentRunId": self.parent_run_id, **self._stage_tags(record), **_note(stage)},
        )
        run_id = child.info.run_id
        record.annotations["mlflow_run_id"] = run_id
        now = _ms(time.time())
        metrics = [Metric("duration_s", res.duration_s if res else 0.0, now, 0)]
        if res:
            metrics += [Metric(m.key, m.value, m.timestamp_ms, m.step) for m in res.metrics]
        params = [Param(k, _param(v)) for k, v in _resource_params(record).items()]
        params += [Param(f"param.{k}", _param(v)) for k, v in record.params.items()]
        self.client.log_batch(run_id, params=params, metrics=metrics[:_BATCH])
        for i in range(_BATCH, len(metrics), _BATCH):
            self.client.log_batch(run_id, metrics=metrics[i : i + _BATCH])
        self._log_inputs(run_id, record)
        failed: StageFailedError | None = None
        if stage.register_model and record.status in (SUCCEEDED, CACHED) and record.artifact:
            try:
                self._register(run, record, stage.register_model, run_id)
            except ModelContractError as exc:  # nothing was registered: the stage fails with the reason
                record.status, record.error = FAILED, f"{type(exc).__name__}: {exc}"
                self.client.log_batch(
                    run_id, tags=[RunTag("tierflow.status", FAILED), RunTag("tierflow.error", record.error[:4000])]
                )
                failed = StageFailedError(record.name, record.error, "", run.run_id)
        if stage.gate and record.status in (SUCCEEDED, CACHED, FAILED):
            self._tag_gate(run, record)
        propagate = [RunTag(k, v) for k, v in record.annotations.items() if k in _PARENT_TAGS]
        propagate += [RunTag(k, v) for k, v in (res.tags if res else {}).items() if k in _PARENT_TAGS]
        if propagate:
            self.client.log_batch(self.parent_run_id, tags=propagate)
        end = _ms(started + (res.duration_s if res else 0.0))
        self.client.set_terminated(run_id, "FAILED" if record.status == FAILED else "FINISHED", end_time=end)
        if failed is not None:
            raise failed

    # -- summary mode -----------------------------------------------------------------------------
    def _row(self, record: StageRecord) -> None:
        """One stage as a table row (sent at run end) and a point of stage.duration_s (sent in batches)."""
        res, art = record.result, record.artifact
        self.rows[record.name] = {
            "stage": record.name,
            "status": record.status,
            "cache": record.cache,
            "attempts": record.attempts,
            "restored": record.restored,
            "started_at": res.started_at if res else None,
            "duration_s": res.duration_s if res else 0.0,
            "node_id": res.node_id if res else "",
            "device": res.device if res else "",
            "cache_key": record.cache_key,
            "digest": art.digest if art else "",
            "uri": art.uri if art else "",
            "format": art.format if art else "",
            "producer_run": art.run_id if art else "",
            "inputs": json.dumps({p: a.digest for p, a in record.inputs.items()}),
            "params": json.dumps(record.params, default=repr),
            "metrics": json.dumps({m.key: m.value for m in res.metrics} if res else {}),
            "error": record.error[:4000],
        }
        step = self._position.get(record.name, 0)
        self._points.append(Metric("stage.duration_s", res.duration_s if res else 0.0, _ms(time.time()), step))
        if len(self._points) >= _BATCH:
            self._flush_points()

    def _flush_points(self) -> None:
        if self._points:
            self.client.log_batch(self.parent_run_id, metrics=self._points)
            self._points = []

    def _log_table(self, run: RunInfo) -> None:
        """Every stage's row in workflow order, and per-status counts as parent metrics."""
        rows = [self.rows[n] for n in run.records if n in self.rows]
        if rows:
            # log_table's own format ({"columns", "data"}), but written whole: log_table appends to an existing
            # table, and a resumed run re-logs every stage (restored ones from their records).
            columns = list(rows[0])
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, os.path.basename(TABLE))
                with open(path, "w") as f:
                    json.dump({"columns": columns, "data": [[r[c] for c in columns] for r in rows]}, f)
                self.client.log_artifact(self.parent_run_id, path, os.path.dirname(TABLE))
            self.client.set_tag(
                self.parent_run_id, "mlflow.loggedArtifacts", json.dumps([{"path": TABLE, "type": "table"}])
            )
        counts: dict[str, int] = {}
        for rec in run.records.values():
            counts[rec.status] = counts.get(rec.status, 0) + 1
        now = _ms(time.time())
        self.client.log_batch(self.parent_run_id, metrics=[Metric(f"stages.{k}", v, now, 0) for k, v in counts.items()])

    def _stage_tags(self, record: StageRecord) -> dict[str, str]:
        res = record.result
        tags = {
            "tierflow.stage": record.name,
            "tierflow.status": record.status,
            "tierflow.cache": record.cache,
            "tierflow.cache_key": record.cache_key,
            "tierflow.node_id": res.node_id if res else "-",
            "tierflow.node_ip": res.node_ip if res else "-",
            "tierflow.device": res.device if res else "-",
            "tierflow.gpu_ids": json.dumps(res.gpu_ids) if res else "[]",
            "tierflow.cuda_visible_devices": res.cuda_visible_devices if res else "",
            "tierflow.fallback": str(record.decision.fallback_used).lower(),
            "tierflow.placement": record.decision.label,
            "tierflow.attempts": str(record.attempts),
        }
        if record.decision.waits_for:
            tags["tierflow.node_type_waited_for"] = record.decision.waits_for
        if record.restored:
            tags["tierflow.restored"] = "true"
        if record.artifact:
            tags |= {
                "tierflow.artifact.digest": record.artifact.digest,
                "tierflow.artifact.uri": record.artifact.uri,
                "tierflow.artifact.format": record.artifact.format,
                "tierflow.artifact.producer_run": record.artifact.run_id,
            }
        if record.error:
            tags["tierflow.error"] = record.error[:4000]
        if res:
            tags |= res.tags
        return tags

    def _log_inputs(self, run_id: str, record: StageRecord) -> None:
        datasets = [
            _dataset(param, art.uri, art.digest, art.format, json.dumps(art.schema), "upstream")
            for param, art in record.inputs.items()
        ]
        if record.result:
            datasets += [
                _dataset(s.name, s.source, s.digest, "source", json.dumps({"num_rows": s.num_rows}), "source")
                for s in record.result.sources
            ]
        if datasets:
            self.client.log_inputs(run_id, datasets=datasets)

    # -- model registry -------------------------------------------------------------------------
    def _tag_gate(self, run: RunInfo, record: StageRecord) -> None:
        """Mark the registered models this gate judged: only `passed` versions are served from the registry."""
        if record.status == FAILED and not record.error.startswith("GateFailed"):
            return  # it crashed: no verdict on the model
        verdict = "failed" if record.status == FAILED else "passed"
        judged = [run.records[e.upstream] for e in run.workflow.upstream(record.name)] + [record]
        for rec in judged:  # the upstream models it evaluated, and its own if it registers one
            notes = rec.annotations
            if "tierflow.model_version" in notes:
                name, version = notes["tierflow.model_name"], notes["tierflow.model_version"]
                self.client.set_model_version_tag(name, version, GATE_TAG, verdict)
                self.client.set_model_version_tag(name, version, "tierflow.gate_run", run.run_id)

    def _register(self, run: RunInfo, record: StageRecord, model_name: str, stage_run_id: str) -> None:
        art: ArtifactRef = record.artifact  # type: ignore[assignment]
        existing = self.client.search_model_versions(
            f"name = '{model_name}' and tags.`tierflow.digest` = '{art.digest}'"
        )
        # Same weights already registered (cache hit, resumed run): reuse, never a duplicate version.
        version = existing[0] if existing else self._log_and_register(run, art, model_name, stage_run_id)
        record.annotations |= {
            "tierflow.model_name": model_name,
            "tierflow.model_version": str(version.version),
            "tierflow.model_run_id": version.run_id or "",
        }
        self.client.log_batch(
            stage_run_id,
            tags=[RunTag("tierflow.model_name", model_name), RunTag("tierflow.model_version", str(version.version))],
        )

    def _log_and_register(self, run: RunInfo, art: ArtifactRef, model_name: str, stage_run_id: str) -> Any:
        """Save a models-from-code pyfunc, load it back, upload it to the stage run, register a version — all
        through our client, so the caller's global MLflow state (tracking URI, active run) is never touched."""
        from serving.registry import log_and_register  # noqa: PLC0415  # torch only when registering

        data = ArtifactStore(run.store_config).get_blob(art.digest)
        return log_and_register(self.client, data, model_name=model_name, digest=art.digest, stage_run_id=stage_run_id)


def _note(stage: Any) -> dict[str, str]:
    text = description(stage)
    return {NOTE: text} if text else {}


def _dataset(name: str, uri: str, digest: str, fmt: str, schema: str, context: str) -> DatasetInput:
    # MLflow keeps 36 characters of digest; the full sha256 travels in the profile and a tag.
    ds = Dataset(
        name=name,
        digest=digest[:32],
        source_type=fmt,
        source=json.dumps({"uri": uri}),
        schema=schema,
        profile=json.dumps({"sha256": digest}),
    )
    return DatasetInput(ds, tags=[InputTag("mlflow.data.context", context), InputTag("tierflow.digest", digest)])


def _resource_params(record: StageRecord) -> dict[str, Any]:
    req = record.decision.requested
    out: dict[str, Any] = {"resources.cpus": req.cpus, "resources.gpus": req.gpus}
    if req.memory_bytes:
        out["resources.memory_bytes"] = req.memory_bytes
    if req.accelerator_type:
        out["resources.accelerator_type"] = req.accelerator_type
    if req.fallback:
        out["resources.fallback"] = req.fallback
    out |= {f"resources.custom.{k}": v for k, v in req.custom.items()}
    eff = record.decision.effective
    if eff is not None:
        out["placement.cpus"], out["placement.gpus"] = eff.cpus, eff.gpus
    return out


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=repr)
    return text[:6000]
