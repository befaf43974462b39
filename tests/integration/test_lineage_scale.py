"""A run above the MLflow summary threshold is logged completely: one row per stage in the parent's table
artifact, one stage.duration_s point per stage, and a nested run only for the stage that failed."""

import inspect
import json
import os

import pytest
import ray
from mlflow import MlflowClient

from storage import ArtifactStore, StoreConfig
from tests.conftest import ship_by_value, start_local_ray
from workflows import StageFailedError, Workflow, stage
from workflows.engine import run_workflow
from workflows.journal import Journals
from workflows.lineage import TABLE, MLflowHook

pytestmark = pytest.mark.integration
ship_by_value(__name__)
N = 300


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    start_local_ray(num_cpus=2)
    yield
    from actors.pool import shared_pools

    shared_pools.release_all()
    ray.shutdown()


def source() -> dict:
    return {"v": 1}


def leaf(src: dict, i: int = 0) -> dict:
    return {"i": i + src["v"]}


def fan(n: int) -> Workflow:
    """src -> n leaves -> a sink that fails after reading them all."""

    def gather(**inputs: dict) -> dict:
        raise ValueError(f"sink saw {len(inputs)} inputs")

    kw = inspect.Parameter.KEYWORD_ONLY
    gather.__signature__ = inspect.Signature([inspect.Parameter(f"l{i:03d}", kw) for i in range(n)])
    stages = [stage(name="src")(source)] + [stage(name=f"l{i:03d}")(leaf) for i in range(n)]
    return Workflow("wide", [*stages, stage(name="sink")(gather)])


def test_a_run_above_the_threshold_logs_every_stage_as_a_row(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = StoreConfig.from_urls([str(tmp_path / "store")])
    params = {f"l{i:03d}.i": i for i in range(N)}
    with pytest.raises(StageFailedError, match="sink"):
        run_workflow(fan(N), params=params, store_config=store, hooks=[MLflowHook(uri, summary_above=100)], run_id="w1")

    journal = Journals(ArtifactStore(store)).read("w1")
    client = MlflowClient(uri)
    parent = client.get_run(journal.annotations["mlflow_run_id"])
    assert parent.data.tags["tierflow.lineage"] == "summary" and parent.info.status == "FAILED"

    table_dir = client.download_artifacts(parent.info.run_id, os.path.dirname(TABLE), str(tmp_path / "dl"))
    table = json.loads((tmp_path / "dl" / TABLE).read_text()) if os.path.isdir(table_dir) else {}
    rows = [dict(zip(table["columns"], r, strict=True)) for r in table["data"]]
    # Every stage that ended, once, in workflow order, with what the journal says it committed.
    assert [r["stage"] for r in rows] == ["src"] + [f"l{i:03d}" for i in range(N)]
    for r in rows:
        entry = journal.stages[r["stage"]]
        assert r["status"] == entry.status == "succeeded" and r["digest"] == entry.digest != ""
    assert json.loads(rows[5]["params"]) == {"i": 4} and set(json.loads(rows[5]["inputs"])) == {"src"}
    assert json.loads(parent.data.tags["mlflow.loggedArtifacts"]) == [{"path": TABLE, "type": "table"}]
    assert parent.data.params == {}  # per-stage params live in the rows, not as 300 parent params

    points = client.get_metric_history(parent.info.run_id, "stage.duration_s")
    assert sorted(p.step for p in points) == list(range(N + 1))  # src and the leaves; the sink has its run
    assert parent.data.metrics["stages.succeeded"] == N + 1 and parent.data.metrics["stages.failed"] == 1

    kids = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=1000
    )
    assert [(k.info.run_name, k.data.tags["tierflow.status"]) for k in kids] == [("sink", "failed")]
    assert "sink saw 300 inputs" in kids[0].data.tags["tierflow.error"]


def test_below_the_threshold_each_stage_keeps_its_nested_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = StoreConfig.from_urls([str(tmp_path / "store")])
    with pytest.raises(StageFailedError):
        run_workflow(fan(3), params={f"l{i:03d}.i": i for i in range(3)}, store_config=store,
                     hooks=[MLflowHook(uri, summary_above=100)], run_id="w2")  # fmt: skip
    parent_id = Journals(ArtifactStore(store)).read("w2").annotations["mlflow_run_id"]
    client = MlflowClient(uri)
    assert client.get_run(parent_id).data.tags["tierflow.lineage"] == "nested"
    kids = client.search_runs(
        [client.get_run(parent_id).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )
    assert sorted(k.info.run_name for k in kids) == ["l000", "l001", "l002", "sink", "src"]
