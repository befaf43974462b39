"""Serving under load: tierflow's Serve app (batching on / off) vs a bare Ray Serve deployment, open loop.

Per model, limits setting and peer: saturation (its own capacity C), open loop at 0.5/1/2 x its C, then every
peer at one common rate for the p50 comparison (see the report's method note). Two models: the trained digits
MLP (its forward pass is ~1% of a request's cost) and a wide MLP (`--hidden`, `--depth`; random weights behind
the digits scaler, saved the same way) whose forward pass is a real part of it. Every peer serves the same weights.
"""

from __future__ import annotations

import os
import sys

os.environ["RAY_AUTH_MODE"] = "token"  # before Ray is imported (tierflow's clusters run token auth)
os.environ["RAY_SERVE_LOG_TO_STDERR"] = "0"  # access logs to files only: not streamed into this process
# --direct-ingress: read by Serve's processes when they start, as on a real cluster; no load balancer here
# to deregister a stopping replica from, so no minimum drain
os.environ.update(
    {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}
    if "--direct-ingress" in sys.argv
    else {}
)

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import platform
import shlex
import socket
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import fastapi
import numpy as np
import pydantic
import ray
import torch
from benchlib import machine, publish
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from actors.context import StageContext
from serving.config import ModelSource, ServeConfig
from serving.loading import load_model
from serving.model import build_mlp, predict_proba
from serving.rollout import Rollout, direct_urls, replica_options
from storage import ArtifactStore, StoreConfig
from workflows.builtin.digits import N_FEATURES, _bundle, _raw_test_rows, preprocess, train

DIRECT = "--direct-ingress" in sys.argv
SECTION = "serving_load_direct" if DIRECT else "serving_load"
PEERS = {
    "tf-batch": "tierflow, batching on",
    "tf-nobatch": "tierflow, batching off",
    "bare": "bare Ray Serve",
    "tf-thread": "tierflow, batching on, Serve's user-code thread",
}
OPEN = ("tf-batch", "tf-nobatch", "bare")  # tf-thread runs the saturation rounds only
ROLES = ("client", "proxy", "replica", "ray", "outside")
SHORT = {"tf-batch": "on", "tf-nobatch": "off", "bare": "bare", "tf-thread": "on with the thread"}
SATURATION = "saturation"  # closed loop, concurrency = max_ongoing_requests; round 1 gives the peer's C
JSON = {"content-type": "application/json"}
BARE_OPTIONS = ("ray_actor_options", "max_ongoing_requests", "max_queued_requests", "request_router_config")
# A closed-loop worker refused with a 503 pauses this long: Serve's router counts a request until its response
# stream has ended, a little after the client has the answer, so a loop as wide as max_ongoing_requests is now
# and then one over and refused; resent at once, refusals would spin and take the proxy's CPU from the replica.
REFUSED_PAUSE_S = 0.01
COMMON = "0.5xCmin"  # every peer at the same open-loop rate, half the smallest C: the p50 comparison
INGRESS_NOTE = (
    "; **direct ingress**: `RAY_SERVE_ENABLE_DIRECT_INGRESS=1` (and "
    "`RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=0`) set before Ray starts, so each peer's replica also "
    "serves HTTP on a port of its own; every request below goes "
    "there (`tierflow serve status` lists those URLs as `direct_urls`), past Serve's proxy and the two Ray calls it "
    "makes per request (proxy to replica, and the replica's call back for the request body)"
)


@serve.deployment
class Bare:
    def __init__(self, source: ModelSource) -> None:
        self.model, _ = load_model(source)

    async def __call__(self, request: Request) -> JSONResponse:
        rows = np.asarray((await request.json())["instances"], dtype=np.float32)
        proba = predict_proba(self.model, rows)
        return JSONResponse({"predictions": proba.argmax(1).tolist(), "probabilities": proba.round(6).tolist()})


