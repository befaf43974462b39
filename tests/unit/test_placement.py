"""Placement decisions and Ray options are pure: tested without a cluster."""

from actors.placement import NodeInfo, capacity, decide, ray_options
from actors.resources import Resources

CPU_NODE = NodeInfo("cpu-node", {"CPU": 8.0, "memory": 16 * 2**30}, address="10.0.0.1")
GPU_NODE = NodeInfo("gpu-node", {"CPU": 4.0, "GPU": 1.0, "accelerator_type:T4": 1.0, "memory": 8 * 2**30})


def test_ray_options_is_the_one_translation():
    res = Resources(cpus=2, gpus=0.5, memory_bytes="1GiB", accelerator_type="T4", custom={"licence": 1})
    assert ray_options(res) == {
        "num_cpus": 2.0,
        "num_gpus": 0.5,
        "memory": 2**30,
        "accelerator_type": "T4",
        "resources": {"licence": 1.0},
    }
    assert ray_options(Resources()) == {"num_cpus": 1.0, "num_gpus": 0.0}


def test_gpu_request_fits_only_the_gpu_node():
    d = decide("train", Resources(cpus=1, gpus=1, accelerator_type="T4"), [CPU_NODE, GPU_NODE])
    assert d.feasible and not d.fallback_used
    assert d.candidate_nodes == ("gpu-node",)
    assert d.ray_options()["accelerator_type"] == "T4"


def test_fallback_to_cpu_when_no_gpu_anywhere():
    d = decide("train", Resources(cpus=2, gpus=1, fallback="cpu"), [CPU_NODE])
    assert d.feasible and d.fallback_used
    assert d.effective == Resources(cpus=2)
    assert "falling back to CPU" in d.reason


def test_fallback_is_not_used_when_a_gpu_exists():
    d = decide("train", Resources(gpus=1, fallback="cpu"), [CPU_NODE, GPU_NODE])
    assert not d.fallback_used and d.effective.gpus == 1


def test_infeasible_request_names_what_was_asked_and_what_each_node_offers():
    d = decide("train", Resources(cpus=1, gpus=2), [CPU_NODE, GPU_NODE])
    assert not d.feasible
    assert "asks for {CPU=1, GPU=2}" in d.reason
    assert "10.0.0.1 offers {CPU=8, memory=16.0GiB} (lacks GPU)" in d.reason
    assert "(lacks GPU)" in d.reason.split(";")[1]
    assert "fallback='cpu'" in d.reason


def test_wrong_accelerator_and_custom_resources_are_infeasible():
    assert not decide("t", Resources(gpus=1, accelerator_type="A100"), [GPU_NODE]).feasible
    assert not decide("t", Resources(custom={"fpga": 1}), [CPU_NODE]).feasible
    assert decide("t", Resources(custom={"fpga": 1}), [NodeInfo("f", {"CPU": 1, "fpga": 2})]).feasible


def test_memory_is_checked():
    assert not decide("t", Resources(memory_bytes="32GiB"), [CPU_NODE, GPU_NODE]).feasible
    assert decide("t", Resources(memory_bytes="12GiB"), [CPU_NODE, GPU_NODE]).candidate_nodes == ("cpu-node",)


def test_no_nodes():
    d = decide("t", Resources(), [])
    assert not d.feasible and "no nodes are alive" in d.reason


def test_capacity_counts_whole_actors_per_node():
    nodes = [NodeInfo("a", {"CPU": 4, "GPU": 1}), NodeInfo("b", {"CPU": 3})]
    assert capacity({"CPU": 2}, nodes) == 3  # 2 on a, 1 on b: halves never add up across nodes
    assert capacity({"CPU": 1, "GPU": 0.5}, nodes) == 2
    assert capacity({"CPU": 0}, nodes, unbounded=16) == 16
    assert capacity({"CPU": 8}, nodes) == 0
