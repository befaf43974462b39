"""Per-stage orchestration overhead: a tierflow chain of no-op stages vs hand-written Ray, in one process.

Peers, each timed as a whole chain (submit until the last result is on the driver):
  tierflow         `run_workflow` on N no-op `@stage(cpus=1)` stages chained by `prev`, cache off, no hooks
  tierflow cached  the same chain with `use_cache=True` after a first run filled the cache (all hits)
  raw warm         one warm `@ray.remote(num_cpus=1)` actor, N calls chained by ObjectRef, one `ray.get`
  raw fresh        a new actor per stage: create, call, wait, kill (what a naive orchestrator does)
Repetitions are interleaved across peers; before each chain all CPUs are free again (`settle`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import ray
from benchlib import machine, publish

from storage import StoreConfig
from workflows import Stage, Workflow, stage
from workflows.engine import run_workflow

SECTION = "stage_overhead"


def first() -> dict:
    return {"i": 0}


def step(prev: dict) -> dict:
    return {"i": prev["i"] + 1}


@ray.remote(num_cpus=1)
class Echo:
    def step(self, prev: dict | None) -> dict:
        return {"i": 0 if prev is None else prev["i"] + 1}


def chain(n: int) -> Workflow:
    stages: list[Stage] = [stage(name="s00", cpus=1)(first)]
    stages += [stage(name=f"s{i:02d}", cpus=1, inputs={"prev": f"s{i - 1:02d}"})(step) for i in range(1, n)]
    return Workflow("chain", stages)


def settle(timeout_s: float = 30.0) -> None:
    """Wait until every CPU is free again: `ray.kill` returns before the actor's resources do."""
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0) - 1e-6:
        if time.monotonic() > deadline:
            raise RuntimeError(f"CPUs still held after {timeout_s}s: {ray.available_resources()}")
        time.sleep(0.02)


def run_raw_warm(actor: Any, n: int) -> int:
    ref = None
    for _ in range(n):
        ref = actor.step.remote(ref)
    return ray.get(ref)["i"]


@contextmanager
def warm_actor(n: int) -> Iterator[Callable[[], int]]:
    """An actor that is up and has served a call already (untimed); killed after the timed chain."""
    actor = Echo.remote()
    run_raw_warm(actor, 1)
    try:
        yield lambda: run_raw_warm(actor, n)
    finally:
        ray.kill(actor)


def run_raw_fresh(n: int) -> int:
    ref = None
    for _ in range(n):
        actor = Echo.remote()
        ref = actor.step.remote(ref)
        ray.wait([ref], fetch_local=False)
        ray.kill(actor)
    return ray.get(ref)["i"]


def run_tierflow(wf: Workflow, store: StoreConfig, *, use_cache: bool, expect: str = "succeeded") -> None:
    run = run_workflow(wf, store_config=store, use_cache=use_cache)
    recs = [run.records[name] for name in wf.order]
    assert {r.status for r in recs} == {expect}, f"expected every stage {expect}: {[r.status for r in recs]}"
    if expect == "succeeded":  # where the time goes: actor start-up vs steady state (actor clock = driver clock)
        starts = [r.result.started_at for r in recs if r.result]
        SPLIT["startup"].append(starts[0] - run.started_at)
        SPLIT["gap"].append((starts[-1] - starts[0]) / (len(starts) - 1))


SPLIT: dict[str, list[float]] = {"startup": [], "gap": []}
Peer = Callable[[], AbstractContextManager[Callable[[], Any]]]  # untimed setup/teardown around a timed chain


def measure(peers: dict[str, Peer], repeats: int, warmup: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in peers}
    for rep in range(warmup + repeats):
        line = []
        for name, peer in peers.items():
            settle()
            with peer() as chain_fn:
                t0 = time.perf_counter()
                chain_fn()
                elapsed = time.perf_counter() - t0
            line.append(f"{name}={elapsed:.3f}s")
            if rep >= warmup:
                times[name].append(elapsed)
        tag = "warm-up" if rep < warmup else f"rep {rep - warmup + 1}/{repeats}"
        print(f"{tag}: {', '.join(line)}", file=sys.stderr)
    return times


