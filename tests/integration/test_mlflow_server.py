"""Lineage through a real `mlflow server` on loopback: every record goes over REST, artifacts through the
server's proxied artifact store, and the registered model loads back with `mlflow.pyfunc`.

The server runs in a session and process group of its own (uvicorn workers, job runner and huey consumers
are all in that group); teardown ends the group and checks that nothing of it is left.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import ray
from mlflow import MlflowClient
from mlflow.entities import Run

from serving.model import from_tensors, predict_proba
from storage import ArtifactStore, StoreConfig
from workflows import Workflow
from workflows.builtin.digits import evaluate, preprocess, train
from workflows.engine import run_workflow
from workflows.hooks import RunInfo
from workflows.lineage import MLflowHook

pytestmark = pytest.mark.integration

VENV_BIN = Path(sys.executable).parent  # not resolved: a venv's python is a symlink to the base interpreter
STAGES = ["preprocess", "train", "evaluate"]
PARAMS = {"train.epochs": 5, "evaluate.threshold": 0.5}
MODEL = "tierflow-digits"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_members(pgid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(entry))
    return out


def stop_process_group(proc: subprocess.Popen, timeout_s: float = 20.0) -> list[int]:
    """SIGTERM the group, SIGKILL it after `timeout_s`; return the pids still in the group (none)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    deadline = time.monotonic() + timeout_s
    while (left := _group_members(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.5)
        left = _group_members(proc.pid)
    return left


@dataclass
class Server:
    url: str
    root: Path
    log: Path


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"]
    cmd += ["--artifacts-destination", str(root / "artifacts")]
    cmd += ["--workers", "1"]  # a 2-CPU machine; one uvicorn worker is plenty for one client
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    log = root / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    server = Server(f"http://127.0.0.1:{port}", root, log)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(server.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer /health within 120 s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)
        yield server
    finally:
        left = stop_process_group(proc)
        assert not left, f"mlflow server processes survived: {left}"


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    # "local": never attach to a cluster named by $RAY_ADDRESS or a stale ray_current_cluster file.
    ray.init("local", num_cpus=2, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module", autouse=True)
def _restore_mlflow_tracking_uri() -> Iterator[None]:
    """MLflowHook sets the process-wide tracking URI when it registers a model; undo it for later modules."""
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    yield
    mlflow.set_tracking_uri(previous)  # None: back to $MLFLOW_TRACKING_URI or MLflow's default


@dataclass
class Lineage:
    server: Server
    client: MlflowClient
    workflow: Workflow
    store: StoreConfig
    run: RunInfo
    experiment_id: str
    parent: Run
    children: dict[str, Run]


def nested_runs(client: MlflowClient, experiment_id: str, parent_id: str) -> list[Run]:
    return client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")


def run_lineage_check(server: Server, store: StoreConfig) -> RunInfo:
    wf = Workflow("lineage_check", [preprocess, train, evaluate])
    return run_workflow(wf, params=PARAMS, store_config=store, hooks=[MLflowHook(server.url)])


@pytest.fixture(scope="module")
def lineage(mlflow_server: Server, local_ray: None, tmp_path_factory: pytest.TempPathFactory) -> Lineage:
    store = StoreConfig.from_urls([str(tmp_path_factory.mktemp("lineage-store"))])
    run = run_lineage_check(mlflow_server, store)
    assert run.status == "succeeded", run
    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name("lineage_check")
    assert exp is not None, "no experiment named after the workflow"
    parent_id = run.annotations["mlflow_run_id"]
    children = nested_runs(client, exp.experiment_id, parent_id)
    return Lineage(
        server=mlflow_server,
        client=client,
        workflow=run.workflow,
        store=store,
        run=run,
        experiment_id=exp.experiment_id,
        parent=client.get_run(parent_id),
        children={c.info.run_name: c for c in children} if len(children) == len(STAGES) else {},
    )


def test_parent_run_is_finished_in_the_workflows_experiment(lineage: Lineage) -> None:
    parent = lineage.parent
    assert parent.info.experiment_id == lineage.experiment_id
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == lineage.run.run_id
    assert parent.data.tags["tierflow.run_id"] == lineage.run.run_id
    assert parent.data.tags["tierflow.workflow"] == "lineage_check"
    assert parent.data.tags["tierflow.status"] == "succeeded"
    assert parent.data.params["train.epochs"] == "5"
    assert parent.data.params["evaluate.threshold"] == "0.5"
    assert "duration_s" in parent.data.metrics


def test_one_nested_run_per_stage_with_placement_tags(lineage: Lineage) -> None:
    children = nested_runs(lineage.client, lineage.experiment_id, lineage.parent.info.run_id)
    assert len(children) == 3
    assert sorted(c.info.run_name for c in children) == sorted(STAGES)
    node_id = ray.get_runtime_context().get_node_id()
    for child in children:
        name, tags = child.info.run_name, child.data.tags
        assert child.info.status == "FINISHED", name
        assert tags["mlflow.parentRunId"] == lineage.parent.info.run_id
        assert tags["tierflow.stage"] == name
        assert tags["tierflow.node_id"] == node_id == lineage.run.records[name].result.node_id
        assert tags["tierflow.device"] == "cpu"  # no GPU here: train fell back to CPU
        assert tags["tierflow.cache"] == "miss"
        assert tags["tierflow.artifact.digest"] == lineage.run.records[name].artifact.digest
        assert float(child.data.params["resources.cpus"]) == 1.0
        assert "duration_s" in child.data.metrics
    assert lineage.children["train"].data.params["resources.gpus"] == "1.0"
    assert lineage.children["train"].data.tags["tierflow.fallback"] == "true"


def test_train_logs_a_loss_history_and_evaluate_its_accuracy(lineage: Lineage) -> None:
    client, children = lineage.client, lineage.children
    rows_train = int(children["preprocess"].data.metrics["rows_train"])
    steps_per_epoch = math.ceil(rows_train / 64)  # train's default batch_size
    loss = client.get_metric_history(children["train"].info.run_id, "loss")
    assert sorted(m.step for m in loss) == list(range(5 * steps_per_epoch))
    assert all(math.isfinite(m.value) for m in loss)
    epochs = client.get_metric_history(children["train"].info.run_id, "train_accuracy")
    assert sorted(m.step for m in epochs) == list(range(5))

    evaluated = ArtifactStore(lineage.store).get(lineage.run.records["evaluate"].artifact)
    accuracy = children["evaluate"].data.metrics["accuracy"]
    assert accuracy == pytest.approx(evaluated["accuracy"])
    assert 0.5 <= accuracy <= 1.0


def _inputs(run: Run) -> dict[str, tuple[object, dict[str, str]]]:
    """dataset name -> (dataset, its input tags)."""
    return {di.dataset.name: (di.dataset, {t.key: t.value for t in di.tags}) for di in run.inputs.dataset_inputs}


def test_dataset_inputs_link_each_stage_to_its_upstream_digests(lineage: Lineage) -> None:
    client, children = lineage.client, lineage.children
    digest = {name: children[name].data.tags["tierflow.artifact.digest"] for name in STAGES}

    evaluate_inputs = _inputs(client.get_run(children["evaluate"].info.run_id))
    assert set(evaluate_inputs) == {"preprocess", "train"}
    for upstream in ("preprocess", "train"):
        ds, tags = evaluate_inputs[upstream]
        assert ds.digest == digest[upstream][:32]
        assert tags["tierflow.digest"] == digest[upstream]
        assert tags["mlflow.data.context"] == "upstream"

    train_inputs = _inputs(client.get_run(children["train"].info.run_id))
    assert set(train_inputs) == {"preprocess"}
    assert train_inputs["preprocess"][0].digest == digest["preprocess"][:32]

    # preprocess read the raw data set from outside the store: it is recorded as a source input.
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    raw = hashlib.sha256(np.ascontiguousarray(x).tobytes() + np.ascontiguousarray(y).tobytes()).hexdigest()
    preprocess_inputs = _inputs(client.get_run(children["preprocess"].info.run_id))
    ds, tags = preprocess_inputs["sklearn-digits"]
    assert "sklearn.datasets.load_digits" in ds.source
    assert ds.digest == raw[:32]
    assert tags["tierflow.digest"] == raw
    assert tags["mlflow.data.context"] == "source"


def test_registered_model_version_points_at_the_train_run(lineage: Lineage) -> None:
    [version] = lineage.client.search_model_versions(f"name = '{MODEL}'")
    train_run = lineage.children["train"]
    assert version.run_id == train_run.info.run_id
    assert version.tags["tierflow.digest"] == lineage.run.records["train"].artifact.digest
    assert version.status == "READY"
    assert train_run.data.tags["tierflow.model_version"] == version.version
    assert lineage.parent.data.tags["tierflow.model_name"] == MODEL
    assert lineage.parent.data.tags["tierflow.model_version"] == version.version
    # The weights went through the server's proxied artifact store, not a client-side path.
    assert list((lineage.server.root / "artifacts").rglob("model.safetensors"))


def test_registered_model_loads_through_the_server_and_predicts(lineage: Lineage) -> None:
    [version] = lineage.client.search_model_versions(f"name = '{MODEL}'")
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rows = x[:50].astype(np.float32)  # raw pixel intensities: the model carries its scaler
    mlflow.set_tracking_uri(lineage.server.url)  # restored after the module
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}/{version.version}")
    predictions = np.asarray(model.predict(rows))
    assert predictions.shape == (50,)
    assert set(np.unique(predictions)) <= set(range(10))
    # Exactly what the stored artifact predicts, and well above chance.
    stored, _ = from_tensors(ArtifactStore(lineage.store).get(lineage.run.records["train"].artifact))
    assert predictions.tolist() == predict_proba(stored, rows).argmax(1).tolist()
    assert (predictions == y[:50]).mean() >= 0.5


def test_second_run_hits_the_cache_and_registers_no_new_version(lineage: Lineage) -> None:
    client = lineage.client
    before = sorted(v.version for v in client.search_model_versions(f"name = '{MODEL}'"))

    run2 = run_lineage_check(lineage.server, lineage.store)

    assert run2.status == "succeeded"
    assert [r.status for r in run2.records.values()] == ["cached"] * 3
    parent2 = client.get_run(run2.annotations["mlflow_run_id"])
    assert parent2.info.run_id != lineage.parent.info.run_id
    assert parent2.info.status == "FINISHED"
    assert parent2.info.experiment_id == lineage.experiment_id
    children2 = nested_runs(client, lineage.experiment_id, parent2.info.run_id)
    assert sorted(c.info.run_name for c in children2) == sorted(STAGES)
    for child in children2:
        assert child.data.tags["tierflow.cache"] == "hit", child.info.run_name
        assert child.data.tags["tierflow.artifact.digest"] == lineage.run.records[child.info.run_name].artifact.digest
    after = sorted(v.version for v in client.search_model_versions(f"name = '{MODEL}'"))
    assert after == before
    assert parent2.data.tags["tierflow.model_version"] == before[-1]
