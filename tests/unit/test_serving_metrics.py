"""Summaries of Ray's Prometheus text: parsing, merging processes, quantiles. No Ray needed."""

import math

import pytest

from actors.placement import NodeInfo
from serving.metrics import deployment_metrics, endpoints, histogram_quantile, parse, summarize
from tests.conftest import free_port

# As Ray 2.60's metrics agent writes it (labels shortened): two proxies' series for app "digits", one
# series of another app that must not count, and one replica's batch-size histogram.
TEXT = """\
# HELP ray_serve_num_http_requests_total The number of HTTP requests processed.
# TYPE ray_serve_num_http_requests_total counter
ray_serve_num_http_requests_total{application="digits",method="POST",route="/digits",status_code="200"} 90.0
ray_serve_num_http_requests_total{application="digits",method="POST",route="/digits",status_code="422"} 6.0
ray_serve_num_http_requests_total{application="digits",method="POST",route="/digits",status_code="503"} 4.0
ray_serve_num_http_requests_total{application="other",method="POST",route="/other",status_code="200"} 1000.0
# HELP ray_serve_http_request_latency_ms The end-to-end latency of HTTP requests.
# TYPE ray_serve_http_request_latency_ms histogram
ray_serve_http_request_latency_ms_bucket{W="a",application="digits",method="POST",status_code="200",le="1.0"} 0.0
ray_serve_http_request_latency_ms_bucket{W="a",application="digits",method="POST",status_code="200",le="10.0"} 40.0
ray_serve_http_request_latency_ms_bucket{W="a",application="digits",method="POST",status_code="200",le="100.0"} 50.0
ray_serve_http_request_latency_ms_bucket{W="a",application="digits",method="POST",status_code="200",le="+Inf"} 50.0
ray_serve_http_request_latency_ms_count{W="a",application="digits",method="POST",status_code="200"} 50.0
ray_serve_http_request_latency_ms_sum{W="a",application="digits",method="POST",status_code="200"} 400.0
ray_serve_http_request_latency_ms_bucket{W="b",application="digits",method="POST",status_code="200",le="1.0"} 0.0
ray_serve_http_request_latency_ms_bucket{W="b",application="digits",method="POST",status_code="200",le="10.0"} 0.0
ray_serve_http_request_latency_ms_bucket{W="b",application="digits",method="POST",status_code="200",le="100.0"} 40.0
ray_serve_http_request_latency_ms_bucket{W="b",application="digits",method="POST",status_code="200",le="+Inf"} 40.0
ray_serve_http_request_latency_ms_count{W="b",application="digits",method="POST",status_code="200"} 40.0
ray_serve_http_request_latency_ms_sum{W="b",application="digits",method="POST",status_code="200"} 2000.0
ray_serve_http_request_latency_ms_bucket{W="a",application="digits",method="POST",status_code="503",le="1.0"} 4.0
ray_serve_http_request_latency_ms_bucket{W="a",application="digits",method="POST",status_code="503",le="+Inf"} 4.0
# HELP ray_tierflow_batch_size rows per model call
# TYPE ray_tierflow_batch_size histogram
ray_tierflow_batch_size_bucket{application="digits",deployment="ModelServer",le="1.0"} 30.0
ray_tierflow_batch_size_bucket{application="digits",deployment="ModelServer",le="2.0"} 30.0
ray_tierflow_batch_size_bucket{application="digits",deployment="ModelServer",le="4.0"} 40.0
ray_tierflow_batch_size_bucket{application="digits",deployment="ModelServer",le="+Inf"} 40.0
ray_tierflow_batch_size_count{application="digits",deployment="ModelServer"} 40.0
ray_tierflow_batch_size_sum{application="digits",deployment="ModelServer"} 70.0
"""


def test_summarises_one_app_over_every_process():
    s = summarize(parse(TEXT), "digits")
    assert (s["requests"], s["requests_2xx"], s["requests_4xx"], s["requests_5xx"], s["requests_503"]) == (
        100,
        90,
        6,
        4,
        4,
    )
    # answered POSTs only (the refusals' fast 503s are not latency of predictions): 90 requests merged from two
    # proxies, 40 at <= 10 ms and 50 in (10, 100]; the median is the 45th, 5/50 of the way into the second bucket
    assert s["latency_ms_p50"] == pytest.approx(10 + 90 * 5 / 50)
    assert s["latency_ms_p99"] == pytest.approx(10 + 90 * (89.1 - 40) / 50)
    assert (s["model_calls"], s["batch_size_mean"]) == (40, 70 / 40)
    assert s["batch_size_p99"] == pytest.approx(2 + 2 * (39.6 - 30) / 10)


def test_an_app_without_traffic_has_counts_of_zero_and_no_quantiles():
    s = summarize(parse(TEXT), "absent")
    assert s["requests"] == 0 and s["model_calls"] == 0
    assert s["latency_ms_p50"] is None and s["batch_size_mean"] is None  # JSON-safe, not NaN


def test_histogram_quantile_matches_prometheus_rules():
    assert histogram_quantile(0.5, {1.0: 0, 2.0: 10, math.inf: 10}) == pytest.approx(1.5)
    assert histogram_quantile(0.99, {1.0: 5, math.inf: 10}) == 1.0  # in the +Inf bucket: the highest finite bound
    assert histogram_quantile(0.0, {1.0: 0, 2.0: 10, math.inf: 10}) == 1.0
    assert math.isnan(histogram_quantile(0.5, {}))
    with pytest.raises(ValueError, match="must be in"):
        histogram_quantile(1.5, {1.0: 1})


