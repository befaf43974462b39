"""Two nodes on one machine (ray.cluster_utils.Cluster): a CPU head and a node with a declared T4 GPU."""

import pytest
import ray
from ray.cluster_utils import Cluster

from actors.ray_api import cluster_nodes
from storage import ArtifactStore, StoreConfig
from workflows import UnsatisfiableResourcesError, Workflow, stage
from workflows.builtin.digits import evaluate, preprocess, train
from workflows.engine import run_workflow

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    gpu_node = cluster.add_node(num_cpus=2, num_gpus=1, resources={"accelerator_type:T4": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield {"head": cluster.head_node.node_id, "gpu": gpu_node.node_id}
    ray.shutdown()
    cluster.shutdown()


def test_training_lands_on_the_gpu_node_and_preprocessing_on_the_cpu_node(two_nodes, tmp_path):
    store = StoreConfig.from_urls([str(tmp_path / "store")])
    wf = Workflow("digits_train", [preprocess, train, evaluate])
    run = run_workflow(wf, params={"train.epochs": 8, "evaluate.threshold": 0.8}, store_config=store)
    recs = run.records
    assert recs["train"].result.node_id == two_nodes["gpu"]
    assert recs["train"].result.gpu_ids == [0] and recs["train"].result.cuda_visible_devices == "0"
    assert not recs["train"].decision.fallback_used
    assert recs["preprocess"].result.node_id == two_nodes["head"]
    assert recs["preprocess"].result.gpu_ids == []
    assert ArtifactStore(store).get(recs["evaluate"].artifact)["accuracy"] >= 0.8


def test_requests_are_checked_per_node_not_against_the_cluster_total(two_nodes, tmp_path):
    @stage(cpus=3)
    def wide() -> dict:
        return {}

    assert sum(n.resources["CPU"] for n in cluster_nodes()) == 4  # 4 in total, but 2 per node
    with pytest.raises(UnsatisfiableResourcesError) as info:
        run_workflow(Workflow("wide", [wide]), store_config=StoreConfig.from_urls([str(tmp_path / "s")]))
    assert str(info.value).count("offers {CPU=2") == 2
