"""Serving under load: tierflow's Serve app (batching on / off) vs a bare Ray Serve deployment, open-loop.

Peers, each 1 replica with the same `num_cpus`, `max_ongoing_requests` and `max_queued_requests`:
  tierflow batching on   `Rollout.deploy` of `serving.app` (FastAPI + pydantic), max_batch_size=32, wait 5 ms
  tierflow batching off  the same app with max_batch_size=1
  bare Serve             a plain `@serve.deployment` whose `__call__` parses JSON and runs `predict_proba`
Capacity C = closed-loop throughput at concurrency 32 against tierflow batching on; then open-loop runs at
0.5/1/2 x C (requests sent on a fixed schedule whatever the completions; latency counted from the scheduled
send time), then closed-loop saturation at concurrency 64. One 64-feature row per request.
"""

from __future__ import annotations

import os

os.environ["RAY_AUTH_MODE"] = "token"  # before Ray is imported (tierflow's clusters run token auth)

import argparse
import asyncio
import datetime as dt
import json
import platform
import re
import shlex
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastapi
import httpx
import numpy as np
import pydantic
import ray
import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from actors.context import StageContext
from serving.config import ModelSource, ServeConfig
from serving.loading import load_model
from serving.model import predict_proba
from serving.rollout import Rollout, replica_options
from storage import ArtifactStore, StoreConfig
from workflows.builtin.digits import _raw_test_rows, preprocess, train

BENCH_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
SECTION = "serving_load"
PEERS = {"tf-batch": "tierflow, batching on", "tf-nobatch": "tierflow, batching off", "bare": "bare Ray Serve"}


@serve.deployment
class Bare:
    def __init__(self, source: ModelSource) -> None:
        self.model, _ = load_model(source)

    async def __call__(self, request: Request) -> JSONResponse:
        rows = np.asarray((await request.json())["instances"], dtype=np.float32)
        proba = predict_proba(self.model, rows)
        return JSONResponse({"predictions": proba.argmax(1).tolist(), "probabilities": proba.round(6).tolist()})


@dataclass
class Run:
    peer: str
    mode: str  # "0.5xC" ... or "closed 64"
    duration: float
    offered: float = 0.0  # req/s scheduled (open loop)
    sent: int = 0
    lag_ms: list[float] = field(default_factory=list)  # actual - scheduled send time
    recs: list[tuple[float, int]] = field(default_factory=list)  # (latency s, status; -1 = exception)
    ok_in_window: int = 0
    client_cpu: float = 0.0  # this process (load generator + idle Ray driver), % of one core
    machine_cpu: float = 0.0  # both cores, %

    def lat(self, q: float) -> float:
        ok = [t for t, s in self.recs if s == 200]
        return float(np.percentile(ok, q)) * 1e3 if ok else float("nan")

    @property
    def codes(self) -> Counter[int]:
        return Counter(s for _, s in self.recs)

    @property
    def throughput(self) -> float:
        return self.ok_in_window / self.duration


def cpu_busy() -> tuple[float, float]:
    vals = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(vals) - vals[3] - vals[4], sum(vals)  # busy, total jiffies (idle + iowait excluded)


async def measured(run: Run, work: Any) -> Run:
    b0, t0, c0, w0 = *cpu_busy(), time.process_time(), time.perf_counter()
    await work
    b1, t1 = cpu_busy()
    run.machine_cpu = 100 * (b1 - b0) / max(t1 - t0, 1)
    run.client_cpu = 100 * (time.process_time() - c0) / (time.perf_counter() - w0)
    return run


async def post(client: httpx.AsyncClient, url: str, body: bytes, start: float, end: float, run: Run) -> None:
    try:
        status = (await client.post(url, content=body, headers={"content-type": "application/json"})).status_code
    except httpx.HTTPError:
        status = -1
    done = time.perf_counter()
    run.recs.append((done - start, status))
    run.ok_in_window += status == 200 and done <= end


