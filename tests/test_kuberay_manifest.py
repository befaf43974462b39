"""deploy/kuberay-rayjob.yaml has what KubeRay's RayJob (ray.io/v1) needs, and agrees with cluster.yaml.

Offline: no Kubernetes here, so the fields KubeRay reads are checked one by one (its CRD schema is not
shipped with Ray); the entrypoint is parsed by tierflow's own CLI parser and its workflow loaded.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from actors.placement import cluster_from_yaml
from workflows.cli import build_parser
from workflows.loader import load_workflow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def job() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "deploy" / "kuberay-rayjob.yaml").read_text())


def _containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    return template["spec"]["containers"]


def _cpus(value: str | int) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)  # "500m" is half a CPU


def _uses_the_token_secret(container: dict[str, Any]) -> bool:
    env = {e["name"]: e for e in container.get("env", [])}
    secret = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
    return env.get("RAY_AUTH_MODE", {}).get("value") == "token" and bool(secret.get("name") and secret.get("key"))


def test_it_is_a_rayjob_that_cleans_up_after_itself(job):
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"].startswith("2.60")
    assert cluster["enableInTreeAutoscaling"] is True
    assert isinstance(cluster["headGroupSpec"]["rayStartParams"], dict)
    for group in cluster["workerGroupSpecs"]:
        assert isinstance(group["rayStartParams"], dict) and group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        # rayStartParams values are strings for KubeRay (it renders them into `ray start` flags)
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())


def test_the_entrypoint_runs_a_workflow_with_tierflow_s_cli(job):
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "workflows"]
    args = build_parser().parse_args(argv[3:])
    assert args.command == "run" and args.node_wait_s > 0
    assert load_workflow(args.workflow).stages  # a workflow tierflow can load
    assert args.cluster_yaml == Path("/app/cluster.yaml")  # the image's copy of the repo's cluster.yaml
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert {"MLFLOW_TRACKING_URI", "TIERFLOW_STORE"} <= env.keys()


def test_every_ray_process_and_the_submitter_get_the_token_from_a_secret(job):
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    containers = _containers(cluster["headGroupSpec"]["template"])
    for group in cluster["workerGroupSpecs"]:
        containers += _containers(group["template"])
    containers += _containers(spec["submitterPodTemplate"])
    assert containers and all(_uses_the_token_secret(c) for c in containers)
    assert _uses_the_token_secret({"env": cluster["autoscalerOptions"]["env"]})
    head = _containers(cluster["headGroupSpec"]["template"])[0]
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert {p["containerPort"] for p in head["ports"]} >= {6379, 8265}


def test_worker_groups_mirror_cluster_yaml_node_types(job):
    """The entrypoint's --cluster-yaml describes these groups: same resources, same max count."""
    _, types = cluster_from_yaml(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    by_name = {t.name.replace("_", "-"): t for t in types}
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert {g["groupName"] for g in groups} == {n for n, t in by_name.items() if t.max_count > 0}
    for group in groups:
        want = by_name[group["groupName"]]
        (container,) = _containers(group["template"])
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert limits == requests, "Ray counts the limits; requests below them oversubscribe the node"
        offered = {"CPU": _cpus(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0))}
        raw = group["rayStartParams"].get("resources")
        offered |= yaml.safe_load(yaml.safe_load(raw)) if raw else {}
        assert {k: v for k, v in offered.items() if v} == want.resources, group["groupName"]
        assert group["maxReplicas"] == want.max_count
    gpu = next(g for g in groups if "nvidia.com/gpu" in _containers(g["template"])[0]["resources"]["limits"])
    assert gpu["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
