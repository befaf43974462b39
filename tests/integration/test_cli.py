"""The `tierflow` CLI as users run it: exit codes, messages, nothing started on invalid input."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from storage import ArtifactStore, StoreConfig
from tests.conftest import tierflow

REPO = Path(__file__).resolve().parents[2]
FIXTURE = "tests/fixtures/user_workflows.py"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([f"{FIXTURE}:cyclic"], "cycle: "),
        (["digits", "-p", "trian.epochs=3"], "'trian.epochs' matches no stage parameter"),
        (["no_such_workflow"], "unknown workflow 'no_such_workflow'"),
        (["missing/file.py:wf"], "does not exist"),
        ([f"{FIXTURE}:not_a_workflow"], "is a int, not a workflows.Workflow"),
        (["digits", "--run-id", "../x"], "looks like a path"),
    ],
)
def test_invalid_input_exits_2_before_ray_starts(args, needle):
    p = tierflow("run", *args)
    out = p.stdout + p.stderr
    assert p.returncode == 2, out
    assert needle in " ".join(out.split())
    assert "Started a local Ray instance" not in out


def test_unsatisfiable_request_exits_2_naming_the_nodes(tmp_path):
    p = tierflow(
        "run",
        f"{FIXTURE}:greedy",
        "--num-cpus",
        "2",
        "--num-gpus",
        "0",
        "--store",
        str(tmp_path / "store"),
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'm.db'}",
    )
    out = " ".join((p.stdout + p.stderr).split())
    assert p.returncode == 2, out
    assert "stage 'needs_four_gpus' asks for {CPU=1, GPU=4} but no node can satisfy it" in out
    assert "(lacks GPU)" in out
    assert not (tmp_path / "store" / "manifests").exists()  # nothing ran


def test_failing_stage_exits_1_with_traceback_and_keeps_committed_work(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    p = tierflow(
        "run",
        f"{FIXTURE}:failing",
        "--num-cpus",
        "2",
        "--run-id",
        "fail-1",
        "--store",
        str(tmp_path / "store"),
        "--tracking-uri",
        uri,
    )
    out = p.stdout + p.stderr
    assert p.returncode == 1, out
    assert "stage 'crash' failed (run fail-1): RuntimeError: corrupt input with 3 rows" in " ".join(out.split())
    assert "user_workflows.py" in out and "in crash" in out
    store = ArtifactStore(StoreConfig.from_urls([str(tmp_path / "store")]))
    assert store.get(store.manifest("fail-1", "source")) == {"rows": 3}
    client = MlflowClient(uri)
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("user_failing").experiment_id], "tags.`tierflow.run_id` = 'fail-1'"
    )
    assert parent.info.status == "FAILED" and parent.data.tags["tierflow.status"] == "failed"


def test_run_by_path_prints_json_summary(tmp_path):
    p = tierflow(
        "run",
        f"{FIXTURE}:good",
        "--num-cpus",
        "2",
        "--json",
        "--store",
        str(tmp_path / "store"),
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'm.db'}",
    )
    assert p.returncode == 0, p.stdout + p.stderr
    summary = json.loads(p.stdout[p.stdout.index("{\n") :])
    assert summary["status"] == "succeeded"
    assert [(s["stage"], s["status"], s["cache"]) for s in summary["stages"]] == [
        ("source", "succeeded", "miss"),
        ("double", "succeeded", "miss"),
    ]
    assert all(s["node_id"] and s["device"] == "cpu" for s in summary["stages"])


def test_validate_against_cluster_yaml_without_a_cluster():
    p = tierflow("validate", "digits", "--cluster-yaml", "cluster.yaml")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "train: cpus=1 gpus=1 fallback=cpu -> cpus=1 gpus=1" in p.stdout
    assert "is valid" in p.stdout
    bad = tierflow("validate", f"{FIXTURE}:greedy", "--cluster-yaml", "cluster.yaml")
    assert bad.returncode == 2 and "needs_four_gpus" in bad.stdout
