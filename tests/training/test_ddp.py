"""Data-parallel training on a real two-node-capable Ray cluster: a killed worker, a removed node,
SIGTERM + resume, and the MLflow loss curves they leave. One `Cluster` for the module (its start costs
~9 s here); the node-removal test adds and removes its own node."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from mlflow import MlflowClient
from ray.cluster_utils import Cluster

from actors.ddp import DDPConfig
from actors.slab import read_slab, slab_paths
from actors.snapshot import NAMESPACE, Snapshot, keeper_name, latest_durable
from serving.model import from_tensors, predict_proba
from storage import ArtifactStore, StoreConfig
from tests.conftest import ship_by_value
from tests.training import ddp_workflows
from tests.training.ddp_workflows import pinned_train
from workflows import Workflow
from workflows.builtin.digits import _raw_test_rows, preprocess, train
from workflows.engine import run_workflow
from workflows.lineage import MLflowHook
from workflows.loader import load_workflow

pytestmark = pytest.mark.integration
ship_by_value(ddp_workflows.__name__)
REPO = Path(__file__).resolve().parents[2]
EPOCHS = 2
STEPS = EPOCHS * 23  # 1437 training rows -> 718 per rank -> 23 minibatches of 32 per epoch


@pytest.fixture(scope="module")
def cluster():
    """A head offering `coordinator` (where `pinned_train`'s coordinator and keeper run)."""
    head = {"num_cpus": 4, "include_dashboard": False, "resources": {"coordinator": 1}}
    c = Cluster(initialize_head=True, head_node_args=head)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One store and MLflow database for the module, so `preprocess` is a cache hit after the first run."""
    root = tmp_path_factory.mktemp("ddp")
    store = StoreConfig.from_urls([str(root / "store")])
    return {"root": root, "store": store, "uri": f"sqlite:///{root / 'mlflow.db'}"}


@pytest.fixture(scope="module")
def fault_free(cluster, shared):
    """The built-in `train` stage with workers=2: the reference every recovered run is compared to."""
    wf = Workflow("digits_ddp", [preprocess, train])
    params = {"train.workers": 2, "train.epochs": EPOCHS, "train.lr": ddp_workflows.LR}
    run = run_workflow(wf, params=params, store_config=shared["store"])
    rec = run.records["train"]
    return {"digest": rec.artifact.digest, "accuracy": accuracy(shared["store"], run, "train")}


def accuracy(store: StoreConfig, run, stage: str) -> float:
    s = ArtifactStore(store)
    model, _ = from_tensors(s.get(run.records[stage].artifact))
    x, y = _raw_test_rows(s.get(run.records["preprocess"].artifact))
    return float((predict_proba(model, x).argmax(1) == y).mean())


def stage_run(uri: str, parent_id: str, stage: str):
    client = MlflowClient(uri)
    exp = client.get_run(parent_id).info.experiment_id
    query = f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`tierflow.stage` = '{stage}'"
    (child,) = client.search_runs([exp], query)
    return child


def loss_steps(uri: str, run_id: str) -> list[int]:
    return [m.step for m in MlflowClient(uri).get_metric_history(run_id, "loss")]


def keeper_status(run_id: str, stage: str, timeout_s: float = 120) -> dict:
    """Poll the gang's snapshot keeper (a named actor) until it answers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return ray.get(ray.get_actor(keeper_name(run_id, stage), namespace=NAMESPACE).status.remote(), timeout=5)
        except (ValueError, ray.exceptions.RayError):
            time.sleep(0.05)
    raise TimeoutError(f"no snapshot keeper for {run_id}/{stage}")


def slab_step(run_id: str, stage: str) -> int:
    """Steps both ranks have snapshotted into their shared-memory slabs (this host's /dev/shm)."""
    paths = [slab_paths(run_id, stage, r, log_slots=DDPConfig().full_every + 1) for r in (0, 1)]
    return min(max((s["step"] for s in read_slab(p)), default=-1) for p in paths)


def wait_for_step(run_id: str, stage: str, step: int, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while (status := keeper_status(run_id, stage))["step"] < step or len(status["workers"]) < 2:
        if len(status["workers"]) == 2 and slab_step(run_id, stage) >= step:
            break
        assert time.monotonic() < deadline, f"training never reached step {step}: {status}"
        time.sleep(0.02)
    return status


def test_builtin_digits_trains_data_parallel(fault_free, shared):
    assert fault_free["accuracy"] >= 0.9


def test_killed_workers_and_a_lost_node_each_cost_at_most_one_minibatch(cluster, fault_free, shared):
    """One run with the default recovery, two failures mid-epoch: every rank SIGKILLed at once (no survivor:
    the per-step shared-memory snapshots outlive the processes), then removal of one rank's node (its
    snapshots go with it: the survivor hands over its replica)."""
    doomed = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    wf = Workflow("digits_ddp_faults", [preprocess, pinned_train])
    box: dict = {}
    params = {"pinned_train.delay_s": 0.03, "pinned_train.epochs": EPOCHS}
    hook = MLflowHook(shared["uri"])
    t = threading.Thread(
        target=lambda: box.setdefault(
            "run", run_workflow(wf, params=params, run_id="faults-1", store_config=shared["store"], hooks=[hook])
        )
    )
    t.start()
    try:
        status = wait_for_step("faults-1", "pinned_train", 8)  # 23 steps per epoch
        by_node = {w["node_id"]: w for w in status["workers"].values()}
        assert set(by_node) == {cluster.head_node.node_id, doomed.node_id}, status  # SPREAD: a rank per node
        assert status["node_id"] == cluster.head_node.node_id  # the keeper stays with the coordinator
        for w in status["workers"].values():  # microseconds apart: no rank lives to rescue anything
            os.kill(w["pid"], signal.SIGKILL)
        wait_for_step("faults-1", "pinned_train", 30)  # recovered, and mid-way through the second epoch
    finally:
        cluster.remove_node(doomed)
    t.join(120)
    run = box["run"]
    assert run.status == "succeeded"

    child = stage_run(shared["uri"], run.annotations["mlflow_run_id"], "pinned_train")
    recoveries = child.data.tags.get("tierflow.ddp.recoveries")
    assert child.data.metrics["ddp_restarts"] == 2, recoveries
    assert child.data.metrics["ddp_replayed_steps"] <= 1, recoveries
    assert recoveries.count("from shm") == 1 and recoveries.count("from survivor") == 1, recoveries
    # Killed at step ~8 of 46, between full copies (every 16 steps): the gradient log was redone.
    assert re.search(r"from shm \+ \d+ logged steps", recoveries), recoveries
    steps = loss_steps(shared["uri"], child.info.run_id)
    assert steps == list(range(STEPS))  # strictly increasing, no duplicates, none missing
    # Restored state is exact (weights, optimizer, RNG, data position): the same model as without faults.
    assert abs(accuracy(shared["store"], run, "pinned_train") - fault_free["accuracy"]) <= 0.02
    assert run.records["pinned_train"].artifact.digest == fault_free["digest"]


def test_sigterm_writes_a_durable_checkpoint_that_a_resumed_run_continues(cluster, fault_free, shared):
    store_dir = shared["root"] / "store"  # `preprocess` is a cache hit; the checkpoint is found by run id
    store = shared["store"]
    uri = shared["uri"]
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    ref = "tests/training/ddp_workflows.py:sigterm"
    cmd = [sys.executable, "-m", "workflows", "run", ref, "--address", cluster.address]
    cmd += ["--run-id", "sig-1", "--store", str(store_dir), "--tracking-uri", uri]
    cmd += ["-p", "slow_train.delay_s=0.05", "-p", f"slow_train.epochs={EPOCHS}"]
    driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        status = wait_for_step("sig-1", "slow_train", 8)
        os.kill(status["workers"][1]["pid"], signal.SIGTERM)  # a worker this test's run started
        deadline = time.monotonic() + 60
        while (found := latest_durable(ArtifactStore(store), "sig-1", "slow_train")) is None:
            assert time.monotonic() < deadline and driver.poll() is None, "no durable checkpoint after SIGTERM"
            time.sleep(0.05)
    finally:
        driver.send_signal(signal.SIGKILL)  # then the whole job is lost
        driver.wait(30)
    step, manifest = found
    assert 8 <= step < STEPS
    snap = Snapshot.from_tensors(ArtifactStore(store).get(manifest))  # safetensors + JSON, no pickle
    assert snap.world_size == 2 and sorted(snap.losses) == list(range(step))
    assert manifest.format == "safetensors"

    wf = load_workflow(ref)
    run = run_workflow(wf, resume="sig-1", store_config=store, hooks=[MLflowHook(uri)])
    assert run.status == "succeeded" and run.records["preprocess"].restored
    child = stage_run(uri, run.annotations["mlflow_run_id"], "slow_train")
    source, _, resumed_step = child.data.tags["tierflow.ddp.resumed_from"].partition(" step ")
    assert source == "durable" and int(resumed_step) >= step
    assert loss_steps(uri, child.info.run_id) == list(range(STEPS))  # earlier losses came with the checkpoint
    assert run.records["slow_train"].artifact.digest == fault_free["digest"]
    assert np.isfinite(child.data.metrics["loss"])
