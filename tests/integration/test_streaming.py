"""Streaming stages on a real Ray Data pool: overlap, backpressure, commit, cache, barrier mode, errors."""

import time

import numpy as np
import pyarrow as pa
import pytest
import ray

from storage import ArtifactStore, StoreConfig
from tests.conftest import ship_by_value, start_local_ray
from workflows import BatchStream, StageFailedError, Stream, Workflow, stage
from workflows.engine import run_workflow

pytestmark = pytest.mark.integration
ship_by_value(__name__)


@pytest.fixture(scope="module", autouse=True)
def ray_3cpu():
    start_local_ray(num_cpus=3)  # the consumer holds one CPU, the pool gets the rest
    yield
    ray.shutdown()


@pytest.fixture
def store(tmp_path):
    return StoreConfig.from_urls([str(tmp_path / "store")])


@stage(cpus=1, stream=Stream(shards="n", max_workers=1))
def shards(shard: int, n: int = 6, cost_s: float = 0.3) -> pa.Table:
    time.sleep(cost_s)
    return pa.table({"shard": [shard] * 4, "value": np.arange(4) + 10 * shard, "made_at": [time.time()] * 4})


@stage(cpus=1)
def consumer(shards: BatchStream) -> dict:
    seen, arrived = [], []
    for table in shards:
        arrived.append(time.time())
        seen += table["value"].to_pylist()
    return {"values": seen, "first_arrival": arrived[0], "batches": len(arrived)}


def _made_at(store, run) -> list[float]:
    return ArtifactStore(store).get(run.records["shards"].artifact)["made_at"].to_pylist()


def test_the_consumer_reads_before_the_producer_finishes_and_the_stream_is_committed(store):
    run = run_workflow(Workflow("live", [shards, consumer]), store_config=store)
    out = ArtifactStore(store).get(run.records["consumer"].artifact)
    made = _made_at(store, run)
    assert out["first_arrival"] < max(made), "the consumer waited for the whole stream"
    # Committed whole and in shard order, as one Arrow artifact produced by the streaming stage.
    assert out["values"] == [v + 10 * s for s in range(6) for v in range(4)] and out["batches"] == 6
    rec = run.records["shards"]
    assert rec.status == "succeeded" and rec.artifact.stage == "shards" and rec.artifact.schema["num_rows"] == 24
    metrics = {m.key: m.value for m in rec.result.metrics}
    assert metrics["rows"] == 24 and metrics["workers"] == 1 and metrics["batches"] == 6
    assert 0 < metrics["utilisation"] <= 1.0 and metrics["rows_per_s"] > 0
    mine = {m.key: m.value for m in run.records["consumer"].result.metrics}
    assert 0 <= mine["utilisation"] < 1 and mine["shards.wait_s"] > 0 and mine["shards.rows_per_s"] > 0
    # It reads at once: its set-up (stream start to first read, the planner's fixed part) is what waiting is not.
    assert 0 <= mine["shards.setup_runqueue_s"] <= mine["shards.setup_s"] < mine["shards.wait_s"]
    assert run.records["consumer"].inputs["shards"].digest == rec.artifact.digest

    # Re-run: the stream comes from the cache and nothing executes.
    again = run_workflow(Workflow("live", [shards, consumer]), store_config=store)
    assert again.records["shards"].status == "cached" and again.records["consumer"].status == "cached"

    # Re-running only the consumer replays the committed stream: same batches, same values.
    replay = run_workflow(Workflow("live", [shards, consumer]), store_config=store, rerun=["consumer"])
    assert replay.records["shards"].status == "cached" and replay.records["consumer"].status == "succeeded"
    replayed = ArtifactStore(store).get(replay.records["consumer"].artifact)
    assert replayed["values"] == out["values"] and replayed["batches"] == 6


