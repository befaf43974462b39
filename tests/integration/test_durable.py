"""Durable runs under injected faults: killed actors, lost nodes, a SIGKILLed driver, Ctrl-C, timeouts."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
from mlflow import MlflowClient
from ray.cluster_utils import Cluster

from storage import ArtifactStore, StoreConfig
from tests.conftest import ship_by_value, wait_for_resources_released
from workflows import StageFailedError, Workflow, stage
from workflows.engine import run_workflow
from workflows.journal import Journals

pytestmark = pytest.mark.integration
ship_by_value(__name__)
REPO = Path(__file__).resolve().parents[2]
FIXTURE = "tests/fixtures/durable_workflows.py:chain"


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    spots = [c.add_node(num_cpus=1, resources={"spot": 1}) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield {"cluster": c, "spots": spots}
    ray.shutdown()
    c.shutdown()


def count(workdir: Path, name: str) -> int:
    p = workdir / f"{name}.count"
    return len(p.read_text().splitlines()) if p.exists() else 0


def wait_for(path: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.05)


def store_at(tmp_path: Path, name: str = "store") -> StoreConfig:
    return StoreConfig.from_urls([str(tmp_path / name)])


def no_partial_files(store_dir: Path) -> bool:
    return not [p for p in store_dir.rglob(".tmp-*")]


@stage(cpus=1)
def source() -> dict:
    return {"values": list(range(10))}


@stage(cpus=1, retry_backoff_s=0.1)
def victim(source: dict, workdir: str) -> dict:
    (Path(workdir) / "victim.pid").write_text(str(os.getpid()))
    if not (Path(workdir) / "victim.killed").exists():
        time.sleep(60)  # the test kills this process now
    return {"squares": [v * v for v in source["values"]]}


@stage(cpus=1)
def total(victim: dict) -> dict:
    return {"sum": sum(victim["squares"])}


def test_killed_actor_is_retried_and_the_outputs_match_a_clean_run(cluster, tmp_path):
    wf = Workflow("kill_actor", [source, victim, total])
    work = tmp_path / "w"
    work.mkdir()
    box: dict = {}
    t = threading.Thread(
        target=lambda: box.setdefault(
            "run", run_workflow(wf, params={"workdir": str(work)}, store_config=store_at(tmp_path))
        )
    )
    t.start()
    wait_for(work / "victim.pid")
    (work / "victim.killed").write_text("x")
    os.kill(int((work / "victim.pid").read_text()), signal.SIGKILL)  # an actor this test's run started
    t.join(120)
    run = box["run"]
    assert run.status == "succeeded" and run.records["victim"].attempts == 2
    clean = run_workflow(wf, params={"workdir": str(work)}, store_config=store_at(tmp_path, "clean"))
    assert {n: r.artifact.digest for n, r in run.records.items()} == {
        n: r.artifact.digest for n, r in clean.records.items()
    }
    assert no_partial_files(tmp_path / "store")
    total_res, avail = wait_for_resources_released()
    assert avail == total_res


def test_lost_node_reschedules_the_stage_on_a_node_that_fits(cluster, tmp_path):
    @stage(cpus=1, resources={"spot": 1}, retry_backoff_s=0.1)
    def on_spot(workdir: str) -> dict:
        node = ray.get_runtime_context().get_node_id()
        marker = Path(workdir) / f"spot-{node}"
        marker.write_text("x")
        if len(list(Path(workdir).glob("spot-*"))) == 1:
            time.sleep(60)  # first attempt: the test removes this node now
        return {"node": node}

    work = tmp_path / "w"
    work.mkdir()
    box: dict = {}
    t = threading.Thread(
        target=lambda: box.setdefault(
            "run",
            run_workflow(
                Workflow("lose_node", [on_spot]), params={"workdir": str(work)}, store_config=store_at(tmp_path)
            ),
        )
    )
    t.start()
    deadline = time.monotonic() + 60
    while not list(work.glob("spot-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    first = next(work.glob("spot-*")).name.removeprefix("spot-")
    doomed = next(n for n in cluster["spots"] if n.node_id == first)
    cluster["cluster"].remove_node(doomed)
    t.join(180)
    rec = box["run"].records["on_spot"]
    survivor = next(n.node_id for n in cluster["spots"] if n.node_id != first)
    assert rec.status == "succeeded" and rec.attempts >= 2
    assert rec.result.node_id == survivor
    assert ArtifactStore(store_at(tmp_path)).get(rec.artifact) == {"node": survivor}
    assert no_partial_files(tmp_path / "store")
    total_res, avail = wait_for_resources_released()
    assert avail == total_res


def test_always_failing_stage_fails_after_n_attempts(cluster, tmp_path):
    @stage(cpus=1, retries=2, retry_on=(RuntimeError,), retry_backoff_s=0.05)
    def flaky(workdir: str) -> dict:
        with open(Path(workdir) / "flaky.count", "a") as f:
            f.write("x\n")
        raise RuntimeError("upstream service unavailable")

    with pytest.raises(StageFailedError) as info:
        run_workflow(Workflow("flaky", [flaky]), params={"workdir": str(tmp_path)}, store_config=store_at(tmp_path))
    assert "RuntimeError: upstream service unavailable (failed after 3 attempts)" in str(info.value)
    assert count(tmp_path, "flaky") == 3
    total_res, avail = wait_for_resources_released()
    assert avail == total_res


def test_user_errors_are_not_retried_unless_opted_in(cluster, tmp_path):
    @stage(cpus=1, retries=3, retry_on=(OSError,))
    def wrong(workdir: str) -> dict:
        with open(Path(workdir) / "wrong.count", "a") as f:
            f.write("x\n")
        raise KeyError("no column 'label'")

    with pytest.raises(StageFailedError, match="user exceptions are retried only when their type is in retry_on"):
        run_workflow(Workflow("wrong", [wrong]), params={"workdir": str(tmp_path)}, store_config=store_at(tmp_path))
    assert count(tmp_path, "wrong") == 1


def test_timeout_fails_the_stage_by_name_and_frees_its_resources(cluster, tmp_path):
    @stage(cpus=1, timeout_s=2.5, retries=1, retry_on=(TimeoutError,), retry_backoff_s=0.05)
    def hangs(workdir: str) -> dict:  # 2.5 s: a fresh actor on a loaded 2-core machine can take 1 s to start
        with open(Path(workdir) / "hangs.count", "a") as f:
            f.write("x\n")
        time.sleep(300)
        return {}

    t0 = time.monotonic()
    with pytest.raises(StageFailedError) as info:
        run_workflow(Workflow("hangs", [hangs]), params={"workdir": str(tmp_path)}, store_config=store_at(tmp_path))
    assert time.monotonic() - t0 < 30
    assert info.value.stage == "hangs" and "ran longer than timeout_s=2.5 (failed after 2 attempts)" in str(info.value)
    assert count(tmp_path, "hangs") == 2
    total_res, avail = wait_for_resources_released()
    assert avail == total_res


def test_rerun_skips_the_cache_for_a_stage_and_what_depends_on_it(cluster, tmp_path):
    (tmp_path / "victim.killed").write_text("x")
    wf = Workflow("rerun", [source, victim, total])
    params = {"workdir": str(tmp_path)}
    run_workflow(wf, params=params, store_config=store_at(tmp_path))
    again = run_workflow(wf, params=params, store_config=store_at(tmp_path), rerun=["victim"])
    assert {n: r.cache for n, r in again.records.items()} == {"source": "hit", "victim": "miss", "total": "miss"}


def test_a_cache_entry_whose_blob_was_deleted_is_not_a_hit(cluster, tmp_path):
    (tmp_path / "victim.killed").write_text("x")
    wf = Workflow("deleted_blob", [source, victim, total])
    params = {"workdir": str(tmp_path)}
    first = run_workflow(wf, params=params, store_config=store_at(tmp_path))
    digest = first.records["victim"].artifact.digest
    (tmp_path / "store" / "blobs" / digest[:2] / digest).unlink()  # someone cleaned the bucket
    again = run_workflow(wf, params=params, store_config=store_at(tmp_path))
    assert {n: r.cache for n, r in again.records.items()} == {"source": "hit", "victim": "miss", "total": "hit"}
    assert (tmp_path / "store" / "blobs" / digest[:2] / digest).is_file()  # re-created, same content


# -- the driver itself dies ----------------------------------------------------------------------
def driver(cluster, tmp_path: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable,
        "-m",
        "workflows",
        "run",
        FIXTURE,
        "--address",
        cluster["cluster"].address,
        "--store",
        str(tmp_path / "store"),
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        *args,
    ]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def children_by_stage(uri: str, parent_id: str) -> dict[str, list]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("durable_chain")
    out: dict[str, list] = {}
    for c in client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'"):
        out.setdefault(c.info.run_name, []).append(c)
    return out


def test_sigkilled_driver_resumes_without_rerunning_committed_stages(cluster, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    p = driver(cluster, tmp_path, "--run-id", "crash-1", "-p", f"workdir={work}")
    wait_for(work / "slow.started", 120)
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    store = ArtifactStore(store_at(tmp_path))
    journal = Journals(store).read("crash-1")
    assert journal.status == "running" and journal.committed() == ["model"]
    total_res, avail = wait_for_resources_released(30)  # its actors died with it
    assert avail == total_res

    hint = driver(cluster, tmp_path, "-p", f"workdir={work}", "--rerun", "no_such_stage")
    out = hint.communicate(timeout=120)[0]
    assert "Continue it with: tierflow run tests/fixtures/durable_workflows.py:chain --resume crash-1" in out

    (work / "release").write_text("x")
    resumed = driver(cluster, tmp_path, "--resume", "crash-1", "--json")
    out = resumed.communicate(timeout=180)[0]
    assert resumed.returncode == 0, out
    summary = json.loads(out[out.index("{\n") :])
    assert summary["run_id"] == "crash-1" and summary["status"] == "succeeded"
    assert (count(work, "model"), count(work, "slow"), count(work, "final")) == (1, 2, 1)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent_id = journal.annotations["mlflow_run_id"]
    assert summary["mlflow"]["run_id"] == parent_id  # the same parent run continued
    kids = children_by_stage(uri, parent_id)
    assert {n: len(v) for n, v in kids.items()} == {"model": 1, "slow": 1, "final": 1}
    assert MlflowClient(uri).get_run(parent_id).info.status == "FINISHED"
    assert len(MlflowClient(uri).search_model_versions("name = 'durable-model'")) == 1
    assert no_partial_files(tmp_path / "store")

    runs = subprocess.run(
        [sys.executable, "-m", "workflows", "runs", "--store", str(tmp_path / "store")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "crash-1" in runs and "succeeded" in runs and "3/3" in runs
    show = subprocess.run(
        [sys.executable, "-m", "workflows", "show", "crash-1", "--store", str(tmp_path / "store")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = {line.split()[1]: line.split() for line in show.splitlines() if line.startswith("│")}
    assert rows["model"][2:5] == ["│", "succeeded", "│"] and rows["slow"][5] == "1"  # attempts in the resumed driver
    assert "MLflow parent run: " + parent_id in show


def test_ctrl_c_cancels_cleanly_and_the_run_can_be_resumed(cluster, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    p = driver(cluster, tmp_path, "--run-id", "cancel-1", "-p", f"workdir={work}")
    wait_for(work / "slow.started", 120)
    p.send_signal(signal.SIGINT)
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 130, out
    journal = Journals(ArtifactStore(store_at(tmp_path))).read("cancel-1")
    assert journal.status == "cancelled" and journal.stages["slow"].status == "cancelled"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert MlflowClient(uri).get_run(journal.annotations["mlflow_run_id"]).info.status == "KILLED"
    total_res, avail = wait_for_resources_released(30)
    assert avail == total_res
    (work / "release").write_text("x")
    resumed = driver(cluster, tmp_path, "--resume", "cancel-1")
    out = resumed.communicate(timeout=180)[0]
    assert resumed.returncode == 0, out
    assert count(work, "model") == 1 and count(work, "final") == 1
