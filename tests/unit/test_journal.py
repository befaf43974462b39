"""The run journal's formats: an appended stage log while running, one document when finished, format 1 still read."""

import json
import uuid
from pathlib import Path

import pytest

from actors.placement import PlacementDecision
from storage import ArtifactStore, StoreConfig
from workflows import Workflow, stage
from workflows.hooks import FAILED, PENDING, RUNNING, SUCCEEDED, RunInfo, StageRecord
from workflows.journal import Journals, replay


@stage()
def a() -> int:
    return 1


@stage()
def b(a: int) -> int:
    return a + 1


@stage()
def c(b: int) -> int:
    return b + 1


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(StoreConfig.from_urls([f"memory://j-{uuid.uuid4().hex}", str(tmp_path / "durable")]))


def new_run(store: ArtifactStore, run_id: str = "r1") -> RunInfo:
    wf = Workflow("chain", [a, b, c])
    decision = PlacementDecision("x", a.resources, a.resources, False, ("n",), "")
    return RunInfo(
        run_id=run_id,
        workflow=wf,
        params={n: {} for n in wf.order},
        records={n: StageRecord(n, decision, {}) for n in wf.order},
        store_config=store.config,
    )


def log_path(store: ArtifactStore, run_id: str) -> Path:
    return Path(store.durable.path(f"runs/{run_id}/stages.jsonl"))


def test_a_running_journal_appends_only_what_changed_and_reads_back(store):
    run, journals = new_run(store), Journals(store)
    journals.start(run, "chain")
    assert not log_path(store, "r1").exists()  # nothing past pending yet
    run.records["a"].status = SUCCEEDED
    run.records["a"].annotations["mlflow_run_id"] = "m-a"
    journals.append(run, ["a"])
    run.records["b"].status, run.records["b"].attempts = RUNNING, 1
    journals.append(run, ["b"])
    size = log_path(store, "r1").stat().st_size
    run.records["b"].status = FAILED
    journals.append(run, ["b"])
    # One line per change, not a rewrite of the run.
    added = log_path(store, "r1").read_bytes()[size:]
    assert added.count(b"\n") == 1 and json.loads(added)["stage"] == "b"

    j = journals.read("r1")
    assert j.status == RUNNING and list(j.stages) == ["a", "b", "c"]
    assert (j.stages["a"].status, j.stages["b"].status, j.stages["c"].status) == (SUCCEEDED, FAILED, PENDING)
    assert j.stages["a"].annotations == {"mlflow_run_id": "m-a"} and j.stages["b"].attempts == 1
    assert j.committed() == ["a"]
    assert [x.run_id for x in journals.list()] == ["r1"]


def test_a_torn_last_line_is_skipped_and_the_next_driver_starts_a_fresh_line(store):
    run, journals = new_run(store), Journals(store)
    journals.start(run, "chain")
    run.records["a"].status = SUCCEEDED
    journals.append(run, ["a"])
    with log_path(store, "r1").open("ab") as f:  # a driver killed in the middle of an append
        f.write(b'{"stage": "b", "status": "succ')
    assert journals.read("r1").stages["b"].status == PENDING

    resumed = new_run(store)
    resumed.resumed = True
    resumed.records["a"].status = SUCCEEDED
    later = Journals(store)  # a new driver process
    later.start(resumed, "chain")
    resumed.records["b"].status = SUCCEEDED
    later.append(resumed, ["b"])
    j = later.read("r1")
    assert (j.stages["a"].status, j.stages["b"].status, j.stages["c"].status) == (SUCCEEDED, SUCCEEDED, PENDING)


def test_a_resumed_driver_supersedes_what_the_dead_one_left_running(store):
    run, journals = new_run(store), Journals(store)
    journals.start(run, "chain")
    run.records["a"].status, run.records["b"].status = SUCCEEDED, RUNNING
    journals.append(run, ["a", "b"])
    resumed = new_run(store)
    resumed.resumed = True
    resumed.records["a"].status = SUCCEEDED  # b's manifest was never committed: pending again
    Journals(store).start(resumed, "chain")
    assert Journals(store).read("r1").stages["b"].status == PENDING


def test_finish_compacts_into_one_document_and_drops_the_log(store):
    run, journals = new_run(store), Journals(store)
    journals.start(run, "chain")
    for n in ("a", "b", "c"):
        run.records[n].status = SUCCEEDED
        journals.append(run, [n])
    run.status, run.ended_at = SUCCEEDED, run.started_at + 1
    journals.finish(run, "chain")
    assert not log_path(store, "r1").exists()
    doc = json.loads(Path(store.durable.path("runs/r1/journal.json")).read_bytes())
    assert set(doc["stages"]) == {"a", "b", "c"} and doc["status"] == SUCCEEDED
    j = journals.read("r1")
    assert j.status == SUCCEEDED and j.committed() == ["a", "b", "c"] and j.duration_s == 1


def test_a_format_1_journal_is_still_read(store):
    old = {
        "run_id": "old-1",
        "workflow": "chain",
        "workflow_ref": "chain",
        "params": {"a": {}},
        "status": "failed",
        "started_at": 1.0,
        "ended_at": 2.0,
        "host": "h",
        "pid": 1,
        "annotations": {"mlflow_run_id": "p"},
        "stages": {
            "a": {"status": "succeeded", "attempts": 1, "cache": "miss", "digest": "d", "node_id": "n",
                  "device": "cpu", "duration_s": 0.5, "error": "", "annotations": {}},
            "b": {"status": "failed", "attempts": 3, "cache": "miss", "digest": "", "node_id": "", "device": "",
                  "duration_s": 0.0, "error": "boom", "annotations": {}},
        },
    }  # fmt: skip
    store.put_document(("runs", "old-1", "journal"), old)
    j = Journals(store).read("old-1")
    assert j.status == "failed" and j.committed() == ["a"] and j.stages["b"].error == "boom"
    assert j.annotations == {"mlflow_run_id": "p"}


def test_replay_reports_but_survives_a_corrupt_line_in_the_middle(caplog):
    data = b'{"stage": "a", "status": "running"}\nnot json\n{"stage": "a", "status": "succeeded", "attempts": 2}\n'
    out = replay(data)
    assert out["a"].status == SUCCEEDED and out["a"].attempts == 2
    assert "line 2 is unreadable" in caplog.text


def test_an_encrypted_durable_tier_appends_by_rewriting_the_log(tmp_path, monkeypatch):
    # AES-GCM seals a file whole: the generic read-and-rewrite path, and nothing readable on disk.
    monkeypatch.setenv("TF_JOURNAL_KEY", "ab" * 32)
    store = ArtifactStore(StoreConfig.from_urls([f"{tmp_path / 'enc'}#encryption_key=env:TF_JOURNAL_KEY"]))
    run, journals = new_run(store), Journals(store)
    journals.start(run, "chain")
    run.records["a"].status = SUCCEEDED
    journals.append(run, ["a"])
    run.records["b"].status = SUCCEEDED
    journals.append(run, ["b"])
    assert b"succeeded" not in log_path(store, "r1").read_bytes()
    j = journals.read("r1")
    assert (j.stages["a"].status, j.stages["b"].status, j.stages["c"].status) == (SUCCEEDED, SUCCEEDED, PENDING)
