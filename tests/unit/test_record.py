"""Stage records: what a stage measured, committed as JSON with its manifest (no Ray, no pickle)."""

import dataclasses
import json
import math

import pytest

from actors.context import Metric, SourceInput
from actors.errors import RecordError
from actors.record import VERSION, from_record, to_record
from actors.runner import StageResult
from storage import ArtifactStore, StorageError, StoreConfig
from storage.formats import encode
from storage.store import manifest_key, record_key


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(StoreConfig.from_urls([str(tmp_path / "durable")]))


def measured(artifact, stage: str = "train") -> StageResult:
    return StageResult(
        stage=stage,
        artifact=artifact,
        node_id="n" * 56,
        node_ip="10.0.0.7",
        pid=4242,
        device="cuda:0",
        gpu_ids=[0, 1],
        cuda_visible_devices="0,1",
        started_at=1_700_000_000.25,
        duration_s=3.5,
        metrics=[Metric("loss", 0.9, 0, 1000), Metric("loss", 0.4, 1, 2000), Metric("train_accuracy", 0.97, 0, 3000)],
        tags={"model.family": "mlp"},
        sources=[
            SourceInput("digits", "sklearn://digits", "ab" * 32, 1797),
            SourceInput("extra", "s3://b/k", "c" * 64),
        ],
    )


def commit(store, value, *, run_id="r1", stage="train", inputs=None, result=measured):
    fmt, data, schema = encode(value)
    return store.put_encoded(
        fmt,
        data,
        schema,
        run_id=run_id,
        stage=stage,
        record=lambda ref: to_record(
            result(ref, stage), run_id=run_id, cache_key="k" * 64, attempt=2, inputs=inputs or {}
        ),
    )


def test_a_record_round_trips_through_json_with_its_manifest(store, tmp_path):
    upstream = store.put({"x": [1, 2]}, run_id="r1", stage="prep")
    ref = commit(store, {"w": [0.5]}, inputs={"prep": upstream})
    raw = (tmp_path / "durable" / record_key("r1", "train")).read_bytes()
    doc = json.loads(raw)  # plain JSON on disk
    assert doc["version"] == VERSION and doc["digest"] == ref.digest
    back = from_record(store.record("r1", "train"), store.manifest("r1", "train"), run_id="r1", stage="train")
    assert back.result == measured(ref)  # every field, metric steps and timestamps included
    assert back.inputs == {"prep": upstream} and back.cache_key == "k" * 64 and back.attempt == 2


def test_non_finite_metric_values_survive(store):
    def diverged(ref, stage):
        return StageResult(stage, ref, "n", "ip", 1, "cpu", [], "", 0.0, 1.0, [Metric("loss", math.nan, 3, 9)])

    ref = commit(store, {"w": 1}, result=diverged)
    back = from_record(store.record("r1", "train"), ref, run_id="r1", stage="train")
    assert math.isnan(back.result.metrics[0].value) and back.result.metrics[0].step == 3


def test_the_record_is_on_disk_before_the_manifest(store, tmp_path):
    seen = []

    def result(ref, stage):
        seen.append((tmp_path / "durable" / manifest_key("r1", stage)).exists())
        return measured(ref, stage)

    commit(store, {"w": 1}, result=result)
    assert seen == [False]
    assert (tmp_path / "durable" / record_key("r1", "train")).exists()


def test_a_failing_record_leaves_no_manifest(store):
    def broken(ref, stage):
        raise RuntimeError("cannot describe the stage")

    with pytest.raises(RuntimeError):
        commit(store, {"w": 1}, result=broken)
    with pytest.raises(StorageError):
        store.manifest("r1", "train")


def test_a_committed_record_is_not_replaced_by_a_later_attempt(store):
    first = commit(store, {"w": 1})
    again = commit(store, {"w": 1}, result=lambda ref, stage: dataclasses.replace(measured(ref), node_id="other"))
    assert again == first
    assert store.record("r1", "train")["node_id"] == "n" * 56


def test_manifests_without_records_stay_readable(store):
    ref = store.put({"w": 1}, run_id="old", stage="train")  # as written before records existed
    assert store.record("old", "train") is None
    assert store.manifest("old", "train") == ref


def test_forget_removes_the_record_with_the_manifest(store):
    commit(store, {"w": 1})
    store.forget("r1", "train")
    assert store.record("r1", "train") is None


@pytest.mark.parametrize(
    "change",
    [
        {"version": 99},
        {"digest": "0" * 64},
        {"stage": "other"},
        {"run_id": "r2"},
        {"unexpected": 1},
        {"metrics": [{"key": "loss", "value": 1.0}]},
        {"metrics": [{"key": "loss", "value": "high", "step": 0, "timestamp_ms": 0}]},
        {"tags": {"a": 1}},
        {"inputs": {"prep": {"digest": "not-a-digest"}}},
    ],
)
def test_a_malformed_or_foreign_record_is_refused(store, change):
    ref = commit(store, {"w": 1})
    doc = {**store.record("r1", "train"), **change}
    with pytest.raises(RecordError):
        from_record(doc, ref, run_id="r1", stage="train")


def test_record_paths_are_validated(store):
    with pytest.raises(StorageError):
        store.record("../etc", "train")
    with pytest.raises(StorageError):
        commit(store, {"w": 1}, stage="a/b")
