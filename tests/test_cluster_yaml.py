"""cluster.yaml is a valid Ray cluster-launcher config and fits tierflow's placement policy.

Offline: no Ray instance, no cloud calls. Ray's validator is used the way `ray up` uses it:
`prepare_config` merges the provider's defaults.yaml (for aws it only reads a file bundled with
Ray, no boto3 / network), then `validate_config` runs the JSON schema plus a few cross-field checks.
Validating the raw YAML is not possible: `validate_config` raises RuntimeError when
`cluster_synced_files` is missing, a field only the defaults supply.

What Ray's validator does NOT catch (so the structural tests below check it themselves):
- per-type `min_workers > max_workers`;
- float resources such as `GPU: 1.0` (draft-07 treats 1.0 as an integer; 0.5 is rejected);
- a missing `cluster_name` (prepare_config fills in "default");
- anything inside `node_config` or unknown `provider` keys (free-form objects).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from actors.placement import decide, nodes_from_cluster_yaml
from actors.resources import Resources

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
ACCEL_PREFIX = "accelerator_type:"


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    with CLUSTER_YAML.open() as f:
        return yaml.safe_load(f)


@pytest.fixture
def config(raw: dict[str, Any]) -> dict[str, Any]:
    # A fresh copy per test: negative tests mutate it, and prepare_config may mutate its input
    # for some providers (local), so never hand it the shared fixture.
    return copy.deepcopy(raw)


def ray_validate(cfg: dict[str, Any]) -> dict[str, Any]:
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def worker_types(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: spec for name, spec in cfg["available_node_types"].items() if name != cfg["head_node_type"]}


def test_validates_against_ray_schema(config: dict[str, Any]) -> None:
    prepared = ray_validate(config)
    assert prepared["provider"]["type"] == "aws"
    assert set(prepared["available_node_types"]) == {"head_cpu", "worker_cpu", "worker_gpu"}


def test_raw_config_without_defaults_is_rejected(config: dict[str, Any]) -> None:
    # Documents why ray_validate() calls prepare_config first.
    with pytest.raises(RuntimeError, match="cluster_synced_files"):
        validate_config(config)


def test_node_types_shape(config: dict[str, Any]) -> None:
    assert config["cluster_name"] == "tierflow"  # checked on the raw YAML: Ray would default it
    types = config["available_node_types"]
    assert set(types) == {"head_cpu", "worker_cpu", "worker_gpu"}
    assert config["head_node_type"] == "head_cpu"

    head = types["head_cpu"]["resources"]
    assert head.get("CPU", 0) >= 1
    assert not head.get("GPU")

    workers = worker_types(config)
    cpu_workers = {n: s for n, s in workers.items() if not s["resources"].get("GPU")}
    gpu_workers = {n: s for n, s in workers.items() if s["resources"].get("GPU", 0) >= 1}
    assert set(cpu_workers) == {"worker_cpu"}
    assert set(gpu_workers) == {"worker_gpu"}
    assert cpu_workers["worker_cpu"]["resources"].get("CPU", 0) >= 1
    assert not any(k.startswith(ACCEL_PREFIX) for k in cpu_workers["worker_cpu"]["resources"])
    assert gpu_workers["worker_gpu"]["resources"].get(f"{ACCEL_PREFIX}A10G", 0) >= 1

    for name, spec in workers.items():
        assert 0 <= spec["min_workers"] <= spec["max_workers"], name
        assert spec["max_workers"] <= config["max_workers"], name
    assert sum(s["max_workers"] for s in workers.values()) <= config["max_workers"]


def test_resource_values_are_ints(config: dict[str, Any]) -> None:
    # Ray's schema lets 1.0 through; the YAML should still say 1.
    for name, spec in config["available_node_types"].items():
        for key, value in spec["resources"].items():
            assert type(value) is int, f"{name}.resources.{key}={value!r}"


def test_start_commands_keep_security_defaults(config: dict[str, Any]) -> None:
    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--dashboard-host=127.0.0.1" in head
    assert "RAY_AUTH_MODE=token" in head
    assert "RAY_AUTH_MODE=token" in workers
    assert "$RAY_HEAD_IP:6379" in workers


def _string_resource(cfg: dict[str, Any]) -> None:
    cfg["available_node_types"]["worker_gpu"]["resources"]["GPU"] = "1"


def _fractional_resource(cfg: dict[str, Any]) -> None:
    cfg["available_node_types"]["worker_gpu"]["resources"]["GPU"] = 0.5


def _missing_node_config(cfg: dict[str, Any]) -> None:
    del cfg["available_node_types"]["worker_cpu"]["node_config"]


def _misspelt_key(cfg: dict[str, Any]) -> None:
    cfg["available_node_types"]["worker_cpu"]["max_worker"] = 8


@pytest.mark.parametrize(
    "break_it", [_string_resource, _fractional_resource, _missing_node_config, _misspelt_key], ids=lambda f: f.__name__
)
def test_broken_config_fails_validation(config: dict[str, Any], break_it) -> None:
    break_it(config)
    with pytest.raises(jsonschema.ValidationError):
        ray_validate(config)


def test_unknown_head_node_type_fails_validation(config: dict[str, Any]) -> None:
    config["head_node_type"] = "head_gpu"
    with pytest.raises(ValueError, match="head_node_type"):
        ray_validate(config)


def test_placement_helper_reads_node_types(config: dict[str, Any]) -> None:
    nodes = nodes_from_cluster_yaml(config)
    assert len(nodes) == 3
    assert {n.node_id for n in nodes} == {"type:head_cpu", "type:worker_cpu", "type:worker_gpu"}


def test_a10g_stage_lands_on_gpu_workers(config: dict[str, Any]) -> None:
    nodes = nodes_from_cluster_yaml(config)
    decision = decide("train", Resources(cpus=1, gpus=1, accelerator_type="A10G"), nodes)
    assert decision.feasible
    assert not decision.fallback_used
    assert decision.candidate_nodes == ("type:worker_gpu",)


def test_h100_stage_is_infeasible(config: dict[str, Any]) -> None:
    nodes = nodes_from_cluster_yaml(config)
    decision = decide("train", Resources(cpus=1, gpus=1, accelerator_type="H100"), nodes)
    assert decision.feasible is False
    assert decision.candidate_nodes == ()
    assert "H100" in decision.reason
