"""Pipelining: a CPU-bound streaming feature stage feeding a training consumer, three ways, in one run.

Peers (the same shard function and the same training step, from `workflows/builtin/pipeline.py`):
  tierflow streaming  `run_workflow(pipeline)`: the consumer reads shards while the pool makes them
  tierflow barrier    `run_workflow(pipeline, streaming=False)`: features commit, then fit starts
  Ray Data by hand    `ray.data.from_items(...).map_batches(shard fn, concurrency=(1, k))` iterated in a
                      `@ray.remote(num_cpus=1)` trainer actor: no DAG, no cache, no commit, no lineage
"Slowest stage alone" is the longer of two whole runs: `features` as a one-stage workflow, and `fit` over the
committed stream (features a cache hit) — makespans measured the same way as the streaming run's.
Every run starts from an empty store (cache off) with all CPUs free; repetitions are interleaved.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time

os.environ["RAY_AUTH_MODE"] = "token"  # as `ray start` on 2.60; set before Ray is imported

import ray
from benchlib import machine, publish, settle

from storage import StoreConfig
from workflows import Workflow
from workflows.builtin.pipeline import Trainer, make_shard, pipeline
from workflows.engine import run_workflow

SECTION = "pipelining"


class _Shard:
    def __init__(self, rows: int, cost_s: float, seed: int) -> None:
        self.args = (rows, cost_s, seed)

    def __call__(self, batch):
        return make_shard(int(batch["shard"][0].as_py()), *self.args)


@ray.remote(num_cpus=1)
class HandTrainer:
    def run(self, shards: int, rows: int, pre_cost: float, fit_cost: float, workers: int) -> int:
        ds = ray.data.from_items([{"shard": i} for i in range(shards)], override_num_blocks=shards).map_batches(
            _Shard,
            fn_constructor_args=(rows, pre_cost, 0),
            batch_size=1,
            batch_format="pyarrow",
            concurrency=(1, workers),
            num_cpus=1,
        )
        trainer = Trainer(0.05, 0)
        n = 0
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            trainer.step(table, fit_cost)
            n += 1
        return n


def tierflow_run(params: dict, streaming: bool) -> tuple[float, dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run = run_workflow(
            pipeline, params=params, store_config=StoreConfig.from_urls([tmp]), use_cache=False, streaming=streaming
        )
        wall = time.perf_counter() - t0
    durations = {n: r.result.duration_s for n, r in run.records.items()}
    first = {m.key: m.value for m in run.records["features"].result.metrics}.get("first_batch_s", float("nan"))
    return wall, {**durations, "first_batch_s": first}


def alone_runs(params: dict) -> tuple[float, float]:
    """Each stage as a run of its own: `features` in a one-stage workflow, then `fit` over that committed
    stream (features a cache hit). Whole-run makespans, like the streaming makespan they are compared with."""
    with tempfile.TemporaryDirectory() as tmp:
        store = StoreConfig.from_urls([tmp])
        only = Workflow("pipeline", [pipeline.stages["features"]])
        t0 = time.perf_counter()
        run_workflow(only, params={k: v for k, v in params.items() if not k.startswith("fit.")}, store_config=store)
        features = time.perf_counter() - t0
        settle()
        t0 = time.perf_counter()
        run = run_workflow(pipeline, params=params, store_config=store, rerun=["fit"])
        fit = time.perf_counter() - t0
        assert run.records["features"].status == "cached"
    return features, fit


def hand_run(args: argparse.Namespace, workers: int) -> float:
    t0 = time.perf_counter()
    actor = HandTrainer.remote()
    n = ray.get(actor.run.remote(args.shards, args.rows, args.pre_cost, args.fit_cost, workers))
    wall = time.perf_counter() - t0
    ray.kill(actor)
    assert n == args.shards
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=24)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--pre-cost", type=float, default=0.5, help="busy CPU seconds per shard in the feature stage")
    ap.add_argument("--fit-cost", type=float, default=0.5, help="busy CPU seconds per batch in the training stage")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs Ray may use (the consumer holds one)")
    ap.add_argument("--write", action="store_true", help="write the results into BENCHMARKS.md")
    args = ap.parse_args()
    ray.init("local", include_dashboard=False, num_cpus=args.cpus, log_to_driver=False)
    workers = max(1, args.cpus - 1)
    params = {"shards": args.shards, "rows": args.rows, "features.cost_s": args.pre_cost, "fit.cost_s": args.fit_cost}
    keys = ("streaming", "barrier", "hand", "alone", "features alone", "fit alone", "first")
    times: dict[str, list[float]] = {k: [] for k in keys}
    tierflow_run({**params, "shards": 2}, streaming=True)  # warm imports and the Ray Data code path once
    settle()
    for _ in range(args.repeat):
        wall, _ = tierflow_run(params, streaming=True)
        times["streaming"].append(wall)
        settle()
        wall, d = tierflow_run(params, streaming=False)
        times["barrier"].append(wall)
        times["first"].append(d["first_batch_s"])
        settle()
        features_alone, fit_alone = alone_runs(params)
        times["features alone"].append(features_alone)
        times["fit alone"].append(fit_alone)
        times["alone"].append(max(features_alone, fit_alone))
        settle()
        times["hand"].append(hand_run(args, workers))
        settle()
    ray.shutdown()
    med = {k: statistics.median(v) for k, v in times.items()}
    ideal = max(args.shards * args.pre_cost / workers, args.shards * args.fit_cost)

    def row(name: str, key: str) -> str:
        return f"| {name} | {med[key]:.2f} s | {min(times[key]):.2f} s |"

    lines = [
        f"## Pipelining: streaming vs barrier vs hand-written Ray Data ({dt.date.today().isoformat()})",
        "",
        f"Machine: {machine()}; Python {platform.python_version()}, Ray {ray.__version__}.",
        f"Command: `python {shlex.join(['benchmarks/pipelining.py', *sys.argv[1:]])}`",
        f"Workload: {args.shards} shards x {args.rows} rows; feature stage {args.pre_cost:g} s busy CPU per shard on "
        f"a pool of {workers}; training {args.fit_cost:g} s per batch on 1 CPU; compute alone is {ideal:.1f} s "
        f"per stage. Median (min) of {args.repeat}, interleaved.",
        "",
        "| peer | makespan (median) | min |",
        "|---|---|---|",
        row("tierflow streaming", "streaming"),
        row("tierflow barrier (`--no-streaming`)", "barrier"),
        row("Ray Data by hand", "hand"),
        row("`features` alone (a one-stage run)", "features alone"),
        row("`fit` alone (a run where `features` is a cache hit)", "fit alone"),
        row("slowest stage alone (per repetition)", "alone"),
        "",
        "| target | measured | met |",
        "|---|---|---|",
        _target("streaming / slowest stage alone <= 1.15x", med["streaming"] / med["alone"], 1.15, below=True),
        _target("barrier / streaming >= 1.6x", med["barrier"] / med["streaming"], 1.6, below=False),
        _target("streaming / Ray Data by hand <= 1.10x", med["streaming"] / med["hand"], 1.10, below=True),
        "",
        f"First batch reached the consumer {med['first']:.2f} s after the stream started (Ray Data start-up and "
        "the pool's first actor).",
    ]
    publish(SECTION, "\n".join(lines), args.write)


def _target(name: str, value: float, bound: float, *, below: bool) -> str:
    met = value <= bound if below else value >= bound
    return f"| {name} | {value:.2f}x | {'yes' if met else 'no'} |"


if __name__ == "__main__":
    main()
