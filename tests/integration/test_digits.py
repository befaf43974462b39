"""The main job end to end: real Ray (declared GPU), real MLflow (sqlite), real Ray Serve over HTTP."""

import json

import httpx
import pytest
from mlflow import MlflowClient
from ray import serve

from storage import ArtifactStore, StoreConfig
from tests.conftest import free_port, wait_for_resources_released
from workflows.builtin.digits import digits
from workflows.engine import run_workflow
from workflows.lineage import MLflowHook

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_with_declared_gpu")]
STAGES = ["preprocess", "train", "evaluate", "compress", "serve"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("digits")
    store = StoreConfig.from_urls(["memory://digits-e2e", str(tmp / "store")])
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    port = free_port()
    run = run_workflow(digits, params={"serve.port": port}, store_config=store, hooks=[MLflowHook(uri)])
    serve_out = ArtifactStore(store).get(run.records["serve"].artifact)
    yield {"run": run, "store": store, "uri": uri, "serve": serve_out}
    serve.shutdown()


def test_every_stage_ran_where_it_was_pinned(digits_run):
    run = digits_run["run"]
    assert run.status == "succeeded"
    assert [r.status for r in run.records.values()] == ["succeeded"] * 5
    train = run.records["train"]
    assert not train.decision.fallback_used  # the declared GPU exists, so no fallback
    assert train.result.gpu_ids == [0] and train.result.cuda_visible_devices == "0"
    assert train.result.device == "cpu"  # no CUDA on this machine; torch ran on CPU
    assert run.records["preprocess"].result.gpu_ids == []


def test_model_passes_the_accuracy_gate(digits_run):
    run, store = digits_run["run"], ArtifactStore(digits_run["store"])
    metrics = store.get(run.records["evaluate"].artifact)
    assert metrics["accuracy"] >= 0.9 and metrics["threshold"] == 0.9
    assert run.records["train"].artifact.format == "safetensors"
    assert run.records["preprocess"].artifact.format == "arrow-ipc"


def test_mlflow_records_parent_and_nested_stage_runs(digits_run):
    run, client = digits_run["run"], MlflowClient(digits_run["uri"])
    parent_id = run.annotations["mlflow_run_id"]
    parent = client.get_run(parent_id)
    exp = client.get_experiment_by_name("digits")
    assert parent.info.experiment_id == exp.experiment_id and parent.info.status == "FINISHED"
    assert parent.data.tags["tierflow.run_id"] == run.run_id
    assert parent.data.tags["tierflow.endpoint"] == digits_run["serve"]["url"]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    by_name = {c.info.run_name: c for c in children}
    assert sorted(by_name) == sorted(STAGES)
    for name, child in by_name.items():
        tags = child.data.tags
        assert tags["tierflow.stage"] == name and tags["tierflow.cache"] == "miss"
        assert tags["tierflow.node_id"] == run.records[name].result.node_id
        assert tags["tierflow.device"] == "cpu"
        assert "resources.cpus" in child.data.params and "duration_s" in child.data.metrics
    train = by_name["train"]
    assert train.data.params["resources.gpus"] == "1.0" and train.data.params["resources.fallback"] == "cpu"
    assert train.data.tags["tierflow.gpu_ids"] == "[0]"
    losses = client.get_metric_history(train.info.run_id, "loss")
    assert len(losses) > 100 and [m.step for m in losses] == sorted({m.step for m in losses})
    assert by_name["evaluate"].data.metrics["accuracy"] >= 0.9


def test_inputs_are_logged_as_datasets_back_to_the_raw_data(digits_run):
    run, client = digits_run["run"], MlflowClient(digits_run["uri"])
    ids = {n: r.annotations["mlflow_run_id"] for n, r in run.records.items()}
    prep_inputs = client.get_run(ids["preprocess"]).inputs.dataset_inputs
    assert [d.dataset.name for d in prep_inputs] == ["sklearn-digits"]
    assert json.loads(prep_inputs[0].dataset.source) == {"uri": "sklearn.datasets.load_digits"}
    eval_inputs = {d.dataset.name: d for d in client.get_run(ids["evaluate"]).inputs.dataset_inputs}
    assert sorted(eval_inputs) == ["preprocess", "train"]
    train_art = run.records["train"].artifact
    ds = eval_inputs["train"].dataset
    assert ds.digest == train_art.digest[:32] and json.loads(ds.profile)["sha256"] == train_art.digest
    assert json.loads(ds.source)["uri"] == train_art.uri
    assert {t.key: t.value for t in eval_inputs["train"].tags}["tierflow.digest"] == train_art.digest


def test_models_are_registered_gated_and_linked_to_their_runs(digits_run):
    run, client = digits_run["run"], MlflowClient(digits_run["uri"])
    versions = {v.run_id: v for v in client.search_model_versions("name = 'tierflow-digits'")}
    train, compress = run.records["train"], run.records["compress"]
    assert set(versions) == {train.annotations["mlflow_run_id"], compress.annotations["mlflow_run_id"]}
    float_v, int8_v = versions[train.annotations["mlflow_run_id"]], versions[compress.annotations["mlflow_run_id"]]
    assert float_v.tags["tierflow.digest"] == train.artifact.digest
    assert int8_v.tags["tierflow.digest"] == compress.artifact.digest != train.artifact.digest
    assert float_v.tags["tierflow.gate"] == int8_v.tags["tierflow.gate"] == "passed"
    assert digits_run["serve"]["model_version"] == str(int8_v.version)  # the compressed model is what serves


def test_compression_is_measured_and_within_one_point(digits_run):
    run, client = digits_run["run"], MlflowClient(digits_run["uri"])
    metrics = client.get_run(run.records["compress"].annotations["mlflow_run_id"]).data
    assert metrics.tags["tierflow.compression"] == "applied"
    m = metrics.metrics
    assert m["accuracy_drop"] <= 0.01 and m["size_bytes_after"] < 0.5 * m["size_bytes_before"]
    assert {"latency_ms_before", "latency_ms_after", "accuracy_after"} <= set(m)


def test_endpoint_predicts_and_reports_its_lineage(digits_run):
    out = digits_run["serve"]
    r = httpx.post(out["predict_url"], json=out["example"], timeout=30)
    assert r.status_code == 200
    body = r.json()
    assert body["predictions"] == [out["example_label"]]
    assert abs(sum(body["probabilities"][0]) - 1) < 1e-3
    info = httpx.get(f"{out['url']}/info", timeout=30).json()
    assert info["model_digest"] == digits_run["run"].records["compress"].artifact.digest
    assert info["compression"] == "dynamic-int8"
    assert info["model_version"] == out["model_version"] and info["tierflow_run"] == digits_run["run"].run_id
    # the serve stage's replica asks for no GPU by default; int8 weights would run on CPU anyway
    assert out["replica_resources"] == {"num_cpus": 0.25} and info["device"] == "cpu" and info["gpu_ids"] == []
    assert httpx.get(f"{out['url']}/healthz", timeout=30).json() == {"status": "ok"}
    assert httpx.get(f"{out['url']}/openapi.json", timeout=30).status_code == 200


@pytest.mark.parametrize(
    ("content", "headers", "needle"),
    [
        (json.dumps({"instances": [[0.0] * 63]}), None, "exactly 64 features"),
        (json.dumps({"instances": [["a"] * 64]}), None, "valid number"),
        (json.dumps({"instances": [[True] * 64]}), None, "valid number"),
        (json.dumps({"instances": []}), None, "at least 1"),
        (json.dumps({"rows": [[0.0] * 64]}), None, "instances"),
        (json.dumps({"instances": [[0.0] * 64], "extra": 1}), None, "extra"),
        (json.dumps({"instances": [[0.0] * 64, [1.0] * 65]}), None, "exactly 64 features"),
        (json.dumps({"instances": "nope"}), None, "valid list"),
        ('{"instances": [[1, 2,', None, "JSON"),
        ("instances=1", {"content-type": "text/plain"}, ""),
    ],
)
def test_bad_requests_get_422_never_500(digits_run, content, headers, needle):
    url = digits_run["serve"]["predict_url"]
    r = httpx.post(url, content=content, headers=headers or {"content-type": "application/json"}, timeout=30)
    assert r.status_code == 422, r.text
    assert needle.lower() in r.text.lower()
    good = httpx.post(url, json=digits_run["serve"]["example"], timeout=30)
    assert good.status_code == 200  # the replica is still healthy


def test_no_reservation_leaks_after_the_run(digits_run):
    serve.delete("digits")
    total, avail = wait_for_resources_released()
    assert avail == total
