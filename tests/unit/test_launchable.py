"""Placement against alive nodes *and* the node types the autoscaler can launch: pure, no cluster."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given, seed, settings
from hypothesis import strategies as st
from ray.core.generated import autoscaler_pb2

from actors.autoscaler import report_text, types_from_cluster_config, with_running
from actors.placement import NodeInfo, NodeType, capacity, cluster_from_yaml, decide
from actors.resources import Resources
from workflows.cli import main
from workflows.errors import WorkflowDefinitionError
from workflows.model import Workflow, stage
from workflows.node_wait import NodeWaits

HEAD = NodeInfo("head", {"CPU": 4.0, "node:__internal_head__": 1.0}, address="10.0.0.1")
CPU_T = NodeType("worker_cpu", {"CPU": 16.0}, max_count=8)
GPU_T = NodeType("worker_gpu", {"CPU": 4.0, "GPU": 1.0, "accelerator_type:A10G": 1.0}, max_count=2)
A10G = Resources(cpus=1, gpus=1, accelerator_type="A10G", fallback="cpu")


def test_a_gpu_stage_waits_for_a_launchable_gpu_node_instead_of_falling_back():
    d = decide("train", A10G, [HEAD], [CPU_T, GPU_T])
    assert d.feasible and not d.fallback_used and d.effective == A10G
    assert d.waits_for == "worker_gpu" and d.candidate_nodes == ("type:worker_gpu",)
    assert d.label == "waits for a launchable node of type worker_gpu"
    assert "2 more can be launched" in d.reason


def test_fallback_only_when_no_alive_or_launchable_node_fits():
    full = NodeType("worker_gpu", GPU_T.resources, max_count=2, running=2)  # every GPU worker already up
    d = decide("train", A10G, [HEAD], [CPU_T, full])
    assert d.fallback_used and d.waits_for is None and d.effective == Resources(cpus=1)
    assert d.label == "falls back to CPU"


def test_a_running_gpu_node_is_alive_so_the_stage_fits():
    gpu_node = NodeInfo("g1", dict(GPU_T.resources))
    d = decide("train", A10G, [HEAD, gpu_node], [CPU_T, GPU_T])
    assert d.label == "fits as declared" and d.candidate_nodes == ("g1",)


def test_the_cpu_fallback_may_wait_for_a_launchable_cpu_node():
    big = Resources(cpus=8, gpus=1, accelerator_type="H100", fallback="cpu")
    d = decide("train", big, [HEAD], [CPU_T, GPU_T])
    assert d.fallback_used and d.waits_for == "worker_cpu"
    assert d.label == "falls back to CPU, waits for a launchable node of type worker_cpu"


def test_a_cpu_stage_is_expected_on_the_least_equipped_fitting_type():
    d = decide("shard", Resources(cpus=4), [NodeInfo("busy-head", {"CPU": 2.0})], [GPU_T, CPU_T])
    assert d.waits_for == "worker_cpu"  # GPU nodes are kept for what needs them, as the autoscaler does
    assert d.candidate_nodes == ("type:worker_cpu", "type:worker_gpu")


def test_unlimited_types_and_unsatisfiable_requests():
    d = decide("t", Resources(custom={"tpu": 1}), [HEAD], [NodeType("tpus", {"CPU": 1, "tpu": 4}, max_count=-1)])
    assert d.waits_for == "tpus"
    bad = decide("t", Resources(cpus=1, gpus=4), [HEAD], [CPU_T, GPU_T])
    assert not bad.feasible and bad.label == "cannot be placed"
    assert "node type 'worker_gpu' offers {CPU=4, GPU=1, accelerator_type:A10G=1}, launchable (lacks GPU)" in bad.reason
    assert "no nodes are alive and none can be launched" in decide("t", Resources(), [], []).reason


def test_capacity_counts_launchable_nodes_up_to_the_bound():
    assert capacity({"CPU": 1}, [HEAD], 64) == 4
    assert capacity({"CPU": 1}, [HEAD], 64, [CPU_T]) == 64  # 4 + 16 x 8, bounded
    assert capacity({"CPU": 4}, [HEAD], 64, [CPU_T, GPU_T]) == 1 + 4 * 8 + 1 * 2
    assert capacity({"CPU": 1, "GPU": 1}, [HEAD], 64, [CPU_T, GPU_T]) == 2
    assert capacity({"CPU": 1, "GPU": 1}, [HEAD], 64, [NodeType("g", GPU_T.resources, 2, running=2)]) == 0


def test_cluster_yaml_is_the_cluster_right_after_ray_up():
    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "cluster.yaml").read_text())
    alive, types = cluster_from_yaml(config)
    assert [n.node_id for n in alive] == ["type:head_cpu#0"]
    assert {t.name: (t.max_count, t.running, t.launchable) for t in types} == {
        "head_cpu": (0, 0, 0),
        "worker_cpu": (8, 0, 8),
        "worker_gpu": (2, 0, 2),
    }
    config["available_node_types"]["worker_cpu"]["min_workers"] = 1
    config["max_workers"] = 5
    alive, types = cluster_from_yaml(config)
    assert len(alive) == 2 and {t.name: t.launchable for t in types}["worker_cpu"] == 4  # 5 in all, 1 running
    config["head_node_type"] = "nope"
    with pytest.raises(ValueError, match="head_node_type 'nope'"):
        cluster_from_yaml(config)


def test_node_types_from_the_gcs_cluster_config_and_their_running_workers():
    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add(name="worker_gpu", max_count=2)
    group.resources.update({"CPU": 4, "GPU": 1})
    config.node_group_configs.add(name="worker_cpu", max_count=-1).resources.update({"CPU": 16})
    types = types_from_cluster_config(config)
    assert [(t.name, t.resources, t.max_count) for t in types] == [
        ("worker_gpu", {"CPU": 4.0, "GPU": 1.0}, 2),
        ("worker_cpu", {"CPU": 16.0}, -1),
    ]
    alive = [
        HEAD,  # the head counts against no type's max_workers
        NodeInfo("n1", {"CPU": 4.0, "GPU": 1.0, "memory": 1e9}, address="10.0.0.2"),  # matched by resources
        NodeInfo("n2", {"CPU": 16.0}, labels={"ray.io/node-group": "worker_cpu"}),  # by its label
        NodeInfo("n3", {"CPU": 3.0}, address="10.0.0.4"),  # by the autoscaler's mapping (its ip)
    ]
    counted = with_running(types, alive, {"10.0.0.4": "worker_cpu"})
    assert {t.name: (t.running, t.launchable) for t in counted} == {"worker_gpu": (1, 1), "worker_cpu": (2, 1000)}


def test_what_the_autoscaler_reported():
    assert "no autoscaler status" in report_text(None)
    status = {
        "autoscaler_report": {
            "pending_launches": {"worker_gpu": 1},
            "pending_nodes": [["ip1", "worker_gpu", "setting-up"]],
            "failed_nodes": [["ip2", "worker_gpu"]],
            "node_availability_summary": {
                "node_availabilities": {
                    "worker_gpu": {"is_available": False, "unavailable_node_information": {"details": "quota"}}
                }
            },
        },
        "load_metrics_report": {"resource_demand": [[{"CPU": 1, "GPU": 1}, 2]]},
    }
    text = report_text(status, "worker_gpu")
    assert "1 worker_gpu launches queued, 1 worker_gpu nodes starting (setting-up), 1 failed" in text
    assert "worker_gpu is unavailable: quota" in text and "2x {CPU: 1, GPU: 1}" in text
    assert "it has not tried to launch worker_tpu" in report_text(status, "worker_tpu")


def test_node_waits_are_bounded_and_say_what_they_waited_for():
    waits = NodeWaits(limit_s=0.05)
    assert waits.begin(("s",), "worker_gpu", A10G) is not None
    assert waits.begin(("s",), "worker_gpu", A10G) is None  # the clock starts once
    assert waits.expired() == []
    time.sleep(0.06)
    (w,) = waits.expired()
    cause = waits.cause(w, "0 launches queued")
    assert "no node of type worker_gpu came within --node-wait-s=0.05 s" in cause
    assert A10G.describe() in cause and "the autoscaler reported: 0 launches queued" in cause
    waits.end(("s",))
    assert waits.shapes() == set()


def test_max_actors_is_checked():
    @stage
    def one() -> int:
        return 1

    assert Workflow("w", [one]).max_actors == 64
    with pytest.raises(WorkflowDefinitionError, match="max_actors=0 must be a whole number"):
        Workflow("w", [one], max_actors=0)


# -- the policy over many resource mixes x node types ---------------------------------------------
_KEYS = ("CPU", "GPU", "accelerator_type:A10G", "accelerator_type:T4", "tpu")
offers = st.fixed_dictionaries(
    {"CPU": st.integers(1, 16)},
    optional={k: st.integers(1, 4) for k in _KEYS[1:]},
).map(lambda d: {k: float(v) for k, v in d.items()})
node_types = st.lists(st.tuples(offers, st.integers(-1, 3), st.integers(0, 3)), max_size=4).map(
    lambda ts: [NodeType(f"t{i}", r, m, running=min(run, m) if m >= 0 else run) for i, (r, m, run) in enumerate(ts)]
)
alive_nodes = st.lists(offers, max_size=3).map(lambda rs: [NodeInfo(f"n{i}", r) for i, r in enumerate(rs)])


@st.composite
def requests(draw) -> Resources:
    gpus = draw(st.sampled_from([0, 0.5, 1, 2]))
    accel = draw(st.sampled_from([None, "A10G", "T4"])) if gpus else None
    custom = draw(st.sampled_from([{}, {"tpu": 1}]))
    fallback = draw(st.sampled_from([None, "cpu"])) if gpus else None
    return Resources(cpus=draw(st.sampled_from([1, 2, 8])), gpus=gpus, accelerator_type=accel, custom=custom,
                     fallback=fallback)  # fmt: skip


def _fits(want: dict[str, float], have: dict[str, float]) -> bool:
    return all(have.get(k, 0.0) >= v - 1e-9 for k, v in want.items())


@seed(17)
@settings(max_examples=300, deadline=None)
@given(requests(), alive_nodes, node_types)
def test_decisions_follow_alive_then_launchable_then_fallback(req, alive, types):
    d = decide("s", req, alive, types)
    want = req.as_ray_resources()
    open_types = [t for t in types if t.launchable > 0]
    alive_fit = [n.node_id for n in alive if _fits(want, n.resources)]
    type_fit = [t.name for t in open_types if _fits(want, t.resources)]
    if alive_fit:
        assert (d.label, d.candidate_nodes, d.effective) == ("fits as declared", tuple(alive_fit), req)
    elif type_fit:
        assert d.effective == req and not d.fallback_used and d.waits_for in type_fit
        chosen = next(t for t in open_types if t.name == d.waits_for)
        assert all(
            chosen.resources.get("GPU", 0) <= t.resources.get("GPU", 0) for t in open_types if t.name in type_fit
        )
    else:
        cpu = req.cpu_fallback().as_ray_resources() if req.fallback else None
        cpu_alive = cpu is not None and any(_fits(cpu, n.resources) for n in alive)
        cpu_types = [t.name for t in open_types if cpu is not None and _fits(cpu, t.resources)]
        if cpu_alive or cpu_types:
            assert d.fallback_used and d.effective == req.cpu_fallback()
            assert d.waits_for is None if cpu_alive else d.waits_for in cpu_types
        else:
            assert not d.feasible and d.label == "cannot be placed"
    # Launchable capacity only ever adds places.
    assert capacity(want, alive, 64, types) >= capacity(want, alive, 64)
    expected = sum(min(int(n.resources.get(k, 0) // v) for k, v in want.items()) for n in alive)
    expected += sum(min(int(t.resources.get(k, 0) // v) for k, v in want.items()) * t.launchable for t in types)
    assert capacity(want, alive, 64, types) == min(64, expected)


def test_validate_with_a_cluster_yaml_prints_each_decision_and_refuses_a_bad_file(tmp_path, capsys):
    root = Path(__file__).resolve().parents[2]
    target = f"{root}/tests/fixtures/autoscale_workflows.py:pipeline"
    assert main(["validate", target, "--cluster-yaml", str(root / "cluster.yaml")]) == 0
    out = capsys.readouterr().out
    assert "fit: cpus=1 gpus=1 accelerator=A10G fallback=cpu -> " in out
    assert "[waits for a launchable node of type worker_gpu]" in out and "featurize: cpus=1 -> cpus=1  [fits" in out
    (tmp_path / "bad.yaml").write_text("available_node_types: {a: {resources: {CPU: 1}}}\nhead_node_type: b\n")
    assert main(["validate", target, "--cluster-yaml", str(tmp_path / "bad.yaml")]) == 2
    assert "--cluster-yaml" in capsys.readouterr().out