@dataclass
class Model:
    name: str  # "digits" or "wide"
    source: ModelSource
    params: int
    cost_ms: dict[int, float]  # rows per call -> ms per forward pass (one thread, as in a replica)

    def describe(self) -> str:
        per_row = ", ".join(f"{ms:.2f} ms for {n} rows ({ms / n:.3f} ms/row)" for n, ms in self.cost_ms.items())
        return f"`{self.name}`: {self.params / 1e6:.2f}M parameters; forward pass {per_row}"


@dataclass
class Run:
    model: str
    limits: str  # "max_ongoing_requests/max_queued_requests"
    peer: str
    mode: str  # "0.5xC" ... or "closed 64"
    duration: float
    offered: float = 0.0  # req/s scheduled (open loop)
    lag_ms: list[float] = field(default_factory=lambda: [0.0])  # actual - scheduled send time
    recs: list[tuple[float, int]] = field(default_factory=list)  # (latency s, status; -1 = exception)
    ok_in_window: int = 0  # 200s completed before the end of the sending window
    cpu: dict[str, float] = field(default_factory=dict)  # % of one core by role
    stats: dict[str, Any] = field(default_factory=dict)  # tierflow's /stats after a limits setting

    def lat(self, q: float, status: int = 200) -> float:
        ok = [t for t, s in self.recs if s == status]
        return float(np.percentile(ok, q)) * 1e3 if ok else float("nan")

    def cells(self) -> str:
        c = Counter(s for _, s in self.recs)
        cpu = " / ".join(f"{self.cpu[k]:.0f}" for k in ROLES)
        refused = f"{c[503]} | {self.lat(99, 503):.1f}" if c[503] else "0 | -"
        return (
            f"{self.ok_in_window / self.duration:,.1f} | {self.lat(50):.1f} | {self.lat(99):.1f} | {refused} | "
            f"{sum(c.values()) - c[200] - c[503]} | {cpu} |"
        )


def cpu_seconds(peer: str) -> dict[str, float]:
    """CPU seconds so far: this process, the Serve proxy, the peer's replica, the rest of our Ray, the rest."""
    tick, procs = os.sysconf("SC_CLK_TCK"), {}
    for d in Path("/proc").iterdir():
        try:
            f = (d / "stat").read_text().rsplit(")", 1)[1].split()
            procs[int(d.name)] = (int(f[1]), (int(f[11]) + int(f[12])) / tick, (d / "cmdline").read_bytes())
        except (OSError, ValueError, IndexError):
            continue
    ours, grew = {os.getpid()}, True
    while grew:  # Ray's processes descend from this driver (ray.init("local") starts them)
        new = {p for p, (pp, _, _) in procs.items() if pp in ours} - ours
        ours, grew = ours | new, bool(new)
    out = dict.fromkeys(ROLES, 0.0)
    for pid in ours & procs.keys():
        _, cpu, cmd = procs[pid]
        role = "client" if pid == os.getpid() else "proxy" if b"ProxyActor" in cmd else "ray"
        out["replica" if f"ServeReplica:{peer}:".encode() in cmd else role] += cpu
    stat = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    out["outside"] = (sum(stat) - stat[3] - stat[4]) / tick - sum(out.values())  # machine busy - ours
    return out


async def measured(run: Run, work: Any) -> Run:
    c0, w0 = cpu_seconds(run.peer), time.perf_counter()
    await work
    c1, wall = cpu_seconds(run.peer), time.perf_counter() - w0
    run.cpu = {k: 100 * (c1[k] - c0[k]) / wall for k in ROLES}  # % of one core
    print(f"{run.model:6} {run.limits:7} {run.peer:10} {run.mode:9} {run.cells()}", file=sys.stderr)
    return run


async def post(client: aiohttp.ClientSession, url: str, body: bytes, start: float, end: float, run: Run) -> int:
    try:
        async with client.post(url, data=body, headers=JSON) as response:
            await response.read()
            status = response.status
    except (aiohttp.ClientError, TimeoutError):
        status = -1
    done = time.perf_counter()
    run.recs.append((done - start, status))
    run.ok_in_window += status == 200 and done <= end
    return status


