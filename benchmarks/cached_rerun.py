"""Cached re-run of the built-in `digits` workflow: the first run vs the same run again with the cache on.

Ray starts once, before anything is timed. Each repetition gets a fresh store (memory hot tier + a local
durable directory in a temp dir) and runs `run_workflow` with the MLflow hook the CLI uses (sqlite in the
same temp dir), timed from the call until it returns:
  first    every stage executes (the cache is empty): actors start, train, evaluate, compress, commit, register
  re-run   the same workflow and parameters against the same durable tier, through a fresh hot tier (as a new
           `tierflow run` process would see it); every stage must come back `cached`, no actor is created
`digits` is measured without its `serve` stage, which is `cache=False` by design (a deployment is a side effect,
so it runs again on every run); with `--with-serve` the whole workflow is measured too (serve deploys Ray Serve
on a free port each run; the re-run executes serve again and is reported separately).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ["RAY_AUTH_MODE"] = "token"  # as `ray start` on 2.60; set before Ray is imported

import ray
from benchlib import machine, publish
from stage_overhead import loadavg, revision

from storage import StoreConfig
from workflows.builtin.digits import digits
from workflows.engine import run_workflow
from workflows.hooks import CACHED, SUCCEEDED
from workflows.lineage import MLflowHook
from workflows.model import Workflow

SECTION = "cached_rerun"
APP = "bench-cached-rerun"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_run(wf: Workflow, store: StoreConfig, uri: str, params: dict[str, Any]) -> tuple[float, dict[str, str]]:
    """Wall time of one `run_workflow` with the MLflow hook (built as the CLI builds it) and each stage's status."""
    hook = MLflowHook(uri)
    t0 = time.perf_counter()
    run = run_workflow(wf, params=params, store_config=store, hooks=[hook], use_cache=True)
    elapsed = time.perf_counter() - t0
    assert run.status == SUCCEEDED, f"run {run.run_id} ended {run.status}"
    hits = [run.records[n] for n in wf.order if run.records[n].status == CACHED]
    assert all(r.result is None for r in hits), "a cached stage has a result: it ran"
    return elapsed, {n: run.records[n].status for n in wf.order}


def pair(wf: Workflow, root: Path, tag: str, uri: str, params: dict[str, Any], expect: dict[str, str]) -> dict:
    """First run into a fresh store, then the re-run against its durable tier through a new hot tier."""
    durable = str(root / f"store-{tag}")
    first_s, first = timed_run(wf, StoreConfig.from_urls([f"memory://bench-{tag}-a", durable]), uri, params)
    assert set(first.values()) == {SUCCEEDED}, f"first run: expected every stage to execute: {first}"
    again_s, again = timed_run(wf, StoreConfig.from_urls([f"memory://bench-{tag}-b", durable]), uri, params)
    assert again == expect, f"re-run: expected {expect}, got {again}"
    return {"first": first_s, "again": again_s}


