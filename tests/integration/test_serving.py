"""Production serving on real Ray Serve over HTTP: rollout from the MLflow registry, bad input, overload."""

import asyncio
import json
import math
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from mlflow import MlflowClient
from ray import serve

from serving.app import bind
from serving.config import ModelSource, RolloutRefused, ServeConfig
from serving.loading import registry_source
from serving.rollout import Rollout, replica_options, wait_running
from storage import StoreConfig
from tests.conftest import free_port, start_local_ray
from tests.fixtures.hostile_bodies import REPORTED_LITERALS, expected_statuses, hostile_cases, reported_body
from workflows import StageFailedError, Workflow
from workflows.builtin.digits import _raw_test_rows, evaluate, preprocess, train
from workflows.engine import run_workflow
from workflows.lineage import MLflowHook

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
MODEL = "tierflow-digits"


def serve_build(port: int, uri: str, out: Path) -> subprocess.Popen:
    """`tierflow serve build` for v2 with deliberately tight limits (it needs neither Ray nor the registry).

    Each request to the built app waits ~1 s for its batch to fill: 2 in flight + 2 queued, the rest are
    refused. The overload test bursts this app, so one replica start covers the build and overload checks.
    """
    limits = ["--max-ongoing-requests", "2", "--max-queued-requests", "2", "--max-batch-size", "64"]
    cmd = [sys.executable, "-m", "workflows", "serve", "build", f"models:/{MODEL}/2", "--app", "built"]
    cmd += ["--port", str(port), "--tracking-uri", uri, *limits, "--batch-wait-timeout-s", "1.0", "-o", str(out)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import ray
    from ray.serve.schema import ServeDeploySchema

    from serving.rollout import build_app

    tmp = tmp_path_factory.mktemp("serving")
    port = free_port()
    store = StoreConfig.from_urls([str(tmp / "store")])
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    building = serve_build(port, uri, tmp / "serve_config.yaml")  # runs while the models train
    # one declared T4 (no real GPU here): replicas that ask for a fraction of it get it assigned by Ray.
    # Ray's processes export metrics every 0.5 s instead of 10 s, so `serve status` sees recent requests.
    restore = pytest.MonkeyPatch()
    restore.setenv("RAY_metrics_report_interval_ms", "500")
    start_local_ray(num_cpus=4, num_gpus=1, resources={"accelerator_type:T4": 1})
    try:  # a failed setup must not leave this module's Ray running for the next module
        wf = Workflow("serving_models", [preprocess, train, evaluate])
        with ThreadPoolExecutor(1) as pool:
            starting = pool.submit(serve.start, http_options={"host": "127.0.0.1", "port": port})  # also meanwhile
            for seed in (0, 1):
                run_workflow(
                    wf, params={"train.epochs": 8, "train.seed": seed}, store_config=store, hooks=[MLflowHook(uri)]
                )
            starting.result()
        build = finish(building)
        assert build.returncode == 0, build.stdout + build.stderr
        built = ServeDeploySchema.model_validate(yaml.safe_load((tmp / "serve_config.yaml").read_text()))
        app = built.applications[0]
        # v2 is registered: run the built config as `serve run` would; its replica starts while the tests go on
        serve.run_many(
            [serve.RunTarget(build_app(app.args), name=app.name, route_prefix=app.route_prefix)],
            wait_for_applications_running=False,
        )
        with pytest.raises(StageFailedError, match="GateFailed"):
            run_workflow(
                wf,
                params={"train.epochs": 1, "train.seed": 2, "evaluate.threshold": 0.999},
                store_config=store,
                hooks=[MLflowHook(uri)],
            )
        from storage import ArtifactStore

        prep = next(m for m in ArtifactStore(store).manifests() if m.stage == "preprocess")
        table = ArtifactStore(store).get(prep)
        x, y = _raw_test_rows(table)
        yield {"store": store, "uri": uri, "port": port, "x": x, "y": y, "tmp": tmp, "built": built}
    finally:
        serve.shutdown()
        ray.shutdown()
        restore.undo()


def cfg(env, **kw) -> ServeConfig:
    # Replicas stopped by a test re-check for in-flight requests every 0.1 s instead of Serve's 2 s:
    # they still drain every in-flight request, they just notice sooner that none is left.
    return ServeConfig(port=env["port"], **{"graceful_shutdown_wait_loop_s": 0.1, **kw})


def predict(env, app="digits", rows=None, timeout=30):
    rows = env["x"][:4].tolist() if rows is None else rows
    return httpx.post(f"http://127.0.0.1:{env['port']}/{app}/predict", json={"instances": rows}, timeout=timeout)


def test_registry_versions_carry_their_gate_verdict(env):
    client = MlflowClient(env["uri"])
    gates = {int(v.version): v.tags.get("tierflow.gate") for v in client.search_model_versions(f"name = '{MODEL}'")}
    assert gates == {1: "passed", 2: "passed", 3: "failed"}


def test_deploy_from_the_registry_and_predict(env):
    url = Rollout(env["store"], cfg(env)).deploy(registry_source(f"models:/{MODEL}/1", env["uri"]))
    r = predict(env)
    assert r.status_code == 200
    body = r.json()
    assert body["model_version"] == "1" and body["served_by"] == "stable"
    assert sum(p == t for p, t in zip(body["predictions"], env["y"][:4], strict=True)) >= 3
    info = httpx.get(f"{url}/info", timeout=10).json()
    assert info["model_name"] == MODEL and info["gate"] == "passed"
    assert info["user_code_loop"] == "main"  # the replica's process started with Serve's thread turned off
    assert httpx.get(f"{url}/readyz", timeout=10).json()["ready"] is True
    assert "/predict" in httpx.get(f"{url}/openapi.json", timeout=10).text


@pytest.mark.parametrize(
    ("content", "headers", "status"),
    [
        ('{"instances": [[1, 2,', None, 422),
        (json.dumps({"instances": [["a"] * 64]}), None, 422),
        (json.dumps({"instances": [[1.0] * 63]}), None, 422),
        (json.dumps({"instances": [[[1.0]] * 64]}), None, 422),
        (json.dumps({"instances": None}), None, 422),
        (json.dumps([1, 2, 3]), None, 422),
        ("instances=1", {"content-type": "text/plain"}, 422),
        (json.dumps({"instances": [[0.5] * 64] * 2000}), None, 413),  # ~1.3 MB: over the 1 MiB body limit
        (json.dumps({"instances": [[1] * 64] * 1025}), None, 413),  # under the byte limit, over max_rows
    ],
)
def test_bad_input_is_a_4xx_and_the_replica_stays_healthy(env, content, headers, status):
    url = f"http://127.0.0.1:{env['port']}/digits/predict"
    r = httpx.post(url, content=content, headers=headers or {"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    assert "detail" in r.json()
    assert predict(env).status_code == 200


def test_a_chunked_oversized_body_is_refused(env):
    def chunks():
        for _ in range(40):
            yield b"[" + b"0.5," * 10_000 + b"0.5]"

    url = f"http://127.0.0.1:{env['port']}/digits/predict"
    r = httpx.post(url, content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413
    assert predict(env).status_code == 200


@pytest.mark.parametrize("literal", REPORTED_LITERALS)
def test_the_reported_non_finite_and_overflow_bodies_answer_422(env, literal):
    # issue 16: NaN / Infinity / 1e999 answered 500 (FastAPI's 422 echoed them and could not encode them),
    # 1e300 answered 200 with null probabilities (finite, but over float32)
    url = f"http://127.0.0.1:{env['port']}/digits/predict"
    r = httpx.post(url, content=reported_body(literal), headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 422, r.text
    assert "send f" in r.json()["detail"]  # "send finite ..." / "send float32 values ..."


def _finite_probabilities(body: dict) -> bool:
    return all(isinstance(p, float) and math.isfinite(p) for row in body["probabilities"] for p in row)


async def _fuzz(url: str, seed: int, count: int, clients: int) -> list[tuple[str, int, bytes, bytes]]:
    """(category, status, request body, response body) of `count` seeded hostile cases, `clients` at a time."""
    gate = asyncio.Semaphore(clients)
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=clients)) as client:

        async def one(category: str, body: bytes, content_type: str | None) -> tuple[str, int, bytes, bytes]:
            headers = {} if content_type is None else {"content-type": content_type}
            async with gate:
                r = await client.post(url, content=body, headers=headers)
            return category, r.status_code, body, r.content

        return await asyncio.gather(*(one(*case) for case in hostile_cases(seed, count)))


def test_fuzzed_bodies_never_reach_5xx_and_the_replica_stays_healthy(env):
    # Non-finite literals, overflow, deep nesting, huge rows/columns, wrong types, odd or missing content
    # types, empty bodies, invalid UTF-8, truncated and mutated JSON (tests/fixtures/hostile_bodies.py)
    t0 = time.perf_counter()
    results = asyncio.run(_fuzz(f"http://127.0.0.1:{env['port']}/digits/predict", seed=16, count=2000, clients=16))
    took = time.perf_counter() - t0
    statuses = Counter(status for _, status, _, _ in results)
    assert not {s for s in statuses if s >= 500 and s != 503}, statuses
    unexpected = [(c, s, b[:80]) for c, s, b, _ in results if s != 503 and s not in expected_statuses(c)]
    assert not unexpected, unexpected[:5]
    for category, status, body, answer in results:
        doc = json.loads(answer)  # every answer is JSON, errors included
        if status == 200:
            assert _finite_probabilities(doc), (category, body[:80], answer[:200])
        else:
            assert isinstance(doc["detail"], str) and doc["detail"], (category, status, answer[:200])
    assert statuses[200] >= 100 and statuses[422] >= 1000 and statuses[413] >= 10, statuses
    print(f"fuzz: {len(results)} requests in {took:.1f} s, {dict(statuses)}")
    base = f"http://127.0.0.1:{env['port']}/digits"
    assert httpx.get(f"{base}/healthz", timeout=10).json() == {"status": "ok"}
    r = predict(env)
    assert r.status_code == 200 and _finite_probabilities(r.json())


async def _closed_loops(url: str, rows: list, clients: int, seconds: float) -> Counter:
    """`clients` closed loops posting `rows` for `seconds`, all sharing one connection pool: status counts."""
    codes: Counter = Counter()
    end = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=None)) as client:

        async def loop() -> None:
            while time.monotonic() < end:
                codes[(await client.post(url, json={"instances": rows})).status_code] += 1

        async def waves() -> None:  # all of them at once, as clients answered by one batch come back
            while time.monotonic() < end:
                rs = await asyncio.gather(*(client.post(url, json={"instances": rows}) for _ in range(clients)))
                codes.update(r.status_code for r in rs)

        await asyncio.gather(*(loop() for _ in range(clients)))
        end = time.monotonic() + seconds
        await waves()
    return codes


def test_16_concurrent_clients_far_below_capacity_get_no_503(env):
    # issue 16: 16 clients against a default deployment (64 slots) got 503s, because Serve counts a request
    # as queued until the router has handed it to a replica and the queue limit was a fixed 8 (ServeConfig)
    assert cfg(env).queue_limit >= 16
    codes = asyncio.run(_closed_loops(f"http://127.0.0.1:{env['port']}/digits/predict", env["x"][:1].tolist(), 16, 2))
    assert codes[503] == 0 and set(codes) == {200}, codes
    assert codes[200] >= 100, codes
    print(f"16 clients, 2 s closed loops + 2 s waves: {dict(codes)}")


def test_a_version_that_failed_its_gate_is_refused_and_the_old_keeps_serving(env):
    with pytest.raises(RolloutRefused, match=r"tierflow\.gate=failed"):
        registry_source(f"models:/{MODEL}/3", env["uri"])
    assert predict(env).json()["model_version"] == "1"


def test_an_unhealthy_version_is_refused_and_the_old_keeps_serving(env):
    good = registry_source(f"models:/{MODEL}/2", env["uri"])
    broken = ModelSource(digest="0" * 64, version="2", model_name=MODEL, tracking_uri=env["uri"])
    assert good.digest != broken.digest
    with pytest.raises(RolloutRefused, match=r"did not become healthy.*keeps serving"):
        # refused at the first constructor failure instead of after Serve's 3 identical retries
        Rollout(env["store"], cfg(env, max_constructor_retry_count=1)).deploy(broken)
    assert predict(env).json()["model_version"] == "1"
    assert "digits-candidate" not in serve.status().applications


def test_canary_then_promote(env):
    rollout = Rollout(env["store"], cfg(env))
    rollout.deploy(registry_source(f"models:/{MODEL}/2", env["uri"]), canary_share=0.5)
    seen = {(b["served_by"], b["model_version"]) for b in (predict(env).json() for _ in range(40))}
    assert seen == {("stable", "1"), ("canary", "2")}
    assert rollout.status()["canary"]["version"] == "2"
    rollout.promote()
    assert {predict(env).json()["model_version"] for _ in range(10)} == {"2"}
    assert "digits-canary" not in serve.status().applications
    # v2 (promoted) stays stable: test_cli_deploy_status_with_mlflow_summary_and_rollback deploys v1 over
    # it and rolls back to the promoted version, so one rollout covers both (each costs two replica starts)


@pytest.fixture(scope="module")
def built(env):
    """The app `env` started from the `tierflow serve build` config, once it is RUNNING."""
    wait_running("built")
    return env["built"]


def test_serve_build_writes_a_config_serve_can_run(env, built):
    assert built.http_options.host == "127.0.0.1"
    app = built.applications[0]
    assert app.import_path == "serving.rollout:build_app" and app.route_prefix == "/built"
    assert app.args["max_ongoing_requests"] == 2 and app.args["batch_wait_timeout_s"] == 1.0
    assert predict(env, app="built").json()["model_version"] == "2"


async def _burst(url: str, n: int) -> list[tuple[int, float]]:
    async with httpx.AsyncClient(timeout=60) as client:

        async def one() -> tuple[int, float]:
            t0 = time.perf_counter()
            r = await client.post(url, json={"instances": [[0.0] * 64]})
            return r.status_code, time.perf_counter() - t0

        return await asyncio.gather(*(one() for _ in range(n)))


def test_overload_answers_503_fast_and_recovers(env, built):
    # `built` runs with max_ongoing_requests=2, max_queued_requests=2, max_batch_size=64, batch_wait_timeout_s=1.0
    results = asyncio.run(_burst(f"http://127.0.0.1:{env['port']}/built/predict", 20))
    codes = [c for c, _ in results]
    assert codes.count(503) >= 10 and codes.count(200) >= 2, codes
    assert max(t for c, t in results if c == 503) < 1.0  # refused at once, not after a timeout
    assert max(t for c, t in results if c == 200) < 5.0  # accepted requests keep bounded latency
    deadline = time.monotonic() + 1.5  # recovered once the burst is over (within the same 1.5 s as before)
    while (r := predict(env, app="built")).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.status_code == 200, r.text
    stats = httpx.get(f"http://127.0.0.1:{env['port']}/built/stats", timeout=10).json()
    assert stats["requests"] >= 3 and stats["batch_size_max"] >= 2  # concurrent requests were batched


async def _open_loop(url: str, rate: float, seconds: float) -> list[tuple[int, float]]:
    """(status, latency from the scheduled send time) of requests sent at a fixed rate; -1 = no answer."""
    async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=None)) as client:

        async def one(at: float) -> tuple[int, float]:
            try:
                status = (await client.post(url, json={"instances": [[0.0] * 64]})).status_code
            except httpx.HTTPError:
                status = -1
            return status, time.perf_counter() - at

        t0, tasks = time.perf_counter(), []
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(t0 + i / rate)))
        return await asyncio.gather(*tasks)


