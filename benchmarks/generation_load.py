"""Streamed generation under open-loop load: continuous vs request-level vs no batching, side by side.

Per model, three apps serve the same weights on one Serve instance, one replica each, differing only in
`generation_batching`. Models: the built-in textgen architecture (`workflows.builtin.textgen.ByteGRU`) at
the size the textgen workflow trains, with random weights; and the same size with every step padded to
`--paced-ms` (tests/fixtures/paced_generators.py), the regime of a large model on an accelerator, whose
step costs about the same for 1 or 16 sequences. For each prompt/output mix and request rate, Poisson
arrivals (seeded) stream `/generate` over SSE to each app in turn; the client times every chunk it
receives and scores each request with `serving.ux_metrics` (TTFT, time between tokens, Etalon's fluidity
index, goodput) against one deadline schedule.
"""

from __future__ import annotations

import os

os.environ["RAY_AUTH_MODE"] = "token"  # before Ray is imported (tierflow's clusters run token auth)
os.environ["RAY_SERVE_LOG_TO_STDERR"] = "0"  # access logs to files only

import argparse
import asyncio
import datetime as dt
import inspect
import itertools
import json
import platform
import shlex
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import ray
import torch
from benchlib import machine, publish
from ray import serve

from serving.config import ModelSource, ServeConfig
from serving.generate_app import bind
from serving.generation import generator_model
from serving.placement import replica_options
from serving.rollout import wait_running
from serving.ux_metrics import Deadlines, RequestMetrics, RequestTimeline, aggregate
from storage import ArtifactStore, StoreConfig
from tests.fixtures.paced_generators import PacedGRU
from workflows.builtin.textgen import ByteGRU
from workflows.builtin.textgen import train as textgen_train

MODES = ("continuous", "request", "none")
# the size the built-in textgen workflow trains by default (its train stage's defaults)
_TRAIN = inspect.signature(textgen_train.fn).parameters
SIZE = {"embed": _TRAIN["embed"].default, "hidden": _TRAIN["hidden"].default}
# (name, prompt bytes range, output tokens range): chat-like turns, and longer answers to longer prompts
MIXES = {"short": ((16, 64), (24, 48)), "long": ((200, 400), (96, 160))}
FLUID = 0.99  # the fluidity a rate must keep to count as sustained
WORDS = ("the of and to in is that for it as with was on be by this are from or have an which one had not").split()  # noqa: SIM905


@dataclass
class Cell:
    model: str
    mix: str
    mode: str
    rate: float
    duration_s: float
    results: list[RequestMetrics] = field(default_factory=list)
    failed: int = 0
    elapsed_s: float = 0.0

    def figures(self) -> dict[str, float | int | None]:
        return aggregate(self.results, self.duration_s)  # goodput per second of arrivals


def model_bundle(paced_s: float, seed: int = 0) -> object:
    """Random weights of the textgen GRU's size (decoding costs the same as trained ones), its steps padded to
    `paced_s` when > 0. Two bias tweaks keep the streams comparable: EOS is never chosen (every stream runs to
    its max_tokens) and non-ASCII bytes are rare (one character per token, so one SSE event per token)."""
    torch.manual_seed(seed)
    if paced_s > 0:
        builder, args = PacedGRU, {**SIZE, "step_s": paced_s}
    else:
        builder, args = ByteGRU, dict(SIZE)
    model = builder(**args)
    with torch.no_grad():
        model.head.bias[128:] -= 12.0
        model.head.bias[256] = -30.0  # EOS
    return generator_model(model, builder=builder, args=args, max_context=1024, example_prompt="The ")


def deploy(sources: dict[str, ModelSource], port: int, max_batch: int, deadlines: Deadlines) -> dict[str, str]:
    """One app per (model, mode), started together; {model/mode: its /generate URL}."""
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    urls = {}
    for (key, source), mode in itertools.product(sources.items(), MODES):
        config = ServeConfig(
            app_name=f"{key}-{mode}",
            port=port,
            num_cpus=0.25,
            max_batch_size=max_batch,
            max_ongoing_requests=256,  # requests wait in the engine's queue, where the batching mode decides
            generation_batching=mode,
            target_ttft_s=deadlines.ttft_s,
            target_tbt_s=deadlines.tbt_s,
        )
        app = bind(source, config, replica_options(config))
        serve.run_many(
            [serve.RunTarget(app, name=config.app_name, route_prefix=config.route_prefix)],
            wait_for_applications_running=False,
        )
        urls[f"{key}/{mode}"] = f"{config.url}/generate"
    for url in urls.values():
        wait_running(url.split("/")[-2])
    return urls