async def open_loop(client: aiohttp.ClientSession, url: str, bodies: list[bytes], run: Run) -> None:
    t0, tasks = time.perf_counter() + 0.05, []
    for i in range(int(run.offered * run.duration)):
        sched = t0 + i / run.offered
        if (delay := sched - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        run.lag_ms.append((time.perf_counter() - sched) * 1e3)
        work = post(client, url, bodies[i % len(bodies)], sched, t0 + run.duration, run)
        tasks.append(asyncio.create_task(work))
    await asyncio.gather(*tasks)


async def closed_loop(client: aiohttp.ClientSession, url: str, bodies: list[bytes], run: Run, conc: int) -> None:
    end = time.perf_counter() + run.duration

    async def worker(k: int) -> None:
        while (now := time.perf_counter()) < end:
            if await post(client, url, bodies[(k + len(run.recs)) % len(bodies)], now, end, run) == 503:
                await asyncio.sleep(REFUSED_PAUSE_S)

    await asyncio.gather(*(worker(k) for k in range(conc)))


MAX_CONNECTIONS = 4096


def session() -> aiohttp.ClientSession:
    """The load generator's HTTP client: at most MAX_CONNECTIONS open (far above what any peer holds in flight;
    an open loop past it queues in the client, which counts against latency from the scheduled send time, but
    the process stays under this machine's 20,000 open files: an uncapped 2x-capacity run at ~3,000 req/s
    through direct ingress ran out of them), 30 s per request. aiohttp costs ~0.1 ms CPU per request here,
    httpx ~0.9 ms (both measured against a trivial server): the generator shares the 2 cores with the system
    under test, so a lighter one frees CPU for every peer alike."""
    connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30))


async def bench(
    urls: dict[str, str], bodies: list[bytes], duration: float, model: str, tag: str, sat: int, rounds: int
) -> list[Run]:
    """Per peer: saturation (its C), open loop at 0.5/1/2 x its own C, then `rounds` x (every peer at one common
    rate, 0.5 x the smallest C) and further saturation rounds. Peers interleaved at every step."""
    async with session() as client:

        async def one(peer: str, mode: str, conc: int = 0, offered: float = 0.0) -> Run:
            await asyncio.sleep(1.0)  # let queues drain
            run, url = Run(model, tag, peer, mode, duration, offered), urls[peer]
            work = closed_loop(client, url, bodies, run, conc) if conc else open_loop(client, url, bodies, run)
            return await measured(run, work)

        for peer in PEERS:  # warm-up: connections, replica code paths
            await closed_loop(client, urls[peer], bodies, Run(model, tag, peer, "warm-up", 1.0), 16)
        runs = [await one(p, f"{SATURATION} 1", conc=sat) for p in PEERS]
        cap = {r.peer: r.ok_in_window / duration for r in runs}
        runs += [await one(p, f"{m:g}xC", offered=m * cap[p]) for m in (0.5, 1.0, 2.0) for p in OPEN]
        common = 0.5 * min(cap[p] for p in OPEN)
        runs += [await one(p, f"{COMMON} {k + 1}", offered=common) for k in range(rounds) for p in OPEN]
        runs += [await one(p, f"{SATURATION} {k + 1}", conc=sat) for k in range(1, rounds) for p in PEERS]
        async with client.get(urls["tf-batch"].removesuffix("/predict") + "/stats") as response:
            runs[0].stats = await response.json()
    return runs


def forward_cost_ms(model: torch.nn.Module, rows: np.ndarray, sizes: tuple[int, ...] = (1, 32)) -> dict[int, float]:
    """Median ms per `predict_proba` call on one thread (replicas run torch with OMP_NUM_THREADS=1)."""
    threads, out = torch.get_num_threads(), {}
    torch.set_num_threads(1)
    try:
        for n in sizes:
            x, times = rows[:n], []
            for _ in range(30):
                t0 = time.perf_counter()
                predict_proba(model, x)
                times.append(time.perf_counter() - t0)
            out[n] = float(np.median(times[5:])) * 1e3
    finally:
        torch.set_num_threads(threads)
    return out