async def open_loop(client: httpx.AsyncClient, url: str, bodies: list[bytes], run: Run) -> None:
    n = int(run.offered * run.duration)
    t0 = time.perf_counter() + 0.05
    end, tasks = t0 + run.duration, []
    for i in range(n):
        sched = t0 + i / run.offered
        if (delay := sched - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        run.lag_ms.append((time.perf_counter() - sched) * 1e3)
        tasks.append(asyncio.create_task(post(client, url, bodies[i % len(bodies)], sched, end, run)))
    run.sent = n
    await asyncio.gather(*tasks)


async def closed_loop(client: httpx.AsyncClient, url: str, bodies: list[bytes], run: Run, conc: int) -> None:
    end = time.perf_counter() + run.duration

    async def worker(k: int) -> None:
        while (now := time.perf_counter()) < end:
            await post(client, url, bodies[(k + run.sent) % len(bodies)], now, end, run)
            run.sent += 1

    await asyncio.gather(*(worker(k) for k in range(conc)))


def progress(run: Run) -> None:
    c = run.codes
    print(
        f"{run.peer:10} {run.mode:10} {run.throughput:7.1f} ok/s p50 {run.lat(50):7.1f} ms p99 {run.lat(99):7.1f} ms "
        f"503={c[503]} other={sum(c.values()) - c[200] - c[503]} client {run.client_cpu:.0f}% machine "
        f"{run.machine_cpu:.0f}%",
        file=sys.stderr,
    )


async def bench(base: str, bodies: list[bytes], duration: float) -> tuple[Run, list[Run], list[Run], dict]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        for peer in PEERS:  # warm-up: connections, replica code paths
            await closed_loop(client, f"{base}/{peer}/predict", bodies, Run(peer, "warm-up", 1.0), 16)
        cap = Run("tf-batch", "closed 32", duration)
        await measured(cap, closed_loop(client, f"{base}/tf-batch/predict", bodies, cap, 32))
        progress(cap)
        capacity = cap.throughput
        runs: list[Run] = []
        for mult in (0.5, 1.0, 2.0):
            for peer in PEERS:
                await asyncio.sleep(1.0)  # let queues drain
                run = Run(peer, f"{mult:g}xC", duration, offered=mult * capacity)
                runs.append(await measured(run, open_loop(client, f"{base}/{peer}/predict", bodies, run)))
                progress(run)
        sat: list[Run] = []
        for peer in PEERS:
            await asyncio.sleep(1.0)
            run = Run(peer, "closed 64", duration)
            sat.append(await measured(run, closed_loop(client, f"{base}/{peer}/predict", bodies, run, 64)))
            progress(run)
        stats = (await client.get(f"{base}/tf-batch/stats")).json()
    return cap, runs, sat, stats


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(tmp: str, epochs: int) -> tuple[StoreConfig, ModelSource, np.ndarray]:
    """Train the digits MLP in-process (no MLflow) and put the bundle in a local store."""
    ctx = StageContext(run_id="b", stage="s", node_id="n", device="cpu")
    table = preprocess.fn(ctx)
    bundle = train.fn(ctx, table, epochs=epochs)
    store_cfg = StoreConfig.from_urls([f"{tmp}/store"])
    ref = ArtifactStore(store_cfg).put(bundle, run_id="bench", stage="train")
    return store_cfg, ModelSource(digest=ref.digest, artifact=ref, store_config=store_cfg), _raw_test_rows(table)[0]


def deploy(store_cfg: StoreConfig, source: ModelSource, port: int, ongoing: int, queued: int) -> ServeConfig:
    common: dict[str, Any] = {"port": port, "max_ongoing_requests": ongoing, "max_queued_requests": queued}
    on = ServeConfig(app_name="tf-batch", max_batch_size=32, batch_wait_timeout_s=0.005, **common)
    Rollout(store_cfg, on).deploy(source)
    Rollout(store_cfg, ServeConfig(app_name="tf-nobatch", max_batch_size=1, **common)).deploy(source)
    bare = Bare.options(
        ray_actor_options=replica_options(on), num_replicas=1, max_ongoing_requests=ongoing, max_queued_requests=queued
    )
    serve.run(bare.bind(source), name="bare", route_prefix="/bare")
    return on


def machine() -> str:
    cpuinfo, meminfo = Path("/proc/cpuinfo").read_text(), Path("/proc/meminfo").read_text()
    model = m.group(1).strip() if (m := re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)) else platform.processor()
    kib = int(m.group(1)) if (m := re.search(r"^MemTotal:\s*(\d+) kB", meminfo, re.M)) else 0
    return f"{os.cpu_count()} cores, {kib / 2**20:.1f} GiB RAM, {model}"


