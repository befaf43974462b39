"""The actor pool on one 2-CPU node: mixed shapes never deadlock, waiting is bounded, actors stay warm."""

import os
import time

import pytest
import ray
from hypothesis import HealthCheck, given, settings
from ray.cluster_utils import Cluster

from storage import ArtifactStore, StoreConfig
from tests.conftest import ship_by_value, wait_for_resources_released
from tests.integration.pool_dags import Dag, dags, shapes
from workflows import StageFailedError, Workflow, release_warm_actors, stage
from workflows.engine import run_workflow

pytestmark = pytest.mark.integration
ship_by_value(__name__)

GIB = 2**30


@pytest.fixture(scope="module")
def node():
    # Memory is declared so memory requests are a real constraint (Ray would otherwise offer most of RAM).
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "num_gpus": 1, "memory": 2 * GIB, "include_dashboard": False},
    )
    ray.init(address=c.address, log_to_driver=False)
    yield c
    release_warm_actors()
    ray.shutdown()
    c.shutdown()


@pytest.fixture
def store(tmp_path):
    return StoreConfig.from_urls([str(tmp_path / "store")])


def outputs(run, store) -> dict:
    s = ArtifactStore(store)
    return {n: s.get(r.artifact)["v"] for n, r in run.records.items()}


# -- the workflow from the report: preprocess -> 1, 1, 0.5 CPUs -> 0.5 CPUs, on 2 CPUs -----------------
@stage(cpus=1)
def pre() -> dict:
    return {"v": 1}


@stage(cpus=1)
def wide_a(pre: dict) -> dict:
    time.sleep(0.5)
    return {"v": pre["v"] + 1, "pid": os.getpid()}


@stage(cpus=1)
def wide_b(pre: dict) -> dict:
    time.sleep(0.5)
    return {"v": pre["v"] + 2, "pid": os.getpid()}


@stage(cpus=0.5)
def half(pre: dict) -> dict:
    return {"v": pre["v"] + 3, "pid": os.getpid()}


@stage(cpus=0.5)
def last(wide_a: dict, wide_b: dict, half: dict) -> dict:
    return {"v": wide_a["v"] + wide_b["v"] + half["v"]}


def test_mixed_shapes_from_the_report_finish_on_two_cpus(node, store):
    # Before: the 0.5-CPU actor was queued behind two idle 1-CPU actors holding both CPUs, forever.
    wf = Workflow("mixed_shapes", [pre, wide_a, wide_b, half, last])
    run = run_workflow(wf, store_config=store, use_cache=False, keep_warm_s=0, placement_timeout_s=30)
    assert run.status == "succeeded"
    assert ArtifactStore(store).get(run.records["last"].artifact)["v"] == 2 + 3 + 4
    total, avail = wait_for_resources_released()
    assert avail == total