def build_models(tmp: str, epochs: int, names: list[str], hidden: int, depth: int) -> tuple[list[Model], np.ndarray]:
    """Train the digits MLP in-process (no MLflow); build the wide MLP on the same scaler; store both."""
    ctx = StageContext(run_id="b", stage="s", node_id="n", device="cpu")
    table = preprocess.fn(ctx)
    x = _raw_test_rows(table)[0]
    store = ArtifactStore(StoreConfig.from_urls([f"{tmp}/store"]))
    models = []
    for name in names:
        if name == "digits":
            bundle = train.fn(ctx, table, epochs=epochs)
        else:
            torch.manual_seed(0)
            layers = [N_FEATURES, *[hidden] * depth, 10]
            bundle = _bundle(build_mlp(layers, standardize=True), table, layers)
        ref = store.put(bundle, run_id="bench", stage=f"train-{name}")
        source = ModelSource(digest=ref.digest, artifact=ref, store_config=store.config)
        net, _ = load_model(source)
        params = sum(p.numel() for p in net.parameters())
        models.append(Model(name, source, params, forward_cost_ms(net, x.astype(np.float32))))
    return models, x


def deploy(source: ModelSource, port: int, ongoing: int, queued: int, wait_s: float) -> None:
    store_cfg = source.store_config
    common: dict[str, Any] = {"port": port, "max_ongoing_requests": ongoing, "max_queued_requests": queued}
    on = ServeConfig(app_name="tf-batch", max_batch_size=32, batch_wait_timeout_s=wait_s, **common)
    Rollout(store_cfg, on).deploy(source)
    Rollout(store_cfg, ServeConfig(app_name="tf-nobatch", max_batch_size=1, **common)).deploy(source)
    Rollout(store_cfg, dataclasses.replace(on, app_name="tf-thread", separate_user_code_thread=True)).deploy(source)
    # bare gets the same limits and router backoff as tierflow's peers, but Serve's own user-code thread
    serve_default = dataclasses.replace(on, separate_user_code_thread=True)
    opts = {k: v for k, v in serve_default.deployment_options(replica_options(on)).items() if k in BARE_OPTIONS}
    serve.run(Bare.options(num_replicas=1, **opts).bind(source), name="bare", route_prefix="/bare")


def peer_url(peer: str, port: int) -> str:
    """Through Serve's proxy; with --direct-ingress, straight to the peer's one replica on its own port."""
    if not DIRECT:
        return f"http://127.0.0.1:{port}/{peer}/predict"
    [url] = direct_urls(peer)
    return f"{url}/predict"


def pooled_p50(runs: list[Run]) -> float:
    ok = [t for r in runs for t, s in r.recs if s == 200]
    return float(np.percentile(ok, 50)) * 1e3 if ok else float("nan")


def cpu_ms(runs: list[Run], roles: tuple[str, ...] = ROLES[:4]) -> float:
    """Mean CPU ms per answered request (% of a core / req/s * 10); default: all the benchmark's processes."""
    return float(np.mean([10 * sum(r.cpu[k] for k in roles) / max(r.ok_in_window / r.duration, 1e-9) for r in runs]))


def saturated(runs: list[Run], model: str, limits: str, peer: str) -> list[Run]:
    return [r for r in runs if (r.model, r.limits, r.peer) == (model, limits, peer) and r.mode.startswith(SATURATION)]