def row(r: Run, *cells: str) -> str:
    c = r.codes
    other = sum(c.values()) - c[200] - c[503]
    return (
        f"| {' | '.join(cells)} | {r.throughput:,.1f} | {r.lat(50):.1f} | {r.lat(99):.1f} | {c[503]} | {other} "
        f"| {r.client_cpu:.0f} | {r.machine_cpu:.0f} |"
    )


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def report(cap_run: Run, runs: list[Run], sat: list[Run], stats: dict, head: list[str]) -> str:
    capacity = cap_run.throughput
    tail = "p50 ms | p99 ms | 503 | other errors | client CPU % | machine CPU % |"
    open_rows = [row(r, r.mode, PEERS[r.peer], f"{r.offered:,.0f}", f"{np.percentile(r.lag_ms, 99):.1f}") for r in runs]
    sat_by = {r.peer: r for r in sat}
    half = {r.peer: r for r in runs if r.mode == "0.5xC"}
    batch_x = sat_by["tf-batch"].throughput / sat_by["tf-nobatch"].throughput
    p50_x = half["tf-batch"].lat(50) / half["bare"].lat(50)
    bare_sat = sat_by["bare"].throughput
    return "\n".join(
        [
            *head,
            "",
            f"Capacity C = **{capacity:,.0f} req/s**: closed-loop, concurrency 32, tierflow batching on "
            f"(p50 {cap_run.lat(50):.1f} ms, p99 {cap_run.lat(99):.1f} ms).",
            "",
            "Open loop (fixed interval; latency from the scheduled send time, so generator lag counts against it):",
            "",
            f"| load | peer | offered req/s | send lag p99 ms | throughput (200/s) | {tail}",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *open_rows,
            "",
            "Saturation (closed loop, concurrency 64):",
            "",
            f"| peer | throughput (200/s) | {tail}",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            *(row(r, PEERS[r.peer]) for r in sat),
            "",
            f"- **Batching on / off at saturation: {batch_x:.2f}x** (target >= 3x: {verdict(batch_x >= 3)})",
            f"- **tierflow (batching on) p50 / bare p50 at 0.5xC: {p50_x:.2f}x** (target <= 1.2x: "
            f"{verdict(p50_x <= 1.2)}); batching off / bare: {half['tf-nobatch'].lat(50) / half['bare'].lat(50):.2f}x",
            f"- Saturation throughput vs bare: batching on {sat_by['tf-batch'].throughput / bare_sat:.2f}x"
            f", batching off {sat_by['tf-nobatch'].throughput / bare_sat:.2f}x",
            f"- tierflow batching-on replica `/stats` after the runs (last <= 10,000 batches): mean batch "
            f"{stats['batch_size_mean']:.2f} rows, max {stats['batch_size_max']}",
        ]
    )


def write_section(body: str) -> None:
    begin, end = f"<!-- BEGIN {SECTION} -->", f"<!-- END {SECTION} -->"
    block = f"{begin}\n{body}\n{end}"
    text = BENCH_MD.read_text()
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    BENCH_MD.write_text(text)


def main() -> None:
    defaults = ServeConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration-s", type=float, default=10.0, help="seconds per measured run (default 10)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 s per run, 3 training epochs")
    parser.add_argument("--max-ongoing-requests", type=int, default=defaults.max_ongoing_requests)
    parser.add_argument("--max-queued-requests", type=int, default=defaults.max_queued_requests)
    parser.add_argument("--write", action="store_true", help=f"update the section in {BENCH_MD.name}")
    args = parser.parse_args()
    duration = 2.0 if args.quick else args.duration_s
    ongoing, queued = args.max_ongoing_requests, args.max_queued_requests
    command = shlex.join(["cd", "/work/main"]) + " && " + shlex.join([".venv/bin/python", *sys.argv])
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    ray.init("local", num_cpus=2, include_dashboard=False)
    try:
        with tempfile.TemporaryDirectory(prefix="tierflow-bench-") as tmp:
            store_cfg, source, x = build_model(tmp, epochs=3 if args.quick else 10)
            port = free_port()
            cfg = deploy(store_cfg, source, port, ongoing, queued)
            bodies = [json.dumps({"instances": [r.round(4).tolist()]}).encode() for r in x]
            cap, runs, sat, stats = asyncio.run(bench(f"http://127.0.0.1:{port}", bodies, duration))
    finally:
        serve.shutdown()
        ray.shutdown()
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    head = [
        "## Serving under load: tierflow Serve app (batching on / off) vs bare Ray Serve, 1 replica",
        "",
        f"- Date: {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"- Machine: {machine()}; load average (1/5/15 min) {' '.join(load_before)} before, "
        f"{' '.join(load_after)} after",
        f"- Python {platform.python_version()}, Ray {ray.__version__}, torch {torch.__version__}, "
        f"FastAPI {fastapi.__version__}, pydantic {pydantic.__version__}, httpx {httpx.__version__}; "
        "local Ray started in-process with `num_cpus=2`",
        f"- Command: `{command}`",
        f"- Each peer: 1 replica, `num_cpus={cfg.num_cpus}`, `max_ongoing_requests={ongoing}`, "
        f"`max_queued_requests={queued}` (ServeConfig defaults: {defaults.max_ongoing_requests}/"
        f"{defaults.max_queued_requests}); batching on = `max_batch_size=32, batch_wait_timeout_s=0.005`, "
        "off = `max_batch_size=1`. Bare: plain `@serve.deployment`, `await request.json()`, `predict_proba`, "
        "JSON out; no validation, no batching.",
        f"- One digits row (64 floats) per POST; {duration:g} s per run; peers interleaved at each load. The load "
        "generator (one asyncio loop, httpx) runs in the driver process and **shares the 2 cores** with the Serve "
        "proxy and replicas: client CPU % is this process (100 = one core), machine CPU % is both cores.",
    ]
    body = report(cap, runs, sat, stats, head)
    print(body)
    if args.write:
        write_section(body)
        print(f"\nwrote section {SECTION!r} to {BENCH_MD}", file=sys.stderr)


if __name__ == "__main__":
    main()