def report(times: dict[str, list[float]], n: int, repeats: int, warmup: int, command: str) -> str:
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    labels = {
        "tierflow": "tierflow (`run_workflow`, cache off)",
        "tierflow_cached": "tierflow, cached re-run (all hits)",
        "raw_warm": "raw Ray, one warm actor",
        "raw_fresh": "raw Ray, fresh actor per stage",
    }
    rows = [f"| {labels[k]} | {med[k] * 1e3:.0f} | {low[k] * 1e3:.0f} | {med[k] / n * 1e3:.1f} |" for k in labels]
    overhead = (med["tierflow"] - med["raw_warm"]) / n * 1e3
    startup, gap = (statistics.median(SPLIT[k][-repeats:]) * 1e3 for k in ("startup", "gap"))
    return "\n".join(
        [
            f"## Per-stage orchestration overhead ({n}-stage chain of no-op stages)",
            "",
            f"- Date: {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
            f"- Machine: {machine()}",
            f"- Python {platform.python_version()}, Ray {ray.__version__}; "
            "local Ray started in-process with `num_cpus=2`",
            f"- Command: `{command}`",
            f"- Wall time of each whole chain, {repeats} repetitions after {warmup} warm-up, interleaved across peers.",
            "",
            "| peer | median ms | min ms | median ms / stage |",
            "|---|---:|---:|---:|",
            *rows,
            "",
            f"- **tierflow per-stage overhead over raw warm actor: {overhead:.1f} ms/stage** "
            f"((tierflow - raw warm) / {n}, medians)",
            f"- tierflow / raw warm: {med['tierflow'] / med['raw_warm']:.1f}x; "
            f"fresh actor per stage / tierflow: {med['raw_fresh'] / med['tierflow']:.1f}x; "
            f"cached re-run / tierflow: {med['tierflow_cached'] / med['tierflow']:.2f}x",
            f"- Inside a tierflow run (medians): the first stage starts {startup:.0f} ms after `run_workflow` is "
            f"called (placement + the run's one fresh actor: {startup / n:.1f} ms/stage amortised), then a stage "
            f"starts every {gap:.1f} ms ({gap - med['raw_warm'] / n * 1e3:.1f} ms/stage more than a raw warm call)",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--stages", type=int, default=20, help="chain length N (default 20)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions per peer (default 7)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (default 1)")
    parser.add_argument("--write", action="store_true", help=f"update the section in {'BENCHMARKS.md'}")
    args = parser.parse_args()
    if args.stages < 2 or args.repeats < 1 or args.warmup < 0:
        parser.error("need --stages >= 2, --repeats >= 1, --warmup >= 0")
    n = args.stages
    command = shlex.join(["cd", "/work/main"]) + " && " + shlex.join([".venv/bin/python", *sys.argv])

    ray.init("local", num_cpus=2, include_dashboard=False)
    try:
        with tempfile.TemporaryDirectory(prefix="tierflow-bench-") as tmp:
            wf = chain(n)
            store = StoreConfig.from_urls(["memory://bench", f"{tmp}/store"])
            cached_store = StoreConfig.from_urls(["memory://bench-cached", f"{tmp}/cached"])
            run_tierflow(wf, cached_store, use_cache=True)  # first run fills the cache; timed runs all hit
            peers: dict[str, Peer] = {
                "raw_warm": lambda: warm_actor(n),
                "tierflow": lambda: nullcontext(lambda: run_tierflow(wf, store, use_cache=False)),
                "tierflow_cached": lambda: nullcontext(
                    lambda: run_tierflow(wf, cached_store, use_cache=True, expect="cached")
                ),
                "raw_fresh": lambda: nullcontext(lambda: run_raw_fresh(n)),
            }
            assert run_raw_fresh(n) == n - 1
            times = measure(peers, args.repeats, args.warmup)
    finally:
        ray.shutdown()
    body = report(times, n, args.repeats, args.warmup, command)
    publish(SECTION, body, args.write)


if __name__ == "__main__":
    main()
