"""Deployment-wide request metrics, read back from Ray's Prometheus endpoints.

Serve's proxies (and, with direct ingress, the ingress replicas: the two record disjoint series) count
and time every HTTP request, and tierflow's replicas histogram their batch sizes. Ray's metrics agent
on each node serves all of it as Prometheus text at `http://<node>:<MetricsExportPort>/metrics`, the
address a Prometheus server scrapes. `tierflow serve status` reads the same text, so it can summarise
a whole deployment (every replica and proxy, not just the replica that answered `/stats`) without a
Prometheus server, and record that summary in MLflow.

Values are cumulative since each process started, keyed by application name (so they span the
versions an app has served), and lag by Ray's report interval (`RAY_metrics_report_interval_ms`,
10 s by default).
"""

from __future__ import annotations

import math
import urllib.request
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from actors.placement import NodeInfo

REQUESTS = "ray_serve_num_http_requests_total"
LATENCY = "ray_serve_http_request_latency_ms"
BATCH = "ray_tierflow_batch_size"
# generators (serving.generate_app): per-request user-experience histograms and the tokens streamed
TTFT, TBT, E2E, FLUIDITY = "ray_tierflow_ttft_s", "ray_tierflow_tbt_s", "ray_tierflow_e2e_s", "ray_tierflow_fluidity"
TOKENS = "ray_tierflow_generated_tokens_total"
# exact sums as counters: Ray 2.60 exports a histogram's _sum rebuilt from bucket midpoints, not the true sum
DEADLINES, MISSED = "ray_tierflow_deadlines_total", "ray_tierflow_missed_deadlines_total"
STREAM_SECONDS = "ray_tierflow_stream_seconds_total"


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse(text: str) -> list[Sample]:
    """Samples of a Prometheus text exposition (prometheus_client's parser; Ray already depends on it)."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    return [
        Sample(s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def endpoints(nodes: Iterable[NodeInfo]) -> list[str]:
    """The metrics URL of every node that exports metrics."""
    urls = []
    for node in nodes:
        if node.metrics_port and node.address:
            host = f"[{node.address}]" if ":" in node.address else node.address
            urls.append(f"http://{host}:{node.metrics_port}/metrics")
    return urls


def _read(url: str, timeout_s: float) -> list[Sample] | str:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310  # Ray's own node addresses
            return parse(resp.read().decode())
    except (OSError, ValueError) as exc:
        return f"{url}: {exc}"


def scrape(urls: Iterable[str], timeout_s: float = 5.0) -> tuple[list[Sample], list[str]]:
    """Every sample the endpoints serve, and one message per endpoint that could not be read.

    Endpoints are read concurrently, so an unreachable node costs one timeout, not one per node."""
    urls = list(urls)
    samples: list[Sample] = []
    errors: list[str] = []
    if not urls:
        return samples, errors
    with ThreadPoolExecutor(min(16, len(urls))) as pool:
        for got in pool.map(lambda u: _read(u, timeout_s), urls):
            if isinstance(got, str):
                errors.append(got)
            else:
                samples += got
    return samples, errors


def histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    """The q-quantile of a cumulative histogram {upper bound: count}, interpolated as Prometheus does.

    Within the bucket that holds the quantile the values are taken as spread evenly; a quantile that
    falls in the +Inf bucket is reported as the highest finite bound. NaN when the histogram is empty.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q!r} must be in [0, 1]")
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return math.nan
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank:
            if math.isinf(upper):
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower  # unreachable for a well-formed histogram (the last bucket holds everything)


def _merged_buckets(samples: Iterable[Sample], name: str) -> dict[float, float]:
    """One cumulative histogram from the series of several processes (summed per bound)."""
    merged: dict[float, float] = defaultdict(float)
    for s in samples:
        if s.name == f"{name}_bucket":
            merged[float(s.labels["le"])] += s.value
    return dict(merged)


