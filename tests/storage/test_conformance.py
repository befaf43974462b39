"""One contract, every back-end and tier combination (fsspec's tests/abstract habit):
memory, local disk and S3 (a real S3-compatible server on loopback), alone and stacked."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow as pa
import pytest

from storage import ArtifactStore, IntegrityError, StoreConfig, Tensors
from storage import maintenance as m
from storage.store import blob_key
from storage.tiers import FsspecTier, MemoryTier


def table(n: int = 1000, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({"x": rng.random(n), "y": rng.integers(0, 10, n)})


def durable_blobs(store: ArtifactStore) -> list[str]:
    return [k for k in store.durable.list("blobs") if not k.rsplit("/", 1)[-1].startswith(".tmp-")]


def test_round_trip_every_format(make_store):
    store = make_store()
    t = table()
    assert store.get(store.put(t, run_id="r", stage="t")).equals(t)
    w = Tensors({"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, {"config": "{}"})
    back = store.get(store.put(w, run_id="r", stage="w"))
    np.testing.assert_array_equal(back.tensors["w"], w.tensors["w"])
    assert store.get(store.put({"acc": 0.97}, run_id="r", stage="m")) == {"acc": 0.97}


def test_same_bytes_are_stored_once(make_store):
    store = make_store()
    a = store.put(table(), run_id="r1", stage="s")
    b = store.put(table(), run_id="r2", stage="s")
    assert a.digest == b.digest and durable_blobs(store) == [blob_key(a.digest)]


def test_reads_come_from_the_fastest_tier_and_promote(make_store):
    writer = make_store()
    ref = writer.put(table(), run_id="r", stage="s")
    for tier in writer.caches:  # start cold
        tier.delete(blob_key(ref.digest))
    reader = make_store()
    assert reader.get(ref).equals(table())
    assert all(t.exists(blob_key(ref.digest)) for t in reader.tiers)


def test_corrupt_durable_copy_without_another_copy_is_never_decoded(make_store):
    store = make_store()
    ref = store.put(table(), run_id="r", stage="s")
    for tier in store.caches:
        tier.delete(blob_key(ref.digest))
    store.durable.write(blob_key(ref.digest), b"not the bytes you stored")
    with pytest.raises(IntegrityError, match=f"no intact copy of blob {ref.digest}"):
        store.get(ref)
    assert not store.verify_blob(ref.digest)
    report = m.verify(store)
    assert not report.ok and [r.action for r in report.repairs] == ["unrecoverable"]


WITH_WARM = ["warm+local", "memory+warm+local", "warm+s3"]
WITH_CACHE = ["memory+local", "warm+local", "memory+warm+local", "memory+s3", "warm+s3"]


@pytest.mark.parametrize("combo", WITH_WARM)
def test_corrupt_cache_copy_is_repaired_from_the_durable_tier(make_store):
    store = make_store()
    ref = store.put(table(), run_id="r", stage="s")
    warm = next(t for t in store.caches if isinstance(t, FsspecTier))
    for tier in store.caches:
        if isinstance(tier, MemoryTier):
            tier.delete(blob_key(ref.digest))
    warm.write(blob_key(ref.digest), b"bit rot")
    assert store.get(ref).equals(table())
    assert [(r.tier, r.action) for r in store.repairs] == [(warm.url, "repaired")]
    assert m.holders(store, ref.digest)[warm.url] == "ok"


@pytest.mark.parametrize("combo", WITH_WARM)
def test_verify_restores_a_corrupt_durable_copy_from_a_cache_tier(make_store):
    store = make_store()
    ref = store.put(table(), run_id="r", stage="s")
    store.durable.write(blob_key(ref.digest), b"bit rot")
    report = m.verify(store)
    assert report.ok and (store.durable.url, "repaired") in [(r.tier, r.action) for r in report.repairs]
    assert store.verify_blob(ref.digest)


@pytest.mark.parametrize("combo", WITH_CACHE)
def test_lru_eviction_respects_capacity_and_pins_and_spares_the_durable_tier(make_store):
    probe = make_store().put(table(seed=99), run_id="probe", stage="p")
    size = probe.size_bytes
    store = make_store(capacity=int(size * 2.5))  # room for two blobs per cache tier
    refs = [store.put(table(seed=i), run_id="r", stage=f"s{i}") for i in range(3)]
    cache = store.caches[0]
    held = {r.digest for r in refs if cache.exists(blob_key(r.digest))}
    assert held == {refs[1].digest, refs[2].digest}  # the least recently used went first
    store.get(refs[1])  # touch: refs[2] is now the oldest
    if isinstance(cache, FsspecTier):
        time.sleep(0.02)  # file mtimes are the shared LRU clock
        os.utime(cache.path(blob_key(refs[1].digest)))
    with store.pinned([refs[2].digest]):
        store.put(table(seed=3), run_id="r", stage="s3")
        assert cache.exists(blob_key(refs[2].digest))  # pinned, so refs[1] was evicted instead
        assert not cache.exists(blob_key(refs[1].digest))
    assert sum(e.size for e in cache.entries("blobs")) <= cache.spec.capacity_bytes
    assert len(durable_blobs(store)) == 5  # probe + 4: nothing leaves the durable tier
    assert all(store.get(r).num_rows == 1000 for r in refs)


WRITER = textwrap.dedent(
    """
    import sys, numpy as np, pyarrow as pa
    from storage import ArtifactStore, StoreConfig
    store = ArtifactStore(StoreConfig.from_file(sys.argv[1]))
    durable_write = store.durable._write
    def announced(key, data):
        print("writing", key, flush=True)  # lets the test kill us mid-write
        durable_write(key, data)
    store.durable._write = announced
    if hasattr(store.durable, "write_content_addressed"):
        streamed = store.durable.write_content_addressed
        def announced_streamed(key_of, data):
            print("writing blobs/ (streamed)", flush=True)
            return streamed(key_of, data)
        store.durable.write_content_addressed = announced_streamed
    n = int(sys.argv[3])
    t = pa.table({"x": np.arange(n, dtype=np.float64)})
    print("ready", flush=True)
    store.put(t, run_id="w", stage=sys.argv[2])
    print("done", flush=True)
    """
)


def _config_file(store: ArtifactStore, tmp_path) -> str:
    lines = []
    for t in store.config.tiers:
        if t.url.startswith("memory://"):
            continue  # process-local: a subprocess gets its own
        opts = ", ".join(f"{k} = {json.dumps(v)}" for k, v in t.storage_options.items())
        role = "durable" if t.role == "durable" else "warm"
        cap = f"capacity = {t.capacity_bytes}\n" if role != "durable" else ""
        lines.append(f'[[store.tiers]]\nurl = "{t.url}"\nrole = "{role}"\n{cap}storage_options = {{ {opts} }}\n')
    path = tmp_path / "store.toml"
    path.write_text("\n".join(lines))
    return str(path)


def test_a_writer_killed_mid_write_leaves_nothing_visible(make_store, tmp_path):
    store = make_store()
    cfg = _config_file(store, tmp_path)
    p = subprocess.Popen(
        [sys.executable, "-c", WRITER, cfg, "killed", str(40_000_000)], stdout=subprocess.PIPE, text=True
    )
    assert p.stdout.readline().strip() == "ready"
    assert p.stdout.readline().startswith("writing blobs/")  # the 320 MB blob, before its manifest
    time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    fresh = ArtifactStore(StoreConfig.from_file(cfg))
    with pytest.raises(Exception, match="no committed artifact"):
        fresh.manifest("w", "killed")
    for key in fresh.durable.list("blobs"):  # anything visible under a final name is complete
        name = key.rsplit("/", 1)[-1]
        if not name.startswith(".tmp-"):
            assert fresh.verify_blob(name)


def test_two_writers_of_the_same_artifact_both_succeed_and_one_copy_remains(make_store, tmp_path):
    store = make_store()
    cfg = _config_file(store, tmp_path)
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, cfg, f"same{i}", "2000000"], stdout=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and all("done" in o for o in outs)
    fresh = ArtifactStore(StoreConfig.from_file(cfg))
    a, b = fresh.manifest("w", "same0"), fresh.manifest("w", "same1")
    assert a.digest == b.digest and durable_blobs(fresh) == [blob_key(a.digest)]
    assert fresh.get(a).num_rows == 2_000_000


def test_gc_deletes_only_unreferenced_blobs(make_store):
    store = make_store()
    kept = store.put(table(), run_id="r", stage="s")
    orphan = store.put_blob(b"orphan bytes no manifest names")
    assert [g.key for g in m.gc(store, dry_run=True, min_age_s=3600)] == []  # too young
    found = m.gc(store, dry_run=True, min_age_s=0)
    assert {g.key for g in found} == {blob_key(orphan)} and store.durable.exists(blob_key(orphan))
    m.gc(store, min_age_s=0)
    assert not store.durable.exists(blob_key(orphan)) and store.verify_blob(kept.digest)


def test_encrypted_durable_tier_never_holds_plaintext(make_store, tmp_path, monkeypatch, combo):
    monkeypatch.setenv("TF_TEST_KEY", "ab" * 32)
    base = make_store()
    specs = list(base.config.tiers)
    from dataclasses import replace

    specs[-1] = replace(specs[-1], encryption_key="env:TF_TEST_KEY")
    store = ArtifactStore(StoreConfig(tuple(specs)))
    secret = pa.table({"name": ["alice-the-identifiable"] * 10})
    ref = store.put(secret, run_id="r", stage="s")
    raw = store.durable._read(blob_key(ref.digest))
    assert b"alice-the-identifiable" not in raw and raw.startswith(b"TFENC1")
    assert ref.key_ids == {"durable": store.durable.key_id}
    manifest_raw = store.durable._read("manifests/r/s.json")
    assert b"arrow-ipc" not in manifest_raw  # manifests are encrypted too
    assert ArtifactStore(StoreConfig(tuple(specs))).get(ref).equals(secret)
    monkeypatch.setenv("TF_TEST_KEY", "cd" * 32)
    from storage.crypto import MissingKeyError, WrongKeyError

    with pytest.raises(WrongKeyError, match=store.durable.key_id):
        ArtifactStore(StoreConfig(tuple(specs))).manifest("r", "s")
    monkeypatch.delenv("TF_TEST_KEY")
    with pytest.raises(MissingKeyError, match="TF_TEST_KEY"):
        ArtifactStore(StoreConfig(tuple(specs)))