def batching_bound(runs: list[Run], limits: str) -> str:
    """The best batching could do here: `wide` at digits' per-request cost (there the model is ~free)."""
    http_ms = cpu_ms(saturated(runs, "digits", limits, "tf-batch"))
    off = saturated(runs, "wide", limits, "tf-nobatch")
    off_tput = float(np.mean([r.ok_in_window / r.duration for r in off]))
    cores = os.cpu_count() or 1
    best = cores * 1000 / http_ms
    return (
        f"- Bound on batching, `{limits}`: with the digits model (forward ~free) a request costs {http_ms:.1f} CPU ms "
        f"over the client, proxy, replica and Ray at saturation, so {cores} cores carry at most ~{best:,.0f} "
        f"req/s whatever the batching; `wide` without batching carries {off_tput:,.0f} req/s ({cpu_ms(off):.1f} CPU ms "
        f"per request, the replica's one-row forward passes in series), so on this machine batching on / off cannot "
        f"exceed ~{best / off_tput:.1f}x even if the forward pass cost nothing once batched."
    )


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def per_round(a: list[Run], b: list[Run]) -> str:
    """Throughput ratios of two peers' interleaved rounds."""
    return ", ".join(f"{x.ok_in_window / max(y.ok_in_window, 1):.2f}x" for x, y in zip(a, b, strict=True))


def summary(model: str, limits: str, runs: list[Run]) -> str:
    """The two targets from the rows of one model and limits setting."""
    sat = {p: [r for r in runs if r.peer == p and r.mode.startswith(SATURATION)] for p in PEERS}
    common = {p: [r for r in runs if r.peer == p and r.mode.startswith(COMMON)] for p in OPEN}
    half = {r.peer: r.lat(50) for r in runs if r.mode == "0.5xC"}  # each at 0.5x its own C
    cap = {p: rs[0].ok_in_window / rs[0].duration for p, rs in sat.items()}
    tput = {p: float(np.mean([r.ok_in_window / r.duration for r in rs])) for p, rs in sat.items()}
    on_off = per_round(sat["tf-batch"], sat["tf-nobatch"])

    cpu = ", ".join(f"{n} {cpu_ms(sat[p], ('replica',)):.1f} / {cpu_ms(sat[p]):.1f}" for p, n in SHORT.items())
    p50 = {p: pooled_p50(rs) for p, rs in common.items()}
    batch_x, p50_x = tput["tf-batch"] / tput["tf-nobatch"], p50["tf-batch"] / p50["bare"]
    stats = sat["tf-batch"][0].stats
    loop_x = tput["tf-batch"] / tput["tf-thread"]
    loop_rounds = per_round(sat["tf-batch"], sat["tf-thread"])
    lines = [
        f"- `{model}`, `{limits}`: C (req/s, `{SATURATION} 1`) = batching on {cap['tf-batch']:,.0f}, "
        f"off {cap['tf-nobatch']:,.0f}, bare {cap['bare']:,.0f}.",
        f"  - **Batching on / off at saturation: {batch_x:.2f}x** (mean of {len(sat['tf-batch'])} interleaved "
        f"rounds; per round {on_off}; target >= 3x: {verdict(batch_x >= 3)}). Saturation throughput vs bare: "
        f"on {tput['tf-batch'] / tput['bare']:.2f}x, off {tput['tf-nobatch'] / tput['bare']:.2f}x. CPU ms per "
        f"answered request at saturation, replica / all the benchmark's processes: {cpu}.",
        f"  - **tierflow (batching on) p50 / bare p50 at `{COMMON}` ({common['bare'][0].offered:,.0f} req/s, every "
        f"peer): {p50_x:.2f}x** ({p50['tf-batch']:.1f} vs {p50['bare']:.1f} ms, latencies pooled over "
        f"{len(common['bare'])} rounds; target <= 1.2x: {verdict(p50_x <= 1.2)}); batching off / bare "
        f"{p50['tf-nobatch'] / p50['bare']:.2f}x. For reference, at 0.5x each peer's own C (not the same rate): "
        f"on / bare {half['tf-batch'] / half['bare']:.2f}x, off / bare {half['tf-nobatch'] / half['bare']:.2f}x.",
        f"  - User code on the replica's main loop (ServeConfig default) / on Serve's separate user-code thread, "
        f"batching on, saturation throughput: {loop_x:.2f}x (per round {loop_rounds}).",
        f"  - Batching-on replica `/stats` after all runs (last <= 10,000 batches): mean batch "
        f"{stats['batch_size_mean']:.2f} rows, max {stats['batch_size_max']}.",
    ]
    return "\n".join(lines)


