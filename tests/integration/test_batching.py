"""Short stages of a fan-out share actor calls and queue in busy actors; a failure stays its own stage's."""

import inspect
import os
from pathlib import Path

import pytest
import ray

from storage import ArtifactStore, StoreConfig
from tests.conftest import ship_by_value, start_local_ray
from workflows import Stage, StageFailedError, Workflow, release_warm_actors, stage
from workflows import driver as driver_mod
from workflows.engine import run_workflow
from workflows.hooks import FAILED, NOT_RUN, SUCCEEDED

pytestmark = pytest.mark.integration
ship_by_value(__name__)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    start_local_ray(num_cpus=2)
    yield
    release_warm_actors()
    ray.shutdown()


@pytest.fixture
def calls(monkeypatch):
    """Stages per actor call, as the driver submitted them."""
    sizes: list[int] = []
    submitted = driver_mod.Driver._submitted

    def spy(self, name, actor, result_ref, value_ref):
        batch = self.calls.batches.get(result_ref)
        if batch is None or batch[0] == name:
            sizes.append(len(batch) if batch else 1)
        return submitted(self, name, actor, result_ref, value_ref)

    monkeypatch.setattr(driver_mod.Driver, "_submitted", spy)
    return sizes


def seed() -> dict:
    return {"base": 100}


def square(seed: dict, i: int = 0, fail_at: int = -1, flaky: str = "", crash: bool = False) -> dict:
    """A user's per-partition step: fails at `fail_at`, or once (marker file `flaky`) at that index, by raising
    or (`crash`) by ending its worker process."""
    if i == fail_at:
        if not flaky:
            raise ValueError(f"partition {i} is malformed")
        if not Path(flaky).exists():
            Path(flaky).touch()
            if crash:
                os._exit(1)
            raise ConnectionError("connection reset")
    return {"v": seed["base"] + i * i}


def fan(n: int, retry: bool = False) -> Workflow:
    extra = {"retries": 2, "retry_on": (ConnectionError,), "retry_backoff_s": 0.05} if retry else {}
    stages: list[Stage] = [stage(name="seed", cpus=1)(seed)]
    stages += [stage(name=f"p{i:03d}", cpus=1, **extra)(square) for i in range(n)]

    def total(**parts: dict) -> dict:
        return {"v": sum(p["v"] for p in parts.values())}

    kw = inspect.Parameter.KEYWORD_ONLY
    total.__signature__ = inspect.Signature([inspect.Parameter(f"p{i:03d}", kw) for i in range(n)])
    return Workflow(f"squares{n}", [*stages, stage(name="total", cpus=1)(total)])


def params(n: int, **kw: object) -> dict:
    return {f"p{i:03d}.{k}": v for i in range(n) for k, v in {"i": i, **kw}.items()}


def test_a_fan_out_of_short_stages_shares_actor_calls(tmp_path, calls):
    n = 120
    store = StoreConfig.from_urls([str(tmp_path / "store")])
    run = run_workflow(fan(n), params=params(n), store_config=store, use_cache=False)
    assert run.status == SUCCEEDED
    got = ArtifactStore(store)
    assert got.get(run.records["total"].artifact) == {"v": n * 100 + sum(i * i for i in range(n))}
    for i in range(n):  # each stage committed its own output and record, ran once
        rec = run.records[f"p{i:03d}"]
        assert rec.attempts == 1 and got.get(got.manifest(run.run_id, rec.name)) == {"v": 100 + i * i}
        assert got.record(run.run_id, rec.name)["stage"] == rec.name
    assert sum(calls) == n + 2
    assert max(calls) > 1 and len(calls) < n / 2, calls  # once a stage's time is known, its siblings share calls


def test_a_stage_that_raises_in_a_shared_call_fails_alone(tmp_path, calls):
    n, bad = 80, 45
    store = StoreConfig.from_urls([str(tmp_path / "store")])
    with pytest.raises(StageFailedError, match="partition 45 is malformed"):
        run_workflow(fan(n), params=params(n, fail_at=bad), store_config=store, use_cache=False, run_id="bad-1")
    got = ArtifactStore(store)
    committed = {m.stage for m in got.manifests("bad-1")}
    assert f"p{bad:03d}" not in committed and "total" not in committed
    assert {f"p{i:03d}" for i in range(bad)} <= committed  # everything before it finished first
    assert max(calls) > 1, calls
    from workflows.journal import Journals

    stages = Journals(got).read("bad-1").stages
    assert stages[f"p{bad:03d}"].status == FAILED
    for name, entry in stages.items():  # the failure is its own: the rest committed, or never started
        assert entry.status in (SUCCEEDED, NOT_RUN) or name == f"p{bad:03d}", (name, entry.status)
        assert (entry.status == SUCCEEDED) == (name in committed), name


def test_a_retried_stage_costs_its_queued_neighbours_no_attempt(tmp_path, calls):
    n, flaky = 150, 60
    store = StoreConfig.from_urls([str(tmp_path / "store")])
    marker = tmp_path / "failed-once"
    run = run_workflow(
        fan(n, retry=True),
        params=params(n, fail_at=flaky, flaky=str(marker)),
        store_config=store,
        use_cache=False,
    )
    assert run.status == SUCCEEDED and marker.exists()
    assert run.records[f"p{flaky:03d}"].attempts == 2
    # Its actor is lent no more (a failed process is not reused) and ends once the calls queued in it returned:
    # those ran there, once.
    assert all(run.records[f"p{i:03d}"].attempts == 1 for i in range(n) if i != flaky)
    got = ArtifactStore(store)
    assert got.get(run.records["total"].artifact) == {"v": n * 100 + sum(i * i for i in range(n))}


def test_a_worker_that_dies_in_a_shared_call_loses_no_stage(tmp_path, calls):
    n, crash = 150, 70
    store = StoreConfig.from_urls([str(tmp_path / "store")])
    marker = tmp_path / "crashed-once"
    run = run_workflow(fan(n), params=params(n, fail_at=crash, flaky=str(marker), crash=True), store_config=store)
    assert run.status == SUCCEEDED and marker.exists()
    # The call's stages are infrastructure failures, retried on a fresh actor; the calls queued behind it in
    # the dead actor never ran and wait again without counting an attempt.
    assert run.records[f"p{crash:03d}"].attempts == 2
    assert sum(run.records[f"p{i:03d}"].attempts for i in range(n)) <= n + max(calls)
    got = ArtifactStore(store)
    assert got.get(run.records["total"].artifact) == {"v": n * 100 + sum(i * i for i in range(n))}
