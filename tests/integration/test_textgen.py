"""The built-in generative workflow (issue 20) with tiny parameters, and a user's own generative workflow, on a
real Ray and MLflow (sqlite): train -> register -> gate; the registered generators load back and generate.
Serving a generator over HTTP is tested with the streaming app (serving.generate_app)."""

import math

import mlflow
import pytest
import ray
import torch
from mlflow import MlflowClient

from serving.generation import load_generator
from serving.loading import registry_source
from storage import ArtifactStore, StoreConfig
from tests.conftest import ship_by_value, start_local_ray
from tests.fixtures import generative_models as fx
from workflows import GateFailed, Workflow
from workflows.builtin import textgen as tg
from workflows.engine import run_workflow
from workflows.lineage import MLflowHook

pytestmark = pytest.mark.integration
# the built-in stages without `serve` (that needs the generation app); a few seconds of training
STAGES = Workflow("textgen", [tg.preprocess, tg.train, tg.evaluate])
TINY = {"train.steps": 30, "train.seq_len": 32, "train.batch_size": 8, "train.embed": 16, "train.hidden": 48,
        "evaluate.max_bits_per_byte": 7.5, "evaluate.sample_tokens": 24}  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    ship_by_value(fx.__name__)
    tmp = tmp_path_factory.mktemp("textgen")
    store = StoreConfig.from_urls([str(tmp / "store")])
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    start_local_ray(num_cpus=2)
    try:
        run = run_workflow(STAGES, params=TINY, store_config=store, hooks=[MLflowHook(uri)], keep_warm_s=0)
        user = run_workflow(fx.user_textgen, store_config=store, hooks=[MLflowHook(uri)], keep_warm_s=0)
        yield {"store": store, "uri": uri, "run": run, "user": user}
    finally:
        ray.shutdown()


def test_textgen_trains_and_passes_its_gate(env):
    run, store, client = env["run"], ArtifactStore(env["store"]), MlflowClient(env["uri"])
    assert [r.status for r in run.records.values()] == ["succeeded"] * 3
    assert run.records["preprocess"].artifact.format == "arrow-ipc"
    table = store.get(run.records["preprocess"].artifact)
    assert set(table["split"].to_pylist()) == {"train", "held_out"}
    assert table.schema.metadata[b"python"].decode().startswith("3.")
    result = store.get(run.records["evaluate"].artifact)
    assert result["held_out_bits_per_byte"] < math.log2(257)  # better than a uniform guess over the vocabulary
    assert result["sample"].startswith("Return the ") and result["sample_sampled"].startswith("Return the ")
    ids = {n: r.annotations["mlflow_run_id"] for n, r in run.records.items()}
    curve = client.get_metric_history(ids["train"], "train_bits_per_byte")
    assert [m.step for m in curve] == list(range(30)) and curve[-1].value < curve[0].value
    inputs = client.get_run(ids["preprocess"]).inputs.dataset_inputs
    assert [d.dataset.name for d in inputs] == ["python-docstrings"]
    assert client.get_run(ids["evaluate"]).data.tags["tierflow.sample"].startswith('"Return the ')


def test_registered_generator_loads_back_and_generates(env):
    source = registry_source("models:/tierflow-textgen/1", env["uri"])  # refused unless the gate passed
    gen = load_generator(source)
    assert gen.spec.task == "generator" and gen.spec.args == {"embed": 16, "hidden": 48, "layers": 1}
    result = ArtifactStore(env["store"]).get(env["run"].records["evaluate"].artifact)
    assert "Return the " + gen.generate("Return the ", max_tokens=24) == result["sample"]  # the served artifact
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(env["uri"])
    try:
        pyfunc = mlflow.pyfunc.load_model("models:/tierflow-textgen/1")  # no pickle: code + safetensors
    finally:
        mlflow.set_tracking_uri(before)
    assert pyfunc.predict(["Return the "]).tolist() == [gen.generate("Return the ", max_tokens=32)]


def test_a_failed_gate_names_threshold_value_and_fix(env):
    """The gate stage itself on the run's own artifacts (a whole run again would only repeat the above)."""
    from actors.context import StageContext

    store, records = ArtifactStore(env["store"]), env["run"].records
    table, bundle = store.get(records["preprocess"].artifact), store.get(records["train"].artifact)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a 1-CPU stage; two threads of a small GRU only contend on 2 shared cores
    try:
        with pytest.raises(GateFailed) as failed:
            tg.evaluate(StageContext("r", "evaluate", "n", "cpu"), table, bundle, max_bits_per_byte=1.0)
    finally:
        torch.set_num_threads(threads)
    message = str(failed.value)
    assert "max_bits_per_byte=1.0" in message and "bits per byte is above" in message
    assert "-p train.steps" in message


def test_users_own_generative_workflow(env):
    assert env["user"].status == "succeeded"
    gen = load_generator(registry_source("models:/user-conv-lm/1", env["uri"]))
    assert gen.state_batch_dim == 0 and gen.spec.builder.endswith(":CausalConvLM")
    sample = ArtifactStore(env["store"]).get(env["user"].records["conv_check"].artifact)["sample"]
    assert gen.generate("Return ", max_tokens=24) == sample
