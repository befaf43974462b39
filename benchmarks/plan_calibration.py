"""The planner's machine-level constants, from a calibration run that is none of plan_accuracy's cases.

Three tiny workflows, run on the local Ray the profiles are taken on, each `1 + repeat` times (plan_accuracy:
`1 + max(3, --repeat)`): the first run of each is a warm-up and not counted (a fresh Ray session is still
starting its workers, Ray Data its own actors):
- `plan_calibrate_chain`: five 0.05 s stages in a chain (one warm actor), then a 2-CPU stage and a
  0.5-CPU stage, each a new shape on a full node (the idle actors of the last shape must be ended first);
- `plan_calibrate_stream`: a 4-shard stream read by two consumers, so it runs alone (not fused);
- `plan_calibrate_share`: four 0.3 s CPU-bound stages side by side after a source, two at a time on 2 CPUs.

From their records, one figure per counted run (medians within it), then the least disturbed run's: the
minimum of the times, the maximum of `core_share` (other processes only ever add to these costs, so the
planner predicts an undisturbed run, as its profiles do by taking out the time stages waited for a CPU):
- `actor_start_s`: run start -> first stage start (placement and a fresh actor), in all three workflows;
- `first_call_s`: the first stage's time minus a warm call's (deserialising the stage, first imports);
- `dispatch_s`: end of a chained stage -> start of the next on the same warm actor (the driver's turn);
- `reclaim_s`: the gap at a shape change minus `actor_start_s` and `dispatch_s` (ending the idle actors);
- `run_overhead_s`: last stage end -> run end;
- `stream_pool_start_s`: the lone stream's first batch minus one shard's work (Ray Data's pool start-up);
- `core_share`: what the side-by-side stages got of the cores they wanted (`cpu_s / duration_s`), capped at 1.

    python benchmarks/plan_calibration.py [--repeat 2] --out calibration.json
    tierflow plan WORKFLOW --calibration calibration.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_AUTH_MODE", "token")  # as plan_accuracy: token auth as `ray start` has it on 2.60

import pyarrow as pa

from actors.streaming import Stream
from storage import ArtifactStore, StoreConfig
from workflows.journal import Journals
from workflows.model import Workflow, stage
from workflows.planner import SimConfig
from workflows.profile import StageRun, load_profiles

CHAIN, SHAPES, WORK_S, WIDE, WIDE_S = 5, (("wide", 2.0), ("half", 0.5)), 0.05, 4, 0.3
_SECONDS = ("actor_start_s", "first_call_s", "dispatch_s", "reclaim_s", "run_overhead_s", "stream_pool_start_s")


def _busy(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def _step(name: str, up: str | None, cpus: float, seconds: float = WORK_S) -> Any:
    def body(**inputs: Any) -> pa.Table:
        _busy(seconds)
        return pa.table({"x": list(range(100))})

    params = [inspect.Parameter(up, inspect.Parameter.KEYWORD_ONLY)] if up else []
    body.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return stage(body, name=name, cpus=cpus)


def _shard(shard: int) -> pa.Table:
    _busy(WORK_S)
    return pa.table({"x": list(range(100))})


def _reader(s: Any) -> int:
    return sum(t.num_rows for t in s)


def workflows() -> list[Workflow]:
    names = [f"c{i}" for i in range(CHAIN)] + [n for n, _ in SHAPES]
    cpus = [1.0] * CHAIN + [c for _, c in SHAPES]
    chain = [_step(n, names[i - 1] if i else None, c) for i, (n, c) in enumerate(zip(names, cpus, strict=True))]
    stream = stage(_shard, name="s", stream=Stream(shards=4))
    readers = [stage(_reader, name=f"r{i}", inputs={"s": "s"}) for i in (1, 2)]
    side = [_step("src", None, 1.0), *(_step(f"w{i}", "src", 1.0, WIDE_S) for i in range(WIDE))]
    return [
        Workflow("plan_calibrate_chain", chain),
        Workflow("plan_calibrate_stream", [stream, *readers]),
        Workflow("plan_calibrate_share", side),
    ]


def calibrate(store: StoreConfig) -> tuple[SimConfig, dict[str, float]]:
    """The constants from every calibration run in `store` (see the module docstring)."""
    journals = [j for j in Journals(ArtifactStore(store)).list() if j.ended_at is not None]
    first: dict[str, Any] = {}  # each workflow's first run: a warm-up, unless it is the only one
    for j in sorted(journals, key=lambda j: j.started_at):
        first.setdefault(j.workflow, j)
    warm_up = {j.run_id for j in first.values() if sum(k.workflow == j.workflow for k in journals) > 1}
    runs = {j.run_id: j for j in journals if j.run_id not in warm_up}
    chain, stream, side = (_by_run(load_profiles(store, wf.name)) for wf in workflows())
    per_run: dict[str, list[float]] = {}  # each constant, one figure per counted run

    def add(**figures: float) -> None:
        for k, v in figures.items():
            per_run.setdefault(k, []).append(v)

    names = [f"c{i}" for i in range(CHAIN)] + [n for n, _ in SHAPES]
    for run_id, st in chain.items():
        if run_id not in runs or any(n not in st for n in names):
            continue
        end = {n: r.started_at + float(r.profile["duration_s"]) for n, r in st.items()}
        start = st["c0"].started_at - runs[run_id].started_at
        dispatch = statistics.median(st[names[i]].started_at - end[names[i - 1]] for i in range(1, CHAIN))
        shape_gap = statistics.median(st[names[i]].started_at - end[names[i - 1]] for i in range(CHAIN, len(names)))
        warm = statistics.median(float(st[f"c{i}"].profile["duration_s"]) for i in range(1, CHAIN))
        add(
            first_call_s=float(st["c0"].profile["duration_s"]) - warm,
            dispatch_s=dispatch,
            reclaim_s=shape_gap - start - dispatch,
            run_overhead_s=runs[run_id].ended_at - max(end.values()),  # type: ignore[operator]
        )
    for run_id, st in (*chain.items(), *stream.items(), *side.items()):  # every workflow starts with a fresh actor
        if run_id in runs and st:
            add(actor_start_s=min(r.started_at for r in st.values()) - runs[run_id].started_at)
    for run_id, st in stream.items():
        if run_id in runs and "s" in st and "first_batch_s" in st["s"].metrics:
            add(stream_pool_start_s=st["s"].metrics["first_batch_s"] - float(st["s"].profile["cpu_s"]) / 4)
    for run_id, st in side.items():
        leaves = [r for name, r in st.items() if name != "src" and float(r.profile["duration_s"]) > 0]
        if run_id in runs and leaves:
            got = [float(r.profile["cpu_s"]) / float(r.profile["duration_s"]) for r in leaves]
            add(core_share=statistics.median(got))
    if set(per_run) != {*_SECONDS, "core_share"}:
        raise RuntimeError(f"no complete calibration run in {store}: run benchmarks/plan_accuracy.py")
    # Other load only ever adds to these costs: the least disturbed run is the best estimate of the machine's own.
    figures = {k: max(0.0, min(per_run[k])) for k in _SECONDS}
    figures["core_share"] = min(1.0, max(per_run["core_share"]))
    return SimConfig(**figures), figures


def _by_run(profiles: dict[str, list[StageRun]]) -> dict[str, dict[str, StageRun]]:
    out: dict[str, dict[str, StageRun]] = {}
    for name, rs in profiles.items():
        for r in rs:
            out.setdefault(r.run_id, {})[name] = r
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="measure the planner's machine constants on local Ray (2 CPUs)")
    ap.add_argument("--repeat", type=int, default=3, help="counted runs of each calibration workflow (default 3)")
    ap.add_argument("--out", type=Path, required=True, help="JSON file for `tierflow plan --calibration`")
    args = ap.parse_args()
    import ray  # noqa: PLC0415

    from actors.pool import shared_pools  # noqa: PLC0415
    from workflows.engine import run_workflow  # noqa: PLC0415

    store = StoreConfig.from_urls([tempfile.mkdtemp(prefix="plan_calibration-")])
    ray.init("local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for wf in workflows():
            for _ in range(1 + args.repeat):  # the first is a warm-up
                run_workflow(wf, store_config=store, use_cache=False, keep_warm_s=0)
    finally:
        shared_pools.release_all()
        ray.shutdown()
    _, figures = calibrate(store)
    args.out.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out} (load average {os.getloadavg()[0]:.2f}): {figures}")


if __name__ == "__main__":
    main()
