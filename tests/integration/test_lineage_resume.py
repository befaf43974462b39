"""Lineage survives the driver: a stage committed by a SIGKILLed driver is logged to MLflow by the resumed
run exactly as a fault-free run logs it (issue 16)."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from ray.cluster_utils import Cluster

from storage import ArtifactStore, StoreConfig
from workflows.journal import Journals

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
FIXTURE = "tests/fixtures/lineage_workflows.py:chain"
# Differ between any two runs by construction: ids, and what measures wall or CPU time.
_RUN_TAGS = {"mlflow.parentRunId", "tierflow.artifact.producer_run", "tierflow.restored"}
_TIMED = {"duration_s", "utilisation", "energy_j", "energy_cpu_j", "energy_gpu_j", "co2_g", "cost_usd"} | {
    f"profile.{k}" for k in ("duration_s", "cpu_s", "runqueue_wait_s", "peak_rss_bytes")
}  # energy is CPU time x W/core here; rows and bytes of the profile are compared


@pytest.fixture(scope="module")
def cluster():
    # One node, so both runs place every stage on the same node (node id and ip are compared).
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    yield c
    c.shutdown()


def wait_for(check, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} never happened")
        time.sleep(0.05)


def driver(cluster, tmp_path: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "workflows", "run", FIXTURE, "--address", cluster.address]
    cmd += ["--store", str(tmp_path / "store"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def children(client: MlflowClient, parent_id: str) -> dict[str, list]:
    exp = client.get_experiment_by_name("lineage_chain")
    out: dict[str, list] = {}
    for c in client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'"):
        out.setdefault(c.info.run_name, []).append(c)
    return out


def lineage(client: MlflowClient, run) -> dict:
    """Everything MLflow holds about a stage run, minus ids and timings."""
    metrics = {}
    for key in run.data.metrics:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        metrics[key] = [step for step, _ in history] if key in _TIMED else history
    return {
        "status": run.info.status,
        "tags": {k: v for k, v in run.data.tags.items() if k not in _RUN_TAGS},
        "params": run.data.params,
        "metrics": metrics,
        "inputs": sorted(
            (
                d.dataset.name,
                d.dataset.digest,
                d.dataset.source,
                d.dataset.profile,
                sorted((t.key, t.value) for t in d.tags),
            )
            for d in run.inputs.dataset_inputs
        ),
    }


def test_a_resumed_run_logs_a_stage_committed_by_a_killed_driver_as_a_clean_run_does(cluster, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    params = ("-p", f"workdir={work}", "--no-cache")

    (work / "go").write_text("x")
    clean = driver(cluster, tmp_path, "--run-id", "clean-1", *params)
    out = clean.communicate(timeout=180)[0]
    assert clean.returncode == 0, out
    store = ArtifactStore(StoreConfig.from_urls([str(tmp_path / "store")]))
    clean_parent = Journals(store).read("clean-1").annotations["mlflow_run_id"]

    (work / "go").unlink()
    (work / "measure.started").unlink()
    p = driver(cluster, tmp_path, "--run-id", "crash-1", *params)
    wait_for((work / "measure.started").exists, "measure starting")
    # Hold sqlite's write lock: the driver's MLflow hook blocks as soon as `measure` commits, so the
    # kill lands after the commit and before any of the stage's lineage reached MLflow.
    lock = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None, timeout=30)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        (work / "go").write_text("x")
        manifest = tmp_path / "store" / "manifests" / "crash-1" / "measure.json"
        wait_for(manifest.exists, "measure committing")
        time.sleep(1.0)  # the driver is now collecting it, stuck in the hook
        p.send_signal(signal.SIGKILL)  # the driver this test started
        p.wait(30)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    journal = Journals(store).read("crash-1")
    parent = journal.annotations["mlflow_run_id"]
    before = children(client, parent)
    assert set(before) == {"prep"}, "the kill must land before measure reached MLflow"
    prep_child = before["prep"][0].info.run_id
    # A driver killed half-way through logging a stage leaves a child that was never terminated.
    half = client.create_run(
        journal.annotations["mlflow_experiment_id"],
        run_name="measure",
        tags={"mlflow.parentRunId": parent, "tierflow.stage": "measure", "tierflow.status": "succeeded"},
    )

    resumed = driver(cluster, tmp_path, "--resume", "crash-1")
    out = resumed.communicate(timeout=180)[0]
    assert resumed.returncode == 0, out
    # Not re-run: the committed output was restored (one execution by the clean run, one by the killed one).
    assert len((work / "measure.count").read_text().splitlines()) == 2
    after = children(client, parent)
    assert {n: len(v) for n, v in after.items()} == {"prep": 1, "measure": 1, "report": 1}
    assert after["prep"][0].info.run_id == prep_child  # fully logged before the kill: not logged twice
    assert client.get_run(half.info.run_id).info.lifecycle_stage == "deleted"
    restored = after["measure"][0]
    assert restored.data.tags["tierflow.restored"] == "true"

    want = lineage(client, children(client, clean_parent)["measure"][0])
    got = lineage(client, restored)
    assert got == want
    # What the issue found missing, spelled out.
    assert want["metrics"]["loss"] == [(0, 1.5), (1, 0.9), (2, 0.6), (3, 0.45)]
    assert want["metrics"]["train_accuracy"] == [(0, 0.875)]
    assert want["tags"]["model.family"] == "mlp" and want["tags"]["tierflow.cache_key"]
    assert want["tags"]["tierflow.node_id"] not in ("", "-") and want["tags"]["tierflow.device"] == "cpu"
    assert {i[0] for i in want["inputs"]} == {"prep", "raw_digits"}
