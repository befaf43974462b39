"""Group commit: a stage counts as done only after a barrier that covers it, and its cache entry after that."""

import threading
import uuid
from pathlib import Path

import pytest

from storage import ArtifactStore, StoreConfig
from workflows.commits import GroupCommit


class Recorder:
    """An ArtifactStore stand-in that logs barriers and cache writes; a barrier waits until released."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.release = threading.Event()

    def barrier(self) -> None:
        self.release.wait(10)
        self.events.append("barrier")

    def record_cache(self, key: str, ref: object) -> None:
        self.events.append(f"cache:{key}")


def test_items_come_back_only_after_their_barrier_and_batches_gather_meanwhile():
    store = Recorder()
    commits: GroupCommit[str] = GroupCommit(store)  # type: ignore[arg-type]
    commits.add("a", ("ka", None))
    assert commits.poll() == [] and commits.pending  # barrier for [a] started, not returned
    commits.add("b", None)
    commits.add("c", ("kc", None))
    assert commits.poll() == []  # b and c wait for the next barrier
    store.release.set()
    assert commits.drain() == ["a", "b", "c"] and not commits.pending
    # one barrier per batch, each batch's cache entries after its barrier
    assert store.events == ["barrier", "cache:ka", "barrier", "cache:kc"]
    commits.close()


def test_a_failed_barrier_fails_loudly_and_returns_nothing():
    class Broken(Recorder):
        def barrier(self) -> None:
            raise OSError("disk gone")

    commits: GroupCommit[str] = GroupCommit(Broken())  # type: ignore[arg-type]
    commits.add("a", ("ka", None))
    with pytest.raises(OSError, match="disk gone"):
        commits.drain()
    commits.close()


def test_deferred_writes_skip_fsync_and_the_barrier_runs(tmp_path: Path, monkeypatch):
    store = ArtifactStore(StoreConfig.from_urls([f"memory://c-{uuid.uuid4().hex}", str(tmp_path / "d")]))
    assert store.group_commits
    synced: list[int] = []
    monkeypatch.setattr("os.fsync", synced.append)
    with store.deferred_sync():
        ref = store.put({"x": 1}, run_id="r", stage="s")
    assert synced == []  # blob, manifest: no per-file fsync
    store.put({"x": 2}, run_id="r", stage="t")
    assert synced  # outside the context the commit path fsyncs again
    store.barrier()
    assert store.manifest("r", "s") == ref and store.get(ref) == {"x": 1}
