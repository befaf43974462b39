"""A stage's profile travels in its committed record, and records written before profiles still read."""

import dataclasses

import pytest

from actors.errors import RecordError
from actors.record import from_record, to_record
from storage import ArtifactStore, StoreConfig
from tests.unit.test_record import commit, measured


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(StoreConfig.from_urls([str(tmp_path / "durable")]))


PROFILE = {"duration_s": 3.5, "cpu_s": 2.0, "runqueue_wait_s": 0.5, "energy_j": 20.0, "energy_method": "estimate"}


def with_profile(ref, stage):
    return dataclasses.replace(measured(ref, stage), profile=dict(PROFILE))


def test_the_profile_round_trips(store):
    ref = commit(store, {"w": [1]}, result=with_profile)
    restored = from_record(store.record("r1", "train"), ref, run_id="r1", stage="train")
    assert restored.result.profile == PROFILE


def test_a_record_without_a_profile_still_reads(store):
    ref = commit(store, {"w": [1]})
    doc = store.record("r1", "train")
    del doc["profile"]
    assert from_record(doc, ref, run_id="r1", stage="train").result.profile == {}


def test_a_profile_that_is_not_an_object_is_refused(store):
    ref = commit(store, {"w": [1]})
    doc = store.record("r1", "train") | {"profile": [1, 2]}
    with pytest.raises(RecordError, match="profile"):
        from_record(doc, ref, run_id="r1", stage="train")


def test_to_record_writes_the_profile(store):
    ref = commit(store, {"w": [1]}, result=with_profile)
    doc = to_record(with_profile(ref, "train"), run_id="r1", cache_key="k", attempt=1, inputs={})
    assert doc["profile"]["runqueue_wait_s"] == 0.5
