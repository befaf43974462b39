"""The engine on a real local Ray with a declared GPU: pinning, concurrency, failures, cache."""

import os
import time
from pathlib import Path

import pytest
import ray

from storage import ArtifactStore, StoreConfig
from tests.conftest import ship_by_value, wait_for_resources_released
from workflows import StageFailedError, UnsatisfiableResourcesError, Workflow, stage
from workflows.engine import run_workflow

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_with_declared_gpu")]
ship_by_value(__name__)


@pytest.fixture
def store(tmp_path):
    return StoreConfig.from_urls([str(tmp_path / "store")])


@stage(cpus=1, gpus=0.5, accelerator_type="T4")
def on_gpu(ctx) -> dict:
    return {
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "device": ctx.device,
    }


def test_gpu_stage_is_pinned_to_the_declared_gpu(store):
    run = run_workflow(Workflow("gpu", [on_gpu]), store_config=store)
    rec = run.records["on_gpu"]
    seen = ArtifactStore(store).get(rec.artifact)
    assert seen["gpu_ids"] == ["0"] and seen["cuda"] == "0"
    # Ray assigned the GPU, but this machine has no CUDA: torch runs on CPU and we record that honestly.
    assert rec.result.gpu_ids == [0] and rec.result.cuda_visible_devices == "0"
    assert rec.result.device == "cpu" and seen["device"] == "cpu"
    assert not rec.decision.fallback_used
    assert rec.result.node_id == ray.get_runtime_context().get_node_id()


@stage(cpus=1)
def left() -> dict:
    start = time.time()
    time.sleep(1.5)
    return {"start": start, "end": time.time()}


@stage(cpus=1)
def right() -> dict:
    start = time.time()
    time.sleep(1.5)
    return {"start": start, "end": time.time()}


@stage(cpus=1)
def join(left: dict, right: dict) -> dict:
    return {"overlap_s": min(left["end"], right["end"]) - max(left["start"], right["start"])}


def test_independent_stages_run_concurrently_and_feed_downstream(store):
    run = run_workflow(Workflow("fan", [left, right, join]), store_config=store)
    overlap = ArtifactStore(store).get(run.records["join"].artifact)["overlap_s"]
    # Run one after the other they would not overlap at all (overlap <= 0); a slow second actor start on a
    # busy machine only shortens the overlap, so any overlap proves they ran concurrently.
    assert overlap > 0.05, f"left and right did not run concurrently (overlap {overlap:.2f}s)"
    assert run.records["left"].result.pid != run.records["right"].result.pid
    # Busy CPU time / wall time: a stage that sleeps is mostly idle.
    utilisation = {m.key: m.value for m in run.records["left"].result.metrics}["utilisation"]
    assert 0 <= utilisation < 0.5


@stage(cpus=1)
def ok() -> dict:
    return {"rows": 7}


@stage(cpus=1)
def explode(ok: dict) -> dict:
    raise ValueError(f"bad row {ok['rows']}")


@stage(cpus=1)
def after(explode: dict) -> dict:
    return explode


def test_a_failing_stage_fails_the_run_and_keeps_committed_work(store):
    with pytest.raises(StageFailedError) as info:
        run_workflow(Workflow("boom", [ok, explode, after]), store_config=store, run_id="boom-1")
    err = info.value
    assert err.stage == "explode" and err.run_id == "boom-1"
    assert "ValueError: bad row 7" in str(err)
    assert 'in explode\n    raise ValueError(f"bad row' in err.traceback  # the user's own frame
    committed = ArtifactStore(store).manifest("boom-1", "ok")
    assert ArtifactStore(store).get(committed) == {"rows": 7}
    assert [m.stage for m in ArtifactStore(store).manifests("boom-1")] == ["ok"]
    total, avail = wait_for_resources_released()
    assert avail == total


def test_unsatisfiable_request_is_refused_before_any_compute(store, tmp_path):
    marker = tmp_path / "ran"

    @stage(cpus=1)
    def first() -> dict:
        marker.write_text("x")
        return {}

    @stage(gpus=2)
    def greedy(first: dict) -> dict:
        return first

    with pytest.raises(UnsatisfiableResourcesError) as info:
        run_workflow(Workflow("greedy", [first, greedy]), store_config=store)
    msg = str(info.value)
    assert "stage 'greedy' asks for {CPU=1, GPU=2}" in msg
    assert "offers {" in msg and "GPU=1" in msg and "(lacks GPU)" in msg
    assert not marker.exists()