def report(runs: list[Run], head: list[str]) -> str:
    cpu = "CPU % client / proxy / replica / rest of Ray / outside"
    tail = f"send lag p99 ms | throughput (200/s) | p50 ms | p99 ms | 503 | 503 p99 ms | other errors | {cpu} |"
    lines = [*head, "", f"| model | limits | load | peer | offered req/s | {tail}"]
    lines += ["|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        offered = f"{r.offered:,.0f} | {np.percentile(r.lag_ms, 99):.1f}" if r.offered else "closed loop | -"
        lines.append(f"| {r.model} | {r.limits} | {r.mode} | {PEERS[r.peer]} | {offered} | {r.cells()}")
    lines.append("")
    for model, limits in dict.fromkeys((r.model, r.limits) for r in runs):
        lines.append(summary(model, limits, [r for r in runs if (r.model, r.limits) == (model, limits)]))
    for limits in dict.fromkeys(r.limits for r in runs):
        if {"digits", "wide"} <= {r.model for r in runs if r.limits == limits}:
            lines.append(batching_bound(runs, limits))
    return "\n".join(lines)


def main() -> None:
    dflt = ServeConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration-s", type=float, default=10.0, help="seconds per measured run (default 10)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 s per run, 3 training epochs")
    defaults = f"{dflt.max_ongoing_requests}/{dflt.queue_limit}"
    parser.add_argument("--limits", nargs="+", default=[defaults], help="ONGOING/QUEUED, one pass each")
    parser.add_argument("--models", nargs="+", choices=["digits", "wide"], default=["digits", "wide"])
    parser.add_argument("--hidden", type=int, default=4096, help="wide model: units per hidden layer (4096)")
    parser.add_argument("--depth", type=int, default=3, help="wide model: hidden layers (3)")
    parser.add_argument(
        "--batch-wait-s",
        type=float,
        default=dflt.batch_wait_timeout_s,
        help=f"batching on: batch_wait_timeout_s (default {dflt.batch_wait_timeout_s:g}, the ServeConfig default)",
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="interleaved rounds of the saturation and common-rate runs (default 2)"
    )
    parser.add_argument(
        "--direct-ingress",
        action="store_true",
        help="start Serve with RAY_SERVE_ENABLE_DIRECT_INGRESS=1 and send every peer's requests to its replica's own "
        "port, past the proxy (written to its own section)",
    )
    parser.add_argument("--write", action="store_true", help=f"update the section in {'BENCHMARKS.md'}")
    args = parser.parse_args()
    duration = 2.0 if args.quick else args.duration_s
    command = shlex.join(["cd", "/work/main"]) + " && " + shlex.join([".venv/bin/python", *sys.argv])
    load_before, runs = Path("/proc/loadavg").read_text().split()[:3], []
    ray.init("local", num_cpus=2, include_dashboard=False)
    try:
        with tempfile.TemporaryDirectory(prefix="tierflow-bench-") as tmp:
            models, x = build_models(tmp, 3 if args.quick else 10, args.models, args.hidden, args.depth)
            bodies = [json.dumps({"instances": [r.round(4).tolist()]}).encode() for r in x]
            with socket.create_server(("127.0.0.1", 0)) as sock:  # a free loopback port for Serve
                port = sock.getsockname()[1]
            for model in models:
                for limits in args.limits:
                    ongoing, queued = (int(v) for v in limits.split("/"))
                    deploy(model.source, port, ongoing, queued, args.batch_wait_s)
                    urls = {p: peer_url(p, port) for p in PEERS}
                    runs += asyncio.run(bench(urls, bodies, duration, model.name, limits, ongoing, args.rounds))
                    for app in PEERS:
                        serve.delete(app)
    finally:
        serve.shutdown()
        ray.shutdown()
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    head = [
        f"## Serving under load{', direct ingress' if DIRECT else ''}: tierflow Serve app (batching on / off) vs "
        "bare Ray Serve, 1 replica",
        "",
        f"- Date: {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"- Machine: {machine()}; load average (1/5/15 min) {' '.join(load_before)} before, "
        f"{' '.join(load_after)} after",
        f"- Python {platform.python_version()}, Ray {ray.__version__}, torch {torch.__version__}, FastAPI "
        f"{fastapi.__version__}, pydantic {pydantic.__version__}, aiohttp {aiohttp.__version__}; local Ray started "
        "in-process with `num_cpus=2`; `RAY_SERVE_LOG_TO_STDERR=0` (Serve access logs go to files only)"
        + (INGRESS_NOTE if DIRECT else ""),
        f"- Command: `{command}`",
        "- Models (every peer serves the same weights; forward pass = median `predict_proba` time on one thread, "
        "as replicas run torch, measured in the driver before the runs):",
        *(f"  - {m.describe()}" for m in models),
        f"- Each peer: 1 replica, `num_cpus={dflt.num_cpus}`; limits = `max_ongoing_requests/max_queued_requests`, "
        f"the same for all peers ({defaults} = ServeConfig defaults), as is the router's backoff on a full replica "
        f"(`request_router_config` {dflt.router_initial_backoff_s * 1e3:g} ms doubling to "
        f"{dflt.router_max_backoff_s * 1e3:g} ms, ServeConfig's; Serve's own is 25 ms to 0.5 s). Batching on: "
        "`max_batch_size=32, "
        f"batch_wait_timeout_s={args.batch_wait_s:g}`; off: `max_batch_size=1`. Bare: plain `@serve.deployment`, "
        "`await request.json()`, `predict_proba` inline, JSON out; no validation, no batching. tierflow's replicas run "
        "their code on the replica's main event loop (`separate_user_code_thread=False`, the ServeConfig default); "
        "bare runs Serve's default, a separate user-code thread.",
        f"- Method. `{SATURATION} k` = closed loop at concurrency = `max_ongoing_requests` (as many requests "
        "in flight as the replica accepts), run for each peer; round 1 gives that peer's own capacity C. Open loop "
        "(fixed interval, latency from the scheduled send time, so generator lag counts against it) at 0.5/1/2 x "
        f"each peer's own C. `{COMMON}` = every peer at one common open-loop rate, half the smallest C: the p50 "
        "target compares tierflow and bare at the same offered load, which both carry at <= 50% of their own "
        "capacity. (0.5 x one peer's C can overload another: with batching, tierflow's C on the wide model is "
        "well above bare's, and 0.5 x it drove bare into its queue limit, so that ratio compared a queue with an "
        "idle server.) The batching target compares both tierflow peers' saturation throughput, same concurrency, "
        f"mean over {args.rounds} interleaved rounds (round 2+ after the open-loop runs, to expose drift). "
        "That target is meaningful for `wide` only: digits' forward pass (~0.03 ms) is ~1% of a request's CPU cost, "
        "so batching has almost nothing to save there; its ratio is printed for completeness. "
        f"One digits row (64 floats) per POST, {duration:g} s per run, 1 s pause between runs, peers interleaved at "
        f"each step; a closed-loop worker refused with a 503 waits {REFUSED_PAUSE_S * 1e3:g} ms before its next "
        "request (Serve counts a request until its response stream ends, a moment after the client has the answer, "
        "so a loop as wide as `max_ongoing_requests` is refused now and then). The load generator (one asyncio "
        f"loop, one aiohttp session of at most {MAX_CONNECTIONS} connections, in the driver process) **shares the "
        "2 cores** with the Serve proxy and replicas; it used httpx before, which costs ~0.9 ms CPU per request here "
        "against ~0.1 ms for aiohttp. CPU % = % of one core (200 = the whole machine) per process "
        "group during the run; `outside` = machine busy time not in this benchmark's processes.",
    ]
    body = report(runs, head)
    publish(SECTION, body, args.write)


if __name__ == "__main__":
    main()
