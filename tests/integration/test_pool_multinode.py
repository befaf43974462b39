"""The pool's no-deadlock property on two nodes of different shapes (a CPU head, a CPU+GPU worker)."""

import os

import pytest
import ray
from hypothesis import HealthCheck, given, settings
from ray.cluster_utils import Cluster

from storage import ArtifactStore, StoreConfig
from tests.conftest import ship_by_value
from tests.integration.pool_dags import Dag, dags, shapes
from workflows import release_warm_actors
from workflows.engine import run_workflow

pytestmark = pytest.mark.integration
ship_by_value(__name__)

GIB = 2**30


@pytest.fixture(scope="module")
def two_nodes():
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "memory": 1 * GIB, "include_dashboard": False},
    )
    c.add_node(num_cpus=2, num_gpus=1, memory=2 * GIB)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    release_warm_actors()
    ray.shutdown()
    c.shutdown()


@settings(
    max_examples=int(os.environ.get("TIERFLOW_PROPERTY_EXAMPLES", "6")),
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(dag=dags(shapes(gpus=(0.0, 0.5, 1.0), memory=(None, "512MiB", "1536MiB"))))
def test_random_dags_finish_across_two_nodes_with_sequential_outputs(two_nodes, tmp_path_factory, dag: Dag):
    # One store for every example: warm actors of the earlier examples are reused, as in a notebook.
    store = StoreConfig.from_urls([str(tmp_path_factory.getbasetemp() / "dags")])
    run = run_workflow(dag.workflow("random_dag2"), store_config=store, use_cache=False, placement_timeout_s=30)
    assert run.status == "succeeded"
    s = ArtifactStore(store)
    assert {n: s.get(r.artifact)["v"] for n, r in run.records.items()} == dag.expected()
    # A shape only the worker offers (2 CPUs, or any GPU or 1.5 GiB) ran there.
    worker = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU"))
    for name, rec in run.records.items():
        res = rec.decision.effective
        if res.gpus or res.cpus > 1 or (res.memory_bytes or 0) > GIB:
            assert rec.result.node_id == worker, name