def workload(mix: str, rate: float, duration_s: float, seed: int) -> list[tuple[float, dict]]:
    """(send offset in seconds, request body): Poisson arrivals, lengths uniform in the mix's ranges."""
    rng = np.random.default_rng(seed)
    (p_lo, p_hi), (o_lo, o_hi) = MIXES[mix]
    out, t = [], rng.exponential(1 / rate)
    while t < duration_s:
        words = " ".join(rng.choice(WORDS, size=200))
        prompt = words[: int(rng.integers(p_lo, p_hi + 1))]
        body = {"prompt": prompt, "max_tokens": int(rng.integers(o_lo, o_hi + 1)), "stream": True}
        out.append((t, body))
        t += rng.exponential(1 / rate)
    return out


async def one(
    client: aiohttp.ClientSession, url: str, body: dict, sent: float, cell: Cell, deadlines: Deadlines
) -> None:
    timeline = RequestTimeline(arrival_s=sent)
    try:
        async with client.post(url, json=body) as resp:
            if resp.status != 200:
                cell.failed += 1
                return
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    event = json.loads(line[6:])
                    if event.get("text"):
                        timeline.token(time.perf_counter())
                    if "error" in event:
                        cell.failed += 1
                        return
    except (aiohttp.ClientError, TimeoutError):
        cell.failed += 1
        return
    timeline.end_s = time.perf_counter()
    cell.results.append(timeline.summary(deadlines))


async def run_cell(
    client: aiohttp.ClientSession, url: str, cell: Cell, deadlines: Deadlines, seed: int, cap_s: float
) -> Cell:
    """Open loop: each request is sent at its scheduled time whatever the server is doing (latency counts
    from then); requests still streaming `cap_s` after the last arrival are abandoned and count as failed."""
    plan = workload(cell.mix, cell.rate, cell.duration_s, seed)
    t0 = time.perf_counter() + 0.05
    tasks = []
    for offset, body in plan:
        if (delay := t0 + offset - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(client, url, body, t0 + offset, cell, deadlines)))
    _done, pending = await asyncio.wait(tasks, timeout=max(0.0, t0 + cell.duration_s + cap_s - time.perf_counter()))
    for task in pending:
        task.cancel()  # the client goes away: the replica drops those sequences at its next step
    cell.failed += len(pending)
    await asyncio.gather(*pending, return_exceptions=True)
    cell.elapsed_s = time.perf_counter() - t0
    f = cell.figures()
    print(
        f"{cell.model:6} {cell.mix:5} {cell.mode:10} {cell.rate:5.1f}/s n={len(plan):3} ok={len(cell.results):3} "
        f"ttft p50 {f['ttft_s_p50']} p99 {f['ttft_s_p99']} tbt p99 {f['tbt_s_p99']} fluidity {f['fluidity_mean']} "
        f"goodput {f.get('goodput_rps')}",
        file=sys.stderr,
    )
    return cell


async def bench(
    urls: dict[str, str],
    plan: dict[tuple[str, str], list[float]],
    duration_s: float,
    deadlines: Deadlines,
    cap_s: float,
) -> list[Cell]:
    """Per (model, mix) and rate, the three modes one after the other on the same arrivals."""
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024), timeout=timeout) as client:
        for url in urls.values():  # warm-up: connections, replica code paths
            await run_cell(client, url, Cell("-", "short", "warm-up", 2.0, 1.0), deadlines, 0, 10.0)
        cells = []
        for (model, mix), rates in plan.items():
            for k, rate in enumerate(rates):
                for mode in MODES:
                    await asyncio.sleep(0.5)
                    cell = Cell(model, mix, mode, rate, duration_s)
                    url = urls[f"{model}/{mode}"]
                    cells.append(await run_cell(client, url, cell, deadlines, 1000 * k + 7, cap_s))
    return cells