def test_endpoints_and_unreadable_ones():
    nodes = [
        NodeInfo("a", {}, "10.0.0.5", metrics_port=8080),
        NodeInfo("b", {}, "::1", metrics_port=9),
        NodeInfo("c", {}),
    ]
    assert endpoints(nodes) == ["http://10.0.0.5:8080/metrics", "http://[::1]:9/metrics"]
    closed = free_port()  # nothing listens there: refused at once
    out = deployment_metrics("digits", [NodeInfo("x", {}, "127.0.0.1", metrics_port=closed)])
    assert out["error"].startswith("no Ray metrics endpoint could be read") and str(closed) in out["error"]
    assert "no node exports metrics" in deployment_metrics("digits", [NodeInfo("c", {})])["error"]


# One generator replica's user-experience histograms (serving.generate_app), as Ray exports them.
GEN_TEXT = """\
# TYPE ray_tierflow_ttft_s histogram
ray_tierflow_ttft_s_bucket{application="gen",served_by="stable",le="0.1"} 8.0
ray_tierflow_ttft_s_bucket{application="gen",served_by="stable",le="0.5"} 10.0
ray_tierflow_ttft_s_bucket{application="gen",served_by="stable",le="+Inf"} 10.0
ray_tierflow_ttft_s_count{application="gen",served_by="stable"} 10.0
ray_tierflow_ttft_s_sum{application="gen",served_by="stable"} 1.2
# TYPE ray_tierflow_tbt_s histogram
ray_tierflow_tbt_s_bucket{application="gen",served_by="stable",le="0.01"} 900.0
ray_tierflow_tbt_s_bucket{application="gen",served_by="stable",le="0.1"} 990.0
ray_tierflow_tbt_s_bucket{application="gen",served_by="stable",le="+Inf"} 990.0
ray_tierflow_tbt_s_count{application="gen",served_by="stable"} 990.0
ray_tierflow_tbt_s_sum{application="gen",served_by="stable"} 9.0
# TYPE ray_tierflow_e2e_s histogram
ray_tierflow_e2e_s_bucket{application="gen",served_by="stable",le="1.0"} 6.0
ray_tierflow_e2e_s_bucket{application="gen",served_by="stable",le="+Inf"} 10.0
ray_tierflow_e2e_s_count{application="gen",served_by="stable"} 10.0
ray_tierflow_e2e_s_sum{application="gen",served_by="stable"} 20.0
# TYPE ray_tierflow_fluidity histogram
ray_tierflow_fluidity_bucket{application="gen",served_by="stable",le="0.9"} 1.0
ray_tierflow_fluidity_bucket{application="gen",served_by="stable",le="0.999"} 2.0
ray_tierflow_fluidity_bucket{application="gen",served_by="stable",le="1.0"} 10.0
ray_tierflow_fluidity_bucket{application="gen",served_by="stable",le="+Inf"} 10.0
ray_tierflow_fluidity_count{application="gen",served_by="stable"} 10.0
ray_tierflow_fluidity_sum{application="gen",served_by="stable"} 9.7
# TYPE ray_tierflow_generated_tokens_total counter
ray_tierflow_generated_tokens_total{application="gen",served_by="stable"} 1000.0
ray_tierflow_deadlines_total{application="gen",served_by="stable"} 1040.0
ray_tierflow_missed_deadlines_total{application="gen",served_by="stable"} 52.0
ray_tierflow_stream_seconds_total{application="gen",served_by="stable"} 25.0
"""


def test_generation_figures_from_the_user_experience_histograms():
    s = summarize(parse(TEXT + GEN_TEXT), "gen")
    assert s["streams"] == 10 and s["generated_tokens"] == 1000
    assert s["ttft_s_p50"] == pytest.approx(0.1 * 5 / 8)  # the 5th of 10, 5/8 into the first bucket
    assert s["tbt_s_p99"] == pytest.approx(0.01 + 0.09 * (980.1 - 900) / 90)
    # from the exact counters, not the histograms' sums (Ray rebuilds those from bucket midpoints)
    assert s["fluidity_pooled"] == pytest.approx(1 - 52 / 1040) and s["fluid_share"] == pytest.approx(0.8)
    assert s["tokens_per_s_per_stream"] == pytest.approx(1000 / 25.0)
    assert "streams" not in summarize(parse(TEXT), "digits")  # a classifier has none of these


def test_serve_status_prefers_the_whole_apps_figures_over_one_replicas():
    from serving.metrics import generation_status

    whole = summarize(parse(GEN_TEXT), "gen")
    replica = {"ttft_s_p50": 9.0, "tokens_per_s_p50": 5.0, "engine": {"active": 0}}
    assert generation_status(replica, whole)["ttft_s_p50"] == whole["ttft_s_p50"]
    assert generation_status(replica, whole)["source"] == "prometheus"
    assert generation_status(replica, {"requests": 0})["ttft_s_p50"] == 9.0
    assert generation_status({"latency_ms_p50": 1.0}, {"requests": 3}) == {}  # a classifier app
