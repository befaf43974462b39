"""The planner's machine-level constants, from a calibration run that is none of plan_accuracy's cases.

Three tiny workflows, run on the local Ray the profiles are taken on, each `1 + repeat` times: the first run
of each is a warm-up and not counted (a fresh Ray session is still starting its workers, Ray Data its own
actors):
- `plan_calibrate_chain`: five 0.05 s stages in a chain (one warm actor), then a 2-CPU stage and a
  0.5-CPU stage, each a new shape on a full node (the idle actors of the last shape must be ended first);
- `plan_calibrate_stream`: a 4-shard stream read by two consumers, so it runs alone (not fused);
- `plan_calibrate_share`: four 0.3 s CPU-bound stages side by side after a source, two at a time on 2 CPUs.

From their records (medians over the counted runs):
- `actor_start_s`: run start -> first stage start (placement and a fresh actor);
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
    starts, firsts, gaps, shape_gaps, tails, pools = [], [], [], [], [], []
    for run_id, st in chain.items():
        names = [f"c{i}" for i in range(CHAIN)] + [n for n, _ in SHAPES]
        if run_id not in runs or any(n not in st for n in names):
            continue
        end = {n: r.started_at + float(r.profile["duration_s"]) for n, r in st.items()}
        starts.append(st["c0"].started_at - runs[run_id].started_at)
        firsts.append(
            float(st["c0"].profile["duration_s"])
            - statistics.median(float(st[f"c{i}"].profile["duration_s"]) for i in range(1, CHAIN))
        )
        gaps += [st[names[i]].started_at - end[names[i - 1]] for i in range(1, CHAIN)]
        shape_gaps += [st[names[i]].started_at - end[names[i - 1]] for i in range(CHAIN, len(names))]
        tails.append(runs[run_id].ended_at - max(end.values()))  # type: ignore[operator]
    for run_id, st in stream.items():
        if run_id in runs and "s" in st and "first_batch_s" in st["s"].metrics:
            pools.append(st["s"].metrics["first_batch_s"] - float(st["s"].profile["cpu_s"]) / 4)
    shares = [
        float(r.profile["cpu_s"]) / float(r.profile["duration_s"])
        for run_id, st in side.items()
        if run_id in runs
        for name, r in st.items()
        if name != "src" and float(r.profile["duration_s"]) > 0
    ]
    if not (starts and pools and shares):
        raise RuntimeError(f"no complete calibration run in {store}: run benchmarks/plan_accuracy.py")
    figures = {
        "actor_start_s": statistics.median(starts),
        "first_call_s": max(0.0, statistics.median(firsts)),
        "dispatch_s": max(0.0, statistics.median(gaps)),
        "stream_pool_start_s": max(0.0, statistics.median(pools)),
        "run_overhead_s": max(0.0, statistics.median(tails)),
        "core_share": min(1.0, statistics.median(shares)),
    }
    figures["reclaim_s"] = max(0.0, statistics.median(shape_gaps) - figures["actor_start_s"] - figures["dispatch_s"])
    return SimConfig(**figures), figures


def _by_run(profiles: dict[str, list[StageRun]]) -> dict[str, dict[str, StageRun]]:
    out: dict[str, dict[str, StageRun]] = {}
    for name, rs in profiles.items():
        for r in rs:
            out.setdefault(r.run_id, {})[name] = r
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="measure the planner's machine constants on local Ray (2 CPUs)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each calibration workflow (default 2)")
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