def report(res: dict[str, list[dict]], repeats: int, warmup: int, command: str, load: str, core: Workflow) -> str:
    lines = [
        "## Cached re-run of `digits` (first run vs re-run with the cache on)",
        "",
        f"- Date: {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"- Machine: {machine()}; load average (1/5/15 min) {load}",
        f"- Python {platform.python_version()}, Ray {ray.__version__}; local Ray started in-process once "
        f"(`ray.init`, not timed), `num_cpus=2`, no GPU (train falls back to CPU); code: {revision()}",
        f"- Command: `{command}`",
        f"- Wall time of `run_workflow` with the CLI's MLflow hook (sqlite), default parameters; {repeats} "
        f"repetition(s) after {warmup} warm-up, each with a fresh store (memory + local durable dir). The re-run "
        "uses the same durable tier through a fresh memory tier, as a new `tierflow run` process would.",
        f"- `digits` without `serve` = stages {', '.join(f'`{n}`' for n in core.order)}; `serve` is `cache=False` "
        "by design (a deployment is a side effect), so with it a re-run cannot skip every stage.",
        "",
        "| workflow | first run s (median; min-max) | re-run s (median; min-max) | first / re-run | "
        "re-run stage statuses |",
        "|---|---:|---:|---:|---|",
    ]
    summary = []
    for key, label, statuses in (
        ("core", "`digits` without `serve`", "all `cached`, none has a stage result (asserted)"),
        ("full", "`digits` (with `serve`, Ray Serve on a free port)", "4 `cached`, `serve` executed (asserted)"),
    ):
        if not res.get(key):
            continue
        first = [r["first"] for r in res[key]]
        again = [r["again"] for r in res[key]]
        ratio = statistics.median(first) / statistics.median(again)
        lines.append(
            f"| {label} | {statistics.median(first):.2f} ({min(first):.2f}-{max(first):.2f}) | "
            f"{statistics.median(again):.3f} ({min(again):.3f}-{max(again):.3f}) | {ratio:.1f}x | {statuses} |"
        )
        summary.append((key, ratio))
    lines.append("")
    for key, ratio in summary:
        if key == "core":
            verdict = "met" if ratio >= 20 else "**missed**"
            lines.append(
                f"- **Cached re-run of `digits` (without `serve`): {ratio:.1f}x faster than the first run, no stage "
                f"executed** (target >= 20x: {verdict})"
            )
        else:
            lines.append(
                f"- Whole `digits` including `serve`: {ratio:.1f}x. The re-run is almost all `serve` rolling the "
                "same model out again (blue/green: start a candidate replica, check it, switch, delete the old one); "
                "Ray Serve's controller and proxy start once, in the benchmark's first (warm-up) run."
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed first-run/re-run pairs (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed pairs first (default 1)")
    parser.add_argument("--with-serve", action="store_true", help="also measure the whole workflow with serve")
    parser.add_argument("--write", action="store_true", help="update the section in BENCHMARKS.md")
    args = parser.parse_args()
    if args.repeats < 1 or args.warmup < 0:
        parser.error("need --repeats >= 1, --warmup >= 0")
    command = shlex.join(["cd", "/work/main"]) + " && " + shlex.join([".venv/bin/python", *sys.argv])
    core = Workflow("digits", [digits.stages[n] for n in digits.order if n != "serve"], description=digits.description)
    load_before = loadavg()
    res: dict[str, list[dict]] = {"core": [], "full": []}
    cwd = os.getcwd()
    ray.init("local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="tierflow-cached-rerun-") as tmp:
            root = Path(tmp)
            os.chdir(root)  # MLflow's default artifact root (./mlruns) lands in the temp dir, not the repo
            uri = f"sqlite:///{root / 'mlflow.db'}"
            serve_params = {"serve.port": free_port(), "serve.app_name": APP}
            every = dict.fromkeys(core.order, CACHED)
            for rep in range(args.warmup + args.repeats):
                r = pair(core, root, f"core{rep}", uri, {}, every)
                line = f"core first={r['first']:.2f}s re-run={r['again']:.3f}s"
                if args.with_serve:
                    f = pair(digits, root, f"full{rep}", uri, serve_params, {**every, "serve": SUCCEEDED})
                    line += f"; full first={f['first']:.2f}s re-run={f['again']:.3f}s"
                if rep >= args.warmup:
                    res["core"].append(r)
                    if args.with_serve:
                        res["full"].append(f)
                tag = "warm-up" if rep < args.warmup else f"rep {rep - args.warmup + 1}/{args.repeats}"
                print(f"{tag}: {line}", file=sys.stderr)
            if args.with_serve:
                from ray import serve  # noqa: PLC0415

                for name in (APP, f"{APP}-canary"):
                    serve.delete(name)
                serve.shutdown()
            os.chdir(cwd)
    finally:
        os.chdir(cwd)
        ray.shutdown()
    body = report(res, args.repeats, args.warmup, command, f"{load_before} before, {loadavg()} after", core)
    publish(SECTION, body, args.write)


if __name__ == "__main__":
    main()