def summarize(samples: Iterable[Sample], app: str) -> dict[str, Any]:
    """Request counts by status class, latency of answered predictions and batch sizes of application `app`."""
    mine = [s for s in samples if s.labels.get("application") == app]
    by_status: dict[str, float] = defaultdict(float)
    for s in mine:
        if s.name == REQUESTS:
            by_status[s.labels.get("status_code", "")] += s.value
    answered = [s for s in mine if s.labels.get("method") == "POST" and s.labels.get("status_code", "").startswith("2")]
    latency = _merged_buckets(answered, LATENCY)
    batches = _merged_buckets(mine, BATCH)
    batch_rows = sum(s.value for s in mine if s.name == f"{BATCH}_sum")
    batch_calls = sum(s.value for s in mine if s.name == f"{BATCH}_count")
    summary: dict[str, Any] = {
        "requests": sum(by_status.values()),
        "requests_2xx": sum(v for k, v in by_status.items() if k.startswith("2")),
        "requests_4xx": sum(v for k, v in by_status.items() if k.startswith("4")),
        "requests_5xx": sum(v for k, v in by_status.items() if k.startswith("5")),
        "requests_503": by_status.get("503", 0.0),
        "model_calls": batch_calls,
        "batch_size_mean": batch_rows / batch_calls if batch_calls else math.nan,
        "batch_size_p99": histogram_quantile(0.99, batches),
    }
    for q in (50, 95, 99):
        summary[f"latency_ms_p{q}"] = histogram_quantile(q / 100, latency)
    if any(s.name == f"{TTFT}_count" for s in mine):
        summary |= generation_summary(mine)
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in summary.items()}  # JSON has no NaN


def generation_summary(samples: list[Sample]) -> dict[str, float]:
    """TTFT and TBT percentiles (interpolated in the histograms' buckets), the pooled fluidity, the share of
    streams that met every deadline and tokens per second of streaming, over every replica of one app."""

    def total(name: str) -> float:
        return sum(s.value for s in samples if s.name == name)

    out: dict[str, float] = {}
    for name, key in ((TTFT, "ttft_s"), (TBT, "tbt_s"), (E2E, "e2e_s")):
        buckets = _merged_buckets(samples, name)
        out[f"{key}_p50"] = histogram_quantile(0.5, buckets)
        out[f"{key}_p99"] = histogram_quantile(0.99, buckets)
    streams = total(f"{FLUIDITY}_count")
    below_one = max((v for le, v in _merged_buckets(samples, FLUIDITY).items() if le < 1.0), default=0.0)
    deadlines, stream_s, tokens = total(DEADLINES), total(STREAM_SECONDS), total(TOKENS)
    out["streams"] = streams
    # Etalon's service-level figure: deadlines missed over deadlines owed, pooled over every stream
    out["fluidity_pooled"] = 1.0 - total(MISSED) / deadlines if deadlines else math.nan
    out["fluid_share"] = 1.0 - below_one / streams if streams else math.nan  # streams that missed nothing
    out["generated_tokens"] = tokens
    out["tokens_per_s_per_stream"] = tokens / stream_s if stream_s else math.nan
    return out


GENERATION_KEYS = ("ttft_s_p50", "ttft_s_p99", "tbt_s_p50", "tbt_s_p99", "fluidity_pooled", "fluid_share")


def generation_status(replica: dict[str, Any], deployment: dict[str, Any]) -> dict[str, Any]:
    """The generation figures `tierflow serve status` shows: the whole app's (every replica, from Ray's
    Prometheus export) when it has seen a stream, else the answering replica's `/stats`; {} for other apps."""
    if deployment.get("streams"):
        picked = {k: deployment.get(k) for k in GENERATION_KEYS}
        return {**picked, "tokens_per_s": deployment.get("tokens_per_s_per_stream"), "source": "prometheus"}
    if "engine" in replica:
        picked = {k: replica.get(k) for k in GENERATION_KEYS}
        return {**picked, "tokens_per_s": replica.get("tokens_per_s_p50"), "source": "replica /stats"}
    return {}


def deployment_metrics(app: str, nodes: Iterable[NodeInfo]) -> dict[str, Any]:
    """`summarize` over every node's endpoint; `errors` lists endpoints that could not be read."""
    urls = endpoints(nodes)
    samples, errors = scrape(urls)
    if not urls or len(errors) == len(urls):
        return {"error": "no Ray metrics endpoint could be read: " + ("; ".join(errors) or "no node exports metrics")}
    return {**summarize(samples, app), "endpoints": len(urls), "errors": errors}