# -- property: any DAG of any feasible shapes finishes, with a sequential run's outputs -------------------
@settings(
    max_examples=int(os.environ.get("TIERFLOW_PROPERTY_EXAMPLES", "6")),
    derandomize=True,  # seeded: CI sees the same DAGs every time
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(dag=dags(shapes(gpus=(0.0, 0.5, 1.0), memory=(None, "512MiB", "1536MiB"))))
def test_random_dags_of_random_shapes_finish_with_sequential_outputs(node, tmp_path_factory, dag: Dag):
    # One store for every example: warm actors of the earlier examples are reused, as in a notebook.
    store = StoreConfig.from_urls([str(tmp_path_factory.getbasetemp() / "dags")])
    run = run_workflow(dag.workflow("random_dag"), store_config=store, use_cache=False, placement_timeout_s=30)
    assert run.status == "succeeded"
    assert outputs(run, store) == dag.expected()


# -- bounded waiting ----------------------------------------------------------------------------------------
@ray.remote(num_cpus=2)
class Squatter:
    def ping(self) -> str:
        return "here"


@stage(cpus=1)
def needs_a_cpu() -> dict:
    return {"v": 1}


def test_an_actor_ray_cannot_place_fails_naming_the_request_and_who_holds_the_cluster(node, store):
    release_warm_actors()  # earlier tests' parked actors would keep the squatter from starting
    squatter = Squatter.remote()  # holds both CPUs: not ours, so the pool cannot end it
    ray.get(squatter.ping.remote())
    try:
        t0 = time.monotonic()
        with pytest.raises(StageFailedError) as err:
            run_workflow(Workflow("squatted", [needs_a_cpu]), store_config=store, placement_timeout_s=1.5)
        waited = time.monotonic() - t0
    finally:
        ray.kill(squatter)
    text = str(err.value)
    assert "needs_a_cpu" in text and "cpus=1" in text and "1.5 s" in text
    assert "in all, {CPU=0," in text  # nothing free
    assert "other jobs, actors or Serve replicas hold {CPU=2" in text
    assert "--placement-timeout-s" in text
    assert waited < 30
    total, avail = wait_for_resources_released()
    assert avail == total  # the pending actor request was withdrawn


# -- warm across runs ----------------------------------------------------------------------------------------
@stage(cpus=1)
def c0() -> dict:
    return {"v": 1, "pid": os.getpid()}


@stage(cpus=1)
def c1(c0: dict) -> dict:
    return {"v": c0["v"] + 1, "pid": os.getpid()}


@stage(cpus=0.5)
def other(c0: dict) -> dict:
    return {"v": 0, "pid": os.getpid()}


def test_a_second_run_in_the_same_process_reuses_the_warm_actors_and_they_end_when_idle(node, store):
    chain = Workflow("warm_chain", [c0, c1])
    first = run_workflow(chain, store_config=store, use_cache=False, keep_warm_s=2)
    second = run_workflow(chain, store_config=store, use_cache=False, keep_warm_s=2)
    pids = {r.result.pid for r in first.records.values()}
    assert len(pids) == 1 and {r.result.pid for r in second.records.values()} == pids  # no new process
    # Idle for longer than keep_warm_s: the reaper ends them without anyone asking.
    time.sleep(4)
    total, avail = ray.cluster_resources(), ray.available_resources()
    assert avail.get("CPU") == total["CPU"]
    third = run_workflow(chain, store_config=store, use_cache=False, keep_warm_s=0)
    assert {r.result.pid for r in third.records.values()}.isdisjoint(pids)


def test_a_run_of_other_shapes_ends_the_parked_actors_it_does_not_use(node, store):
    run_workflow(Workflow("warm_a", [c0, c1]), store_config=store, use_cache=False, keep_warm_s=60)
    assert ray.available_resources().get("CPU") == 1  # one warm 1-CPU actor parked
    only_half = Workflow("warm_b", [stage(cpus=0.5, name="c0")(c0.fn), stage(cpus=0.5, name="other")(other.fn)])
    run_workflow(only_half, store_config=store, use_cache=False, keep_warm_s=60)
    # The 1-CPU actor went when the 0.5-CPU run started; its own 0.5-CPU actor is parked now.
    deadline = time.monotonic() + 10
    while ray.available_resources().get("CPU") != 1.5 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU") == 1.5
    assert release_warm_actors() == 1


def _quick(i: int):
    return stage(cpus=1, name=f"quick{i}")(lambda: {"v": i})


def test_a_run_whose_stages_are_done_does_not_wait_for_an_actor_it_no_longer_needs(node, store):
    release_warm_actors()
    squatter = Squatter.options(num_cpus=1).remote()  # one of the two CPUs: a second actor stays unplaced
    ray.get(squatter.ping.remote())
    try:
        t0 = time.monotonic()
        run = run_workflow(Workflow("served_by_one", [_quick(i) for i in range(3)]), store_config=store,
                           use_cache=False, placement_timeout_s=60)  # fmt: skip
        took = time.monotonic() - t0
    finally:
        ray.kill(squatter)
    assert run.status == "succeeded"
    assert len({r.result.pid for r in run.records.values()}) == 1  # one placed actor ran all three
    assert took < 30, took  # it waited out the 60 s placement timeout for the unplaced second actor