def test_sustained_overload_refuses_fast_keeps_latency_bounded_and_recovers(env):
    # A replica that takes 8 requests per ~0.1 s batch (the batch can never fill 16, so it waits): ~75 req/s,
    # offered 150 req/s for 3 s, with the ServeConfig defaults for the router queue and its backoff. With
    # Serve's own (128 queued, backoff up to 0.5 s) this app answered ~4 req/s and accepted requests waited
    # seconds: the router handed the queue to the replica one request per backoff sleep.
    config = cfg(env, app_name="overload", max_ongoing_requests=8, max_batch_size=16, batch_wait_timeout_s=0.1)
    source = registry_source(f"models:/{MODEL}/1", env["uri"])
    serve.run(bind(source, config, replica_options(config)), name="overload", route_prefix="/overload")
    url = f"http://127.0.0.1:{env['port']}/overload/predict"
    try:
        results = asyncio.run(_open_loop(url, rate=150, seconds=3))
        ok = sorted(t for c, t in results if c == 200)
        refused = sorted(t for c, t in results if c == 503)
        assert {c for c, _ in results} <= {200, 503}, Counter(c for c, _ in results)  # nothing timed out
        assert len(ok) >= 100, (len(ok), len(refused))  # >= ~45% of capacity answered, not a trickle
        assert refused and refused[len(refused) // 2] < 0.1 and refused[-1] < 1.0  # refused at once
        assert ok[int(0.99 * len(ok))] < 1.0  # accepted: a few batches of waiting, not seconds
        t0 = time.perf_counter()  # recovered as soon as the load stops
        assert predict(env, app="overload").status_code == 200 and time.perf_counter() - t0 < 0.5
    finally:
        serve.delete("overload", _blocking=False)


def replica_states(app: str) -> dict[str, int]:
    found = serve.status().applications.get(app)
    return dict(found.deployments["ModelServer"].replica_states) if found else {}


def test_replicas_are_pinned_to_declared_gpus_or_fall_back_to_cpu(env):
    import ray

    source = registry_source(f"models:/{MODEL}/1", env["uri"])
    on_gpu = cfg(env, app_name="gpu", num_gpus=0.5, accelerator_type="T4")
    fallback = cfg(env, app_name="fallback", num_gpus=1, accelerator_type="A100", fallback="cpu")  # no A100 here
    placed = {c.app_name: replica_options(c) for c in (on_gpu, fallback)}
    assert placed == {
        "gpu": {"num_cpus": 0.25, "num_gpus": 0.5, "accelerator_type": "T4"},
        "fallback": {"num_cpus": 0.25},
    }
    serve.run_many(
        [
            serve.RunTarget(bind(source, c, placed[c.app_name]), name=c.app_name, route_prefix=c.route_prefix)
            for c in (on_gpu, fallback)
        ],
        wait_for_applications_running=False,
    )
    try:
        wait_running("gpu")
        wait_running("fallback")
        assert ray.available_resources().get("GPU", 0) == pytest.approx(0.5)  # half the T4 is the replica's
        gpu = httpx.get(f"{on_gpu.url}/info", timeout=10).json()
        # Ray assigned the GPU and set CUDA_VISIBLE_DEVICES; torch here is a CPU build, so the model runs on CPU
        assert (gpu["gpu_ids"], gpu["cuda_visible_devices"]) == (["0"], "0")
        assert gpu["device"] == "cpu" and "torch sees no CUDA device" in gpu["device_reason"]
        cpu = httpx.get(f"{fallback.url}/info", timeout=10).json()
        assert cpu["gpu_ids"] == [] and cpu["device_reason"] == "no GPU assigned to this replica"
        for c in (on_gpu, fallback):
            assert predict(env, app=c.app_name).json()["model_version"] == "1"
    finally:
        for c in (on_gpu, fallback):
            serve.delete(c.app_name, _blocking=False)
    with pytest.raises(RolloutRefused, match=r"A100.*no node can satisfy it"):
        replica_options(cfg(env, app_name="strict", num_gpus=1, accelerator_type="A100"))  # no fallback: refused


async def _hold_load(url: str, workers: int, until) -> int:
    """`workers` closed loops of one-row requests until `until()` is true; the number answered 200."""
    answered = 0
    async with httpx.AsyncClient(timeout=30) as client:

        async def loop() -> None:
            nonlocal answered
            while not await asyncio.to_thread(until):
                r = await client.post(url, json={"instances": [[0.0] * 64]})
                answered += r.status_code == 200

        await asyncio.gather(*(loop() for _ in range(workers)))
    return answered


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(env):
    # Each request waits ~0.3 s for a batch that never fills, so 6 closed loops keep ~6 requests ongoing:
    # 6x the target of 1 per replica. Serve's delays are seconds here instead of its 30 s / 10 min defaults.
    config = cfg(
        env,
        app_name="auto",
        max_replicas=2,
        target_ongoing_requests=1,
        upscale_delay_s=0,
        downscale_delay_s=1,
        look_back_period_s=1,
        metrics_interval_s=0.2,
        max_batch_size=64,
        batch_wait_timeout_s=0.3,
    )
    source = registry_source(f"models:/{MODEL}/1", env["uri"])
    serve.run(bind(source, config, replica_options(config)), name="auto", route_prefix="/auto")
    try:
        assert replica_states("auto") == {"RUNNING": 1}
        deadline = time.monotonic() + 60
        scaled = lambda: replica_states("auto").get("RUNNING", 0) == 2 or time.monotonic() > deadline  # noqa: E731
        answered = asyncio.run(_hold_load(f"{config.url}/predict", 6, scaled))
        assert replica_states("auto").get("RUNNING") == 2, replica_states("auto")
        assert answered > 0
        deadline = time.monotonic() + 60  # no load now: back to min_replicas once downscale_delay_s has passed
        while replica_states("auto") != {"RUNNING": 1} and time.monotonic() < deadline:
            time.sleep(0.2)
        assert replica_states("auto") == {"RUNNING": 1}
        assert predict(env, app="auto").status_code == 200
    finally:
        serve.delete("auto", _blocking=False)


def serve_cli_start(env, *args: str) -> subprocess.Popen:
    """The real `tierflow serve ...` CLI in its own Python process, connecting to this module's Ray."""
    import ray

    address = ray.get_runtime_context().gcs_address
    cmd = [
        sys.executable,
        "-m",
        "workflows",
        "serve",
        *args,
        *(() if "--app" in args else ("--app", "digits")),  # the app these tests deploy the digits model as
        "--address",
        address,
        "--port",
        str(env["port"]),
        "--store",
        str(env["store"].durable_url),
        "--tracking-uri",
        env["uri"],
    ]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def serve_cli(env, *args: str) -> subprocess.CompletedProcess:
    return finish(serve_cli_start(env, *args))


def test_cli_deploy_status_with_mlflow_summary_and_rollback(env):
    # Starts from the promoted v2 that test_canary_then_promote left stable (v1 before it in the history).
    assert predict(env).json()["model_version"] == "2"
    # The refusal happens before anything is deployed, so it runs alongside the real rollout below.
    refusing = serve_cli_start(env, "deploy", f"models:/{MODEL}/3")
    ok = serve_cli(env, "deploy", f"models:/{MODEL}/1")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    refused = finish(refusing)
    assert refused.returncode == 2 and "tierflow.gate=failed" in refused.stdout, refused.stdout + refused.stderr
    for _ in range(5):
        assert predict(env).json()["model_version"] == "1"
    for _ in range(3):
        assert predict(env, rows=[[0.0] * 63]).status_code == 422
    time.sleep(1.0)  # two of Ray's metric reports (every 0.5 s here, 10 s by default)
    status = serve_cli(env, "status", "--log-mlflow")
    assert status.returncode == 0, status.stdout + status.stderr
    doc = json.loads(status.stdout[status.stdout.index("{") :])
    assert doc["stable"]["version"] == "1" and doc["applications"]["digits"] == "RUNNING"
    assert doc["direct_urls"] == []  # this cluster runs Serve without direct ingress (test_job_submit's does)
    assert doc["stats"]["requests"] >= 5 and doc["stats"]["latency_ms_p99"] >= doc["stats"]["latency_ms_p50"] > 0
    # the whole app as Ray's metrics endpoints count it, over every version and replica it has had
    deployment = doc["deployment"]
    assert deployment["endpoints"] == 1 and deployment["errors"] == []
    assert deployment["requests_2xx"] >= 5 and deployment["requests_4xx"] >= 3 and deployment["requests_5xx"] == 0
    assert deployment["latency_ms_p99"] >= deployment["latency_ms_p50"] > 0 and deployment["model_calls"] >= 5
    run = MlflowClient(env["uri"]).get_run(doc["mlflow_run_id"])
    assert run.data.tags["tierflow.model_version"] == "1" and run.data.metrics["requests"] >= 5
    assert {"latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "batch_size_mean"} <= set(run.data.metrics)
    assert run.data.metrics["deployment_requests_4xx"] == deployment["requests_4xx"]
    assert {"deployment_latency_ms_p99", "deployment_batch_size_mean"} <= set(run.data.metrics)
    # Rolling back from a blue/green deploy returns to the version the canary was promoted to.
    back = serve_cli(env, "rollback")
    assert back.returncode == 0 and "v2" in back.stdout, back.stdout + back.stderr
    assert predict(env).json()["model_version"] == "2"