def test_accelerator_mismatch_uses_the_cpu_fallback(store):
    @stage(gpus=1, accelerator_type="A100", fallback="cpu")
    def wants_a100(ctx) -> dict:
        return {"gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    run = run_workflow(Workflow("a100", [wants_a100]), store_config=store)
    rec = run.records["wants_a100"]
    assert rec.decision.fallback_used and rec.result.gpu_ids == []
    assert ArtifactStore(store).get(rec.artifact) == {"gpu_ids": []}

    @stage(gpus=1, accelerator_type="A100")
    def strict_a100() -> dict:
        return {}

    with pytest.raises(UnsatisfiableResourcesError, match="accelerator_type:A100"):
        run_workflow(Workflow("a100s", [strict_a100]), store_config=store)


@stage(cpus=0.5, memory="64MiB", resources={"licence": 1})
def licensed() -> dict:
    return {"t": time.time()}


def test_cache_hits_skip_execution_and_no_cache_reruns(store):
    wf = Workflow("cached", [licensed])
    first = run_workflow(wf, store_config=store)
    second = run_workflow(wf, store_config=store)
    again = run_workflow(wf, store_config=store, use_cache=False)
    a, b, c = (r.records["licensed"] for r in (first, second, again))
    assert (a.cache, b.cache, c.cache) == ("miss", "hit", "miss")
    assert b.result is None and b.artifact.digest == a.artifact.digest
    assert c.artifact.digest != a.artifact.digest  # it really ran again (new timestamp)
    assert ArtifactStore(store).manifest(second.run_id, "licensed").run_id == first.run_id


def test_warm_actors_are_reused_for_the_same_shape(store):
    @stage(cpus=1)
    def s1() -> dict:
        return {"pid": os.getpid()}

    @stage(cpus=1)
    def s2(s1: dict) -> dict:
        return {"pid": os.getpid(), "before": s1["pid"]}

    run = run_workflow(Workflow("warm", [s1, s2]), store_config=store, use_cache=False)
    out = ArtifactStore(store).get(run.records["s2"].artifact)
    assert out["pid"] == out["before"]
    total, avail = wait_for_resources_released()
    assert avail == total


@stage(cpus=1)
def produce() -> dict:
    return {"payload": "x" * 1000}


@stage(cpus=1)
def consume(produce: dict, warm: str) -> dict:
    pins = [p.name for p in (Path(warm) / "pins").iterdir()] if (Path(warm) / "pins").exists() else []
    return {"pinned": pins}


def test_a_running_stage_pins_its_inputs_in_the_cache_tiers(tmp_path):
    warm = tmp_path / "warm"
    store = StoreConfig.from_urls([f"{warm}#capacity=1MiB", str(tmp_path / "store")])
    run = run_workflow(Workflow("pins", [produce, consume]), params={"warm": str(warm)}, store_config=store)
    seen = ArtifactStore(store).get(run.records["consume"].artifact)["pinned"]
    assert seen == [run.records["produce"].artifact.digest]  # pinned while consume ran
    assert not list((warm / "pins").rglob("*-*"))  # and released afterwards


def _sibling(i: int):
    @stage(cpus=2, name=f"wide{i}")
    def wide() -> dict:
        time.sleep(0.1)
        return {"pid": os.getpid()}

    return wide


def test_a_fan_out_wider_than_the_cluster_never_asks_for_more_actors_than_fit(store):
    siblings = [_sibling(i) for i in range(7)]
    run = run_workflow(Workflow("wide", siblings), store_config=store, use_cache=False)
    pids = {run.records[s.name].result.pid for s in siblings}
    # 4 CPUs hold two 2-CPU actors: seven stages share at most two processes instead of queueing seven.
    assert 1 <= len(pids) <= 2, pids
    assert all(run.records[s.name].status == "succeeded" for s in siblings)


@stage(cpus=3)
def big() -> dict:
    return {"pid": os.getpid()}


@stage(cpus=2, timeout_s=30)  # fail fast rather than hang if the warm actor never gives way
def other_shape(big: dict) -> dict:
    return {"pid": os.getpid(), "before": big["pid"]}


def test_an_idle_actor_of_another_shape_gives_way_instead_of_starving_the_next_stage(store):
    # Warm `big` holds 3 of 4 CPUs; a 2-CPU actor fits only once it is ended.
    run = run_workflow(Workflow("shapes", [big, other_shape]), store_config=store, use_cache=False)
    out = ArtifactStore(store).get(run.records["other_shape"].artifact)
    assert out["pid"] != out["before"]