def fmt(value: float | int | None, scale: float = 1.0, digits: int = 0) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def report(cells: list[Cell], head: list[str]) -> str:
    rows = [
        "| model | mix | rate (req/s) | batching | done / failed | TTFT p50 / p99 (ms) | TBT p50 / p99 (ms) | "
        "fluidity | fluid share | goodput (req/s) | tokens/s |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        f = c.figures()
        tokens_s = f["tokens"] / c.elapsed_s if c.elapsed_s else 0.0
        rows.append(
            f"| {c.model} | {c.mix} | {c.rate:g} | {c.mode} | {len(c.results)} / {c.failed} | "
            f"{fmt(f['ttft_s_p50'], 1e3)} / {fmt(f['ttft_s_p99'], 1e3)} | {fmt(f['tbt_s_p50'], 1e3, 1)} / "
            f"{fmt(f['tbt_s_p99'], 1e3, 1)} | {fmt(f['fluidity_mean'], 1, 3)} | {fmt(f['fluid_share'], 1, 2)} | "
            f"{fmt(f.get('goodput_rps'), 1, 2)} | {tokens_s:.0f} |"
        )
    summary = [
        "",
        f"Sustained = the largest offered rate whose requests all completed with mean fluidity >= {FLUID}; goodput "
        "there is the comparison at equal fluidity.",
        "",
        "| model | mix | batching | sustained rate (req/s) | goodput there (req/s) | fluidity there |",
        "|---|---|---|---:|---:|---:|",
    ]
    best: dict[tuple[str, str, str], Cell | None] = {}
    groups = list(dict.fromkeys((c.model, c.mix) for c in cells))
    for model, mix in groups:
        for mode in MODES:
            ok = [c for c in cells if (c.model, c.mix, c.mode) == (model, mix, mode) and sustained(c)]
            best[model, mix, mode] = top = max(ok, key=lambda c: c.rate, default=None)
            f = top.figures() if top else {}
            summary.append(
                f"| {model} | {mix} | {mode} | {fmt(top.rate if top else None, 1, 1)} | "
                f"{fmt(f.get('goodput_rps'), 1, 2)} | {fmt(f.get('fluidity_mean'), 1, 3)} |"
            )
    verdicts = []
    for model, mix in groups:
        cont, req = best[model, mix, "continuous"], best[model, mix, "request"]
        top_rate = max(c.rate for c in cells if (c.model, c.mix) == (model, mix))
        if cont and req:
            g_c, g_r = cont.figures()["goodput_rps"], req.figures()["goodput_rps"]
            note = " (continuous held the highest rate tried: its limit is higher)" if cont.rate == top_rate else ""
            verdicts.append(
                f"- {model}, {mix}: continuous {g_c:.2f} req/s vs request-level {g_r:.2f} req/s "
                f"({g_c / g_r:.2f}x){note}"
            )
        else:
            held = {m: best[model, mix, m] is not None for m in ("continuous", "request")}
            verdicts.append(f"- {model}, {mix}: sustained any rate tried at fluidity >= {FLUID}: {held}")
    return "\n".join([*head, "", *rows, *summary, "", f"Goodput at equal fluidity (>= {FLUID}):", *verdicts])


def sustained(c: Cell) -> bool:
    f = c.figures()
    return c.failed == 0 and f["fluidity_mean"] is not None and f["fluidity_mean"] >= FLUID


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration-s", type=float, default=5.0, help="seconds of arrivals per cell (default 5)")
    parser.add_argument("--gru-short-rates", type=float, nargs="+", default=[32, 64, 96])
    parser.add_argument("--gru-long-rates", type=float, nargs="+", default=[16, 32, 48])
    parser.add_argument("--paced-ms", type=float, default=15.0, help="the paced model's step, ms (15)")
    parser.add_argument("--paced-short-rates", type=float, nargs="+", default=[4, 8, 16, 24])
    parser.add_argument("--max-batch", type=int, default=16, help="max_batch_size of the batching modes (16)")
    parser.add_argument("--ttft-s", type=float, default=1.0, help="target time to first token (1.0 s)")
    parser.add_argument("--tbt-s", type=float, default=0.05, help="target time between tokens (0.05 s = 20 chars/s)")
    parser.add_argument("--cap-s", type=float, default=8.0, help="abandon requests this long after the last arrival")
    parser.add_argument("--write", action="store_true", help="update the section in BENCHMARKS.md")
    args = parser.parse_args()
    deadlines = Deadlines(args.ttft_s, args.tbt_s)
    plan = {
        ("gru", "short"): args.gru_short_rates,
        ("gru", "long"): args.gru_long_rates,
        ("paced", "short"): args.paced_short_rates,
    }
    env = [f"PYTHONPATH={os.environ['PYTHONPATH']}"] if os.environ.get("PYTHONPATH") else []
    command = shlex.join(["cd", os.getcwd()]) + " && " + shlex.join([*env, sys.executable, *sys.argv])
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    started = time.perf_counter()
    ray.init("local", num_cpus=2, include_dashboard=False)
    try:
        with tempfile.TemporaryDirectory(prefix="tierflow-genbench-") as tmp:
            store = ArtifactStore(StoreConfig.from_urls([str(Path(tmp) / "store")]))
            sources = {}
            for key, paced_s in (("gru", 0.0), ("paced", args.paced_ms / 1e3)):
                ref = store.put(model_bundle(paced_s), run_id="bench", stage=key)
                sources[key] = ModelSource(digest=ref.digest, artifact=ref, store_config=store.config, task="generator")
            with socket.create_server(("127.0.0.1", 0)) as sock:
                port = sock.getsockname()[1]
            urls = deploy(sources, port, args.max_batch, deadlines)
            cells = asyncio.run(bench(urls, plan, args.duration_s, deadlines, args.cap_s))
    finally:
        serve.shutdown()
        ray.shutdown()
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    head = [
        "## Streamed generation under load: continuous vs request-level vs no batching (1 replica each)",
        "",
        f"- Date: {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; whole run {time.perf_counter() - started:.0f} s",
        f"- Machine: {machine()}; load average (1/5/15 min) {' '.join(load_before)} before, {' '.join(load_after)} "
        "after (the machine is shared: other work runs alongside)",
        f"- Python {platform.python_version()}, Ray {ray.__version__}, torch {torch.__version__}, aiohttp "
        f"{aiohttp.__version__}; local Ray started in-process with `num_cpus=2`",
        f"- Command: `{command}`",
        f"- Models: `gru` = the built-in textgen architecture at its default size (`ByteGRU`, {SIZE['embed']}-d "
        f"embedding, 1 GRU layer of {SIZE['hidden']}, byte vocabulary of 257) with **random weights** "
        "(decoding costs what a trained one does; the trained one needs "
        f"the textgen workflow's minute of training); `paced` = the same size, every step padded to "
        f"{args.paced_ms:g} ms (`tests/fixtures/paced_generators.py`), like a large model on an accelerator whose "
        "step costs about the same for 1 or 16 sequences. Both: EOS masked so every stream runs to its "
        "`max_tokens`, non-ASCII bytes made rare so each token is one character and one SSE event; greedy.",
        f"- Apps: `serving.generate_app`, one replica per model and mode (`num_cpus=0.25`), `max_batch_size="
        f"{args.max_batch}` (continuous, request), `max_ongoing_requests=256`; a model's three apps differ only in "
        "`generation_batching`; only one app has load at a time.",
        f"- Load: open loop, Poisson arrivals (seeded; the same arrivals and lengths for the three modes at a given "
        f"rate), {args.duration_s:g} s of arrivals per cell, modes interleaved at every rate. Mixes: "
        + "; ".join(f"`{k}` prompt {p[0]}-{p[1]} bytes, output {o[0]}-{o[1]} tokens" for k, (p, o) in MIXES.items())
        + f". Requests still streaming {args.cap_s:g} s after the last arrival are abandoned (counted failed).",
        f"- Metrics, measured by the client from each SSE event's arrival (`serving.ux_metrics`): deadlines target "
        f"TTFT {deadlines.ttft_s:g} s and TBT {deadlines.tbt_s * 1e3:g} ms (20 characters/s, reading pace); fluidity "
        "= Etalon's fluidity index (Agrawal et al. 2024, arXiv 2407.07000), mean over requests; fluid share = "
        "requests that missed no deadline; goodput = those per second of arrivals (so at most the offered rate); "
        "TBT percentiles pooled over every gap; tokens/s over the cell's whole time (arrivals and drain). The client "
        "shares the 2 cores with Serve.",
    ]
    publish("generation_load", report(cells, head), args.write)


if __name__ == "__main__":
    main()
