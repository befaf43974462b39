"""Placement on a cluster that autoscales: Ray's fake multi-node provider with the node types of cluster.yaml.

The head is `RAY_FAKE_CLUSTER=1 ray start --head --block --autoscaling-config=<derived config>` in a
session and process group of its own; the autoscaler (v1, Ray's default) launches "nodes" as local
raylets. Teardown ends that group and what it spawned, by pid (test_job_submit's `stop_process_group`),
never `ray stop`. The config keeps cluster.yaml's worker types, scaled to 2 cores: head CPU 1, worker_cpu
CPU 1 (max 2), worker_gpu CPU 1 GPU 1 accelerator_type:A10G 1 (max 1), idle timeout 0.1 min.

Autoscaler v1 does not publish its node types in the GCS ClusterConfig (checked here: it stays empty),
so the driver is told them as a user of a `ray up` cluster would be: `cluster_types` from the same file.
Set TF_KEEP_FAKE=1 to keep the head's temp dir (the autoscaler's monitor.log) after the module.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import ray._private.state
import yaml
from mlflow import MlflowClient
from rich.console import Console

from actors.placement import cluster_from_yaml
from actors.ray_api import autoscaler_status, cluster_nodes, published_node_types
from storage import StoreConfig
from tests.conftest import ship_by_value
from tests.fixtures import autoscale_workflows as wfs
from tests.integration.test_job_submit import (
    RAY,
    _describe,
    _group_members,
    auth_token,
    base_env,
    free_ports,
    stop_process_group,
)
from workflows.cli import main
from workflows.engine import run_workflow
from workflows.errors import StageFailedError
from workflows.lineage import MLflowHook
from workflows.progress import ProgressHook
from workflows.runs import show_run
from workflows.summary import COLUMNS, stage_rows

pytestmark = pytest.mark.integration

PROJECT = Path(__file__).resolve().parents[2]
HEAD_TYPE = "ray.head.default"  # the fake provider tags its head with this type
IDLE_TIMEOUT_MIN = 0.1  # Ray's schema takes a number; the autoscaler multiplies it by 60
SCALED = {  # cluster.yaml's types, scaled to fit 2 cores
    "worker_cpu": ({"CPU": 1}, 2),
    "worker_gpu": ({"CPU": 1, "GPU": 1, "accelerator_type:A10G": 1}, 1),
}
_PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port")
_PORT_FLAGS += ("--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")


def derived_config(gcs_port: int) -> dict:
    """cluster.yaml with its provider swapped for fake_multinode and its node types scaled down."""
    real = yaml.safe_load((PROJECT / "cluster.yaml").read_text())
    cfg = copy.deepcopy(real)
    for key in ("auth", "head_start_ray_commands", "worker_start_ray_commands", "setup_commands"):
        cfg[key] = [] if key.endswith("commands") else {"ssh_user": "ray"}
    cfg.update(head_setup_commands=[], worker_setup_commands=[], initialization_commands=[], file_mounts={})
    cfg.update(cluster_synced_files=[], file_mounts_sync_continuously=False, rsync_exclude=[], rsync_filter=[])
    # As Ray's own fake-multinode example (not in the wheel): no SSH updaters (the fake nodes are up when
    # started and their tags are read-only), and load metrics keyed by node id, the fake nodes' "ip", without
    # which no node is ever found idle.
    cfg["provider"] = {
        "type": "fake_multinode",
        "gcs_address": f"127.0.0.1:{gcs_port}",
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
        "use_node_id_as_ip": True,
    }
    cfg["idle_timeout_minutes"] = IDLE_TIMEOUT_MIN
    types = {HEAD_TYPE: {"resources": {"CPU": 1}, "min_workers": 0, "max_workers": 0, "node_config": {}}}
    for name, (resources, max_workers) in SCALED.items():
        assert name in real["available_node_types"], f"cluster.yaml lost node type {name}"
        types[name] = {"resources": resources, "min_workers": 0, "max_workers": max_workers, "node_config": {}}
    cfg["available_node_types"], cfg["head_node_type"] = types, HEAD_TYPE
    cfg["max_workers"] = sum(m for _, m in SCALED.values())
    return cfg


class FakeCluster:
    def __init__(self, proc: subprocess.Popen, address: str, config: Path, temp_dir: Path) -> None:
        self.proc, self.address, self.config, self.temp_dir = proc, address, config, temp_dir

    def types_by_node(self) -> dict[str, str]:
        report = (autoscaler_status() or {}).get("autoscaler_report") or {}
        return dict(report.get("node_type_mapping") or {})

    def alive_of_type(self, node_type: str) -> list[str]:
        mapping = self.types_by_node()
        return [n.node_id for n in cluster_nodes() if mapping.get(n.node_id) == node_type]

    def logs(self) -> str:
        out = []
        for name in ("monitor.log", "monitor.err"):
            for f in sorted(self.temp_dir.glob(f"session_*/logs/{name}")):
                out.append(f"--- {f}\n{f.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)


@pytest.fixture(scope="module")
def cluster() -> Iterator[FakeCluster]:
    auth_token()
    ports = free_ports(len(_PORT_FLAGS) + 1)
    temp_dir = Path(tempfile.mkdtemp(prefix="tf-as-"))  # short: Ray's unix sockets live under it
    config = temp_dir / "autoscaling.yaml"
    config.write_text(yaml.safe_dump(derived_config(ports[0])))
    env = base_env() | {
        "RAY_FAKE_CLUSTER": "1",
        "RAY_AUTH_MODE": "token",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",  # the default 5 s per autoscaler round would triple the wall time
        "AUTOSCALER_METRIC_PORT": str(ports[-1]),
        "PYTHONPATH": str(PROJECT),  # workers on every fake node import this tree's tierflow
    }
    cmd = [RAY, "start", "--head", "--block", "--num-cpus", "1", "--include-dashboard", "false"]
    cmd += ["--disable-usage-stats", "--temp-dir", str(temp_dir), f"--autoscaling-config={config}"]
    for flag, port in zip(_PORT_FLAGS, ports, strict=False):
        cmd += [flag, str(port)]
    log = (temp_dir / "head.log").open("wb")
    proc = subprocess.Popen(
        cmd, env=env, cwd=temp_dir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    fake = FakeCluster(proc, f"127.0.0.1:{ports[0]}", config, temp_dir)
    try:
        ship_by_value(wfs.__name__)
        deadline = time.monotonic() + 60
        while not ray.is_initialized():
            assert proc.poll() is None, (temp_dir / "head.log").read_text()
            try:
                ray.init(address=fake.address, log_to_driver=False)
            except (ConnectionError, RuntimeError):
                assert time.monotonic() < deadline, "the head did not come up in 60 s"
                time.sleep(0.5)
        while autoscaler_status() is None:  # the monitor publishes once its first round is done
            assert time.monotonic() < deadline, f"no autoscaler status in 60 s\n{fake.logs()}"
            time.sleep(0.5)
        yield fake
    finally:
        ray.shutdown()
        _outside, unkillable = stop_process_group(proc)
        log.close()
        if not os.environ.get("TF_KEEP_FAKE"):
            shutil.rmtree(temp_dir, ignore_errors=True)
        assert not unkillable, f"processes of the fake cluster survived:\n{_describe(unkillable)}"
        assert not _group_members(proc.pid)


def _validate(config: Path, target: str, capsys: pytest.CaptureFixture) -> dict[str, str]:
    """stage -> decision label, as `tierflow validate --cluster-yaml` prints them."""
    capsys.readouterr()
    assert main(["validate", target, "--cluster-yaml", str(config)]) == 0
    out = capsys.readouterr().out
    return {m[1]: m[2] for line in out.splitlines() if (m := re.match(r"(\w+): .+? -> .+?  \[(.+?)\]", line))}


def _pending_actors() -> list[str]:
    states = ("PENDING_CREATION", "DEPENDENCIES_UNREADY")
    return [a["ActorID"] for a in ray._private.state.actors().values() if a["State"] in states]


def _wait_until(what: str, check, timeout_s: float, cluster: FakeCluster) -> float:
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout_s, f"{what} not within {timeout_s} s\n{cluster.logs()}"
        time.sleep(0.5)
    return time.monotonic() - t0


def test_the_gpu_stage_waits_for_a_launched_a10g_node_and_the_node_goes_when_idle(cluster, tmp_path, capsys):
    assert published_node_types() == []  # autoscaler v1 publishes no ClusterConfig: hence --cluster-yaml
    assert cluster.alive_of_type("worker_gpu") == []
    target = "tests/fixtures/autoscale_workflows.py:pipeline"
    offline = _validate(cluster.config, target, capsys)
    assert offline == {
        "featurize": "fits as declared",
        "fit": "waits for a launchable node of type worker_gpu",
        "score": "fits as declared",
    }
    out = io.StringIO()
    hook = MLflowHook(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = run_workflow(
        wfs.pipeline(),
        store_config=StoreConfig.from_urls([str(tmp_path / "store")]),
        hooks=[ProgressHook(Console(file=out, width=200)), hook],
        keep_warm_s=0,
        node_wait_s=90,
        cluster_types=cluster_from_yaml(yaml.safe_load(cluster.config.read_text()))[1],
    )
    assert run.status == "succeeded", {n: r.error for n, r in run.records.items()}
    assert {n: r.decision.label for n, r in run.records.items()} == offline  # validate and the run agree

    fit = run.records["fit"]
    gpu_nodes = cluster.alive_of_type("worker_gpu")
    assert fit.result.node_id in gpu_nodes, (fit.result.node_id, cluster.types_by_node())
    assert not fit.decision.fallback_used and fit.decision.effective.gpus == 1
    assert fit.result.gpu_ids, "Ray assigned the stage no GPU"
    assert "waiting   fit for a node of type worker_gpu since " in out.getvalue()
    client = MlflowClient(hook.tracking_uri)
    (child,) = client.search_runs([hook.experiment_id], "tags.`tierflow.stage` = 'fit'")
    tags = child.data.tags
    assert tags["tierflow.node_id"] == fit.result.node_id
    assert tags["tierflow.placement"] == "waits for a launchable node of type worker_gpu"
    assert tags["tierflow.fallback"] == "false"
    assert run.records["score"].result.node_id not in gpu_nodes  # the GPU node's CPU is not the default
    rows = {row[0]: row for row in stage_rows(run)}  # the run summary's table
    assert rows["fit"][COLUMNS.index("placement")] == "waits for a launchable node of type worker_gpu"
    shown = io.StringIO()
    show_run(StoreConfig.from_urls([str(tmp_path / "store")]), run.run_id, Console(file=shown, width=250))
    assert "waits for a launchable node of type worker_gpu" in shown.getvalue()  # `tierflow show`

    # The pool ended the idle actor with the run, so the autoscaler takes the node back after its idle timeout.
    took = _wait_until("the worker_gpu node released", lambda: not cluster.alive_of_type("worker_gpu"), 60, cluster)
    print(f"worker_gpu node released {took:.1f} s after the run (idle timeout {IDLE_TIMEOUT_MIN * 60:g} s)")


def test_a_fan_out_brings_cpu_workers_up_and_lets_them_go(cluster, tmp_path, capsys):
    before = set(cluster.alive_of_type("worker_cpu"))
    run = run_workflow(
        wfs.fan_out(),
        store_config=StoreConfig.from_urls([str(tmp_path / "store")]),
        keep_warm_s=0,
        use_cache=False,
        node_wait_s=90,
        cluster_types=cluster_from_yaml(yaml.safe_load(cluster.config.read_text()))[1],
    )
    assert run.status == "succeeded", {n: r.error for n, r in run.records.items()}
    assert {r.decision.label for r in run.records.values()} == {"fits as declared"}  # the head fits one
    offline = _validate(cluster.config, "tests/fixtures/autoscale_workflows.py:fan_out", capsys)
    assert offline == {n: r.decision.label for n, r in run.records.items()}
    mapping = cluster.types_by_node()
    used = {r.result.node_id for r in run.records.values()}
    launched = {n for n in used if mapping.get(n) == "worker_cpu"} - before
    assert launched, f"every shard ran on {[mapping.get(n, n) for n in used]}: no worker_cpu came up"
    assert _pending_actors() == []  # the drained pool asks for nothing more
    took = _wait_until("worker_cpu nodes released", lambda: not cluster.alive_of_type("worker_cpu"), 60, cluster)
    print(f"{len(launched)} worker_cpu nodes used; all released {took:.1f} s after the run")


def _stale_config(cluster: FakeCluster) -> dict:
    """A config that names a type the running autoscaler does not have: a stale cluster.yaml."""
    stale = yaml.safe_load(cluster.config.read_text())
    spec = {"resources": {"CPU": 1, "tpu": 1}, "min_workers": 0, "max_workers": 1, "node_config": {}}
    stale["available_node_types"]["worker_tpu"] = spec
    return stale


def test_a_stage_waiting_for_a_node_that_never_comes_fails_within_node_wait_s(cluster, tmp_path, capsys):
    stale = _stale_config(cluster)
    (tmp_path / "stale.yaml").write_text(yaml.safe_dump(stale))
    offline = _validate(tmp_path / "stale.yaml", "tests/fixtures/autoscale_workflows.py:needs_tpu", capsys)
    assert offline == {"on_tpu": "waits for a launchable node of type worker_tpu"}
    node_wait_s = 5.0
    t0 = time.monotonic()
    with pytest.raises(StageFailedError) as err:
        run_workflow(
            wfs.needs_tpu(),
            store_config=StoreConfig.from_urls([str(tmp_path / "store")]),
            keep_warm_s=0,
            node_wait_s=node_wait_s,
            placement_timeout_s=300,  # not what ends this wait
            cluster_types=cluster_from_yaml(stale)[1],
        )
    took = time.monotonic() - t0
    assert node_wait_s <= took < node_wait_s + 10, took
    text = str(err.value)
    for part in ("worker_tpu", "--node-wait-s=5", "cpus=1 tpu=1", "the autoscaler reported", "it has not tried"):
        assert part in text, text
    assert json.dumps(_pending_actors()) == "[]"  # the failed run left no actor request behind
    assert err.value.stage == "on_tpu"


def test_the_cli_shows_the_wait_and_exits_1_when_the_node_never_comes(cluster, tmp_path):
    (tmp_path / "stale.yaml").write_text(yaml.safe_dump(_stale_config(cluster)))
    cmd = ["-m", "workflows", "run", f"{PROJECT}/tests/fixtures/autoscale_workflows.py:needs_tpu"]
    cmd += ["--address", cluster.address, "--cluster-yaml", "stale.yaml", "--node-wait-s", "4"]
    cmd += ["--store", str(tmp_path / "store"), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    env = base_env() | {"RAY_AUTH_MODE": "token", "PYTHONPATH": str(PROJECT)}
    p = subprocess.run(
        [sys.executable, *cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    out = p.stdout + p.stderr
    assert p.returncode == 1, out
    assert re.search(r"waiting +on_tpu for a node of type worker_tpu since \d\d:\d\d:\d\d", out), out
    assert "no node of type worker_tpu came within --node-wait-s=4 s" in out, out
