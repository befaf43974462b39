"""Artifact store v1 over real fsspec back-ends (memory + local directory)."""

import json
import uuid

import numpy as np
import pyarrow as pa
import pytest
import torch

from storage import (
    ArtifactNotFoundError,
    ArtifactStore,
    FormatError,
    IntegrityError,
    InvalidKeyError,
    StorageError,
    StoreConfig,
    Tensors,
    sha256,
    validate_name,
)
from storage.store import blob_key


@pytest.fixture
def store(tmp_path):
    # A unique memory root per test: memory:// is process-global.
    return ArtifactStore(StoreConfig.from_urls([f"memory://t-{uuid.uuid4().hex}", str(tmp_path / "durable")]))


def test_tables_round_trip_as_arrow_ipc(store):
    table = pa.table({"x": [1.0, 2.0], "y": ["a", "b"]}).replace_schema_metadata({"k": "v"})
    ref = store.put(table, run_id="r1", stage="prep")
    assert ref.format == "arrow-ipc"
    assert ref.schema == {"columns": {"x": "double", "y": "string"}, "num_rows": 2}
    back = store.get(ref)
    assert back.equals(table) and back.schema.metadata == {b"k": b"v"}


def test_tensors_round_trip_as_safetensors_with_metadata(store):
    bundle = Tensors({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, {"config": '{"layers": [3]}'})
    ref = store.put(bundle, run_id="r1", stage="train")
    raw = store.get_blob(ref.digest)
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])  # safetensors, not pickle
    assert header["w"]["dtype"] == "F32" and header["__metadata__"]["config"] == '{"layers": [3]}'
    back = store.get(ref)
    np.testing.assert_array_equal(back.tensors["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert back.metadata == {"config": '{"layers": [3]}'}


def test_json_metrics_and_encoding_is_deterministic(store):
    a = store.put({"b": 1, "a": np.float32(0.5)}, run_id="r1", stage="m1")
    b = store.put({"a": 0.5, "b": 1}, run_id="r1", stage="m2")
    assert a.format == "json" and a.digest == b.digest
    assert store.get(a) == {"a": 0.5, "b": 1}


def test_values_without_an_explicit_format_are_refused_not_pickled(store):
    with pytest.raises(FormatError, match="cannot store a object"):
        store.put(object(), run_id="r1", stage="s")
    with pytest.raises(FormatError):
        store.put({"x": float("nan")}, run_id="r1", stage="s")


def test_blobs_are_content_addressed_and_stored_once(store, tmp_path):
    t = pa.table({"x": [1, 2, 3]})
    r1 = store.put(t, run_id="r1", stage="a")
    r2 = store.put(t, run_id="r2", stage="a")
    assert r1.digest == r2.digest
    blobs = list((tmp_path / "durable" / "blobs").rglob("*"))
    assert [p.name for p in blobs if p.is_file()] == [r1.digest]
    assert (tmp_path / "durable" / "blobs" / r1.digest[:2] / r1.digest).is_file()
    assert r1.uri.endswith(blob_key(r1.digest))
    assert [m.run_id for m in store.manifests("r1")] == ["r1"]


def test_corrupt_durable_blob_is_never_decoded(store, tmp_path):
    ref = store.put({"a": 1}, run_id="r1", stage="s")
    fresh = ArtifactStore(StoreConfig.from_urls([str(tmp_path / "durable")]))  # no hot copy
    (tmp_path / "durable" / blob_key(ref.digest)).write_bytes(b'{"a":2}')
    with pytest.raises(IntegrityError, match="no intact copy"):
        fresh.get(ref)
    assert not fresh.verify_blob(ref.digest)


def test_corrupt_warm_copy_falls_back_to_the_durable_tier_and_is_repaired(tmp_path):
    store = ArtifactStore(StoreConfig.from_urls([str(tmp_path / "warm"), str(tmp_path / "durable")]))
    ref = store.put({"a": 1}, run_id="r1", stage="s")
    warm = tmp_path / "warm" / blob_key(ref.digest)
    warm.write_bytes(b"garbage")
    assert store.get(ref) == {"a": 1}
    assert warm.read_bytes() == store.durable.read(blob_key(ref.digest))
    assert [(r.tier, r.action) for r in store.repairs] == [(str(tmp_path / "warm"), "repaired")]


def test_read_promotes_into_the_hot_tier(tmp_path):
    durable = str(tmp_path / "d")
    ref = ArtifactStore(StoreConfig.from_urls([durable])).put({"a": 1}, run_id="r", stage="s")
    store = ArtifactStore(StoreConfig.from_urls([f"memory://p-{uuid.uuid4().hex}", durable]))
    assert not store.tiers[0].exists(blob_key(ref.digest))
    assert store.get(ref) == {"a": 1}
    assert store.tiers[0].exists(blob_key(ref.digest))


def test_manifests_are_immutable(store):
    store.put({"a": 1}, run_id="r1", stage="s")
    assert store.put({"a": 1}, run_id="r1", stage="s").digest  # same content: fine
    with pytest.raises(StorageError, match="already committed"):
        store.put({"a": 2}, run_id="r1", stage="s")


def test_missing_artifact(store):
    with pytest.raises(ArtifactNotFoundError, match="no committed artifact"):
        store.manifest("r9", "s")
    with pytest.raises(ArtifactNotFoundError, match="is in no tier"):
        store.get_blob(sha256(b"never written"))


def test_cache_entry_with_a_missing_blob_is_a_miss(store, tmp_path):
    ref = store.put({"a": 1}, run_id="r1", stage="s")
    key = sha256(b"cache-key")
    store.record_cache(key, ref)
    assert store.lookup_cache(key) == ref
    (tmp_path / "durable" / blob_key(ref.digest)).unlink()
    assert store.lookup_cache(key) is None


def test_no_partial_file_is_left_by_a_failed_write(tmp_path, monkeypatch):
    store = ArtifactStore(StoreConfig.from_urls([str(tmp_path / "d")]))

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("storage.tiers.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        store.put({"a": 1}, run_id="r1", stage="s")
    assert [p for p in (tmp_path / "d").rglob("*") if p.is_file()] == []


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../escape", "looks like a path"),
        ("/etc/passwd", "looks like a path"),
        ("s3://bucket/x", "looks like a path"),
        ("a\x00b", "control character"),
        ("tab\there", "control character"),
        ("x" * 200, "the limit is 128"),
        ("", "is empty"),
        ("a/b", "outside"),
        (".hidden", "outside"),
        (3, "must be a string"),
    ],
)
def test_names_are_validated_before_fsspec_sees_them(name, message):
    with pytest.raises(InvalidKeyError, match=message):
        validate_name(name, "run id")


def test_store_refuses_bad_run_ids(store):
    with pytest.raises(InvalidKeyError):
        store.put({"a": 1}, run_id="../../x", stage="s")


def test_config_rules(tmp_path, monkeypatch):
    with pytest.raises(StorageError, match="no tier URLs"):
        StoreConfig.from_urls(" , ")
    monkeypatch.setenv("TIERFLOW_STORE", f"memory://a,{tmp_path}/w#capacity=2MiB,{tmp_path}/x")
    cfg = StoreConfig.default()
    assert [t.role for t in cfg.tiers] == ["hot", "warm", "durable"] and cfg.durable_url == f"{tmp_path}/x"
    assert [t.capacity_bytes for t in cfg.tiers] == [2**30, 2 * 2**20, None]
    with pytest.raises(StorageError, match="cannot be durable"):
        StoreConfig.from_urls("memory://only")
    with pytest.raises(StorageError, match="unknown tier settings"):
        StoreConfig.from_urls(f"{tmp_path}/w#capacty=1GB,{tmp_path}/x")
    with pytest.raises(StorageError, match="not a size"):
        StoreConfig.from_urls(f"{tmp_path}/w#capacity=lots,{tmp_path}/x")
    monkeypatch.chdir(tmp_path)
    assert StoreConfig.from_urls("rel/store").durable_url == str(tmp_path / "rel" / "store")


def test_defaults_leave_a_ray_jobs_temporary_working_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("TIERFLOW_STORE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    from workflows.lineage import default_tracking_uri

    assert StoreConfig.default().durable_url == str(tmp_path / ".tierflow" / "store")
    assert default_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray's job supervisor sets
    assert StoreConfig.default().durable_url == str(tmp_path / "home" / ".tierflow" / "store")
    assert default_tracking_uri() == f"sqlite:///{tmp_path / 'home' / '.tierflow' / 'mlflow.db'}"


def test_a_large_table_streamed_to_disk_is_named_and_stored_like_its_encoding(tmp_path):
    """A table put on a local durable tier is written by Arrow into the temp file while it is hashed; its
    name, bytes and size must be those of the encoded stream (so it dedups with encoded puts), the warm
    copy is made from the durable file, and a corrupt chunk is still caught on read, never decoded."""
    from storage.formats import encode
    from storage.hashing import CHUNK_BYTES

    table = pa.table({"x": np.arange(2 * CHUNK_BYTES // 8 + 1000, dtype=np.float64)})  # 3 chunks
    _, data, schema = encode(table)
    store = ArtifactStore(StoreConfig.from_urls([str(tmp_path / "warm"), str(tmp_path / "durable")]))
    ref = store.put(table, run_id="r", stage="s")
    assert ref.digest == sha256(data) and ref.size_bytes == len(data) and ref.schema == schema
    path = tmp_path / "durable" / blob_key(ref.digest)
    assert path.read_bytes() == bytes(data) == (tmp_path / "warm" / blob_key(ref.digest)).read_bytes()
    assert store.put_encoded("arrow-ipc", data, schema, run_id="r2", stage="s").digest == ref.digest
    assert [p.name for p in (tmp_path / "durable" / "blobs").rglob("*") if p.is_file()] == [ref.digest]
    with open(path, "r+b") as f:  # one flipped bit in the middle chunk, on the only durable copy
        f.seek(CHUNK_BYTES + 4321)
        byte = f.read(1)[0]
        f.seek(CHUNK_BYTES + 4321)
        f.write(bytes([byte ^ 1]))
    fresh = ArtifactStore(StoreConfig.from_urls([str(tmp_path / "durable")]))
    with pytest.raises(IntegrityError, match="no intact copy"):
        fresh.get(ref)
    assert not fresh.verify_blob(ref.digest)
    assert store.get(ref).equals(table)  # the warm copy (made from the durable file) is intact


def test_streamed_tables_of_every_shape_are_named_by_their_encoding(tmp_path):
    """The streamed put hashes Arrow's pieces after they were written: every kind of buffer Arrow hands
    over (sliced, realigned bitmaps, strings, dictionaries, nested) must still hold what was written."""
    from storage.formats import encode

    rng = np.random.default_rng(1)
    n = 50_000
    base = pa.table(
        {
            "f": pa.array(rng.random(n), mask=rng.random(n) < 0.1),
            "s": pa.array([None if i % 7 == 0 else f"s{i}" for i in range(n)]),
            "b": pa.array(rng.random(n) < 0.5),
            "d": pa.array([f"k{i % 5}" for i in range(n)]).dictionary_encode(),
            "l": pa.array([[i, i + 1] if i % 3 else None for i in range(n)]),
        }
    )
    store = ArtifactStore(StoreConfig.from_urls([str(tmp_path / "durable")]))
    for i, t in enumerate([base, base.slice(1234, 20_001), pa.concat_tables([base.slice(3, 10), base.slice(99)])]):
        ref = store.put(t, run_id="r", stage=f"s{i}")
        assert ref.digest == sha256(encode(t)[1])
        assert store.get(ref).equals(t)


def test_a_commit_fsyncs_the_new_names_directories_on_the_durable_tier_only(tmp_path, monkeypatch):
    import os
    import stat

    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr("storage.tiers.os.fsync", recording_fsync)
    durable = tmp_path / "d"
    store = ArtifactStore(StoreConfig.from_urls([str(tmp_path / "w"), str(durable)]))
    ref = store.put({"a": 1}, run_id="r1", stage="s")
    blob_dir = (durable / blob_key(ref.digest)).parent
    # The blob's and the manifest's directories were new: each is fsynced, and so is every new ancestor
    # up to the first that existed before.
    new = [blob_dir, blob_dir.parent, durable / "manifests" / "r1", durable / "manifests"]
    assert {str(d) for d in new} <= set(synced)
    assert not [p for p in synced if p.startswith(str(tmp_path / "w"))]  # the warm cache needs no fsync