def test_barrier_mode_commits_the_same_bytes_before_the_consumer_starts(store):
    run = run_workflow(Workflow("barrier", [shards, consumer]), store_config=store, streaming=False)
    out = ArtifactStore(store).get(run.records["consumer"].artifact)
    assert out["first_arrival"] > max(_made_at(store, run))
    live = run_workflow(Workflow("barrier", [shards, consumer]), store_config=store, use_cache=False)
    # made_at differs between runs; everything else is identical and in the same order.
    a, b = (ArtifactStore(store).get(r.records["shards"].artifact).drop(["made_at"]) for r in (run, live))
    assert a.equals(b)


@stage(cpus=1, stream=Stream(shards=24, max_workers=1, buffer="6MiB"))
def heavy(shard: int) -> pa.Table:
    return pa.table({"made_at": np.full(250_000, time.time()), "shard": np.full(250_000, shard)})  # 4 MB


@stage(cpus=1)
def slow(heavy: BatchStream) -> dict:
    consumed = []
    for table in heavy:
        consumed.append((time.time(), table["shard"][0].as_py()))
        time.sleep(0.1)
    return {"consumed": consumed}


def test_a_slow_consumer_holds_the_producers_back(store):
    run = run_workflow(Workflow("pressure", [heavy, slow]), store_config=store)
    consumed = ArtifactStore(store).get(run.records["slow"].artifact)["consumed"]
    made = ArtifactStore(store).get(run.records["heavy"].artifact)
    made_at = [made["made_at"][i * 250_000].as_py() for i in range(24)]
    # How far the producer ran ahead: shards made but not yet read, at each read.
    ahead = max(sum(m <= t for m in made_at) - i for i, (t, _) in enumerate(consumed))
    assert [s for _, s in consumed] == list(range(24))
    # Unbounded, the 24 cheap shards would all be made before the third read; a 6 MiB budget holds ~2.
    assert ahead <= 8, f"the producer ran {ahead} shards ahead of the consumer"


@stage(cpus=1, stream=Stream(shards=3, max_workers=1), retries=0)
def breaks(shard: int) -> pa.Table:
    if shard == 1:
        raise ValueError(f"corrupt record in shard {shard}")
    return pa.table({"x": [shard]})


@stage(cpus=1, retries=0)
def reader(breaks: BatchStream) -> int:
    return sum(t.num_rows for t in breaks)


def test_a_failing_shard_fails_the_run_and_commits_no_partial_stream(store):
    with pytest.raises(StageFailedError, match="corrupt record in shard 1") as info:
        run_workflow(Workflow("broken", [breaks, reader]), store_config=store, run_id="broken-1")
    assert info.value.run_id == "broken-1"
    assert ArtifactStore(store).manifests("broken-1") == []


def test_the_builtin_pipeline_streams_features_into_training_with_lineage(store, tmp_path):
    from mlflow import MlflowClient

    from workflows import MLflowHook
    from workflows.builtin.pipeline import pipeline

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    params = {"shards": 3, "rows": 256, "features.cost_s": 0.0, "fit.cost_s": 0.0}
    run = run_workflow(pipeline, params=params, store_config=store, hooks=[MLflowHook(uri)])
    fit, features = run.records["fit"], run.records["features"]
    assert fit.status == "succeeded" and fit.inputs["features"].schema["num_rows"] == 768
    assert [m.step for m in fit.result.metrics if m.key == "loss"] == [0, 1, 2]
    # Both stages' utilisation and throughput reach MLflow; the consumer's input is the stream's digest.
    client = MlflowClient(uri)
    logged = {n: client.get_run(r.annotations["mlflow_run_id"]) for n, r in (("fit", fit), ("features", features))}
    assert {"utilisation", "rows_per_s", "workers", "first_batch_s"} <= set(logged["features"].data.metrics)
    assert {"utilisation", "features.rows_per_s", "features.wait_s"} <= set(logged["fit"].data.metrics)
    inputs = [i.dataset for i in logged["fit"].inputs.dataset_inputs]
    assert [d.name for d in inputs] == ["features"] and features.artifact.digest.startswith(inputs[0].digest)
    weights = ArtifactStore(store).get(fit.artifact).numpy()
    assert weights["0.weight"].shape == (32, 16) and weights["2.weight"].shape == (2, 32)
