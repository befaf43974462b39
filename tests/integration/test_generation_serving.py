"""Streamed generation on real Ray Serve over HTTP: SSE, the JSON answer, bad input, disconnects, metrics,
blue/green and rollback, with a user's own generator (tests/fixtures/paced_generators.py)."""

import json
import socket
import time

import httpx
import pytest
import ray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray import serve

from serving.config import ModelSource, ServeConfig
from serving.generation import generator_model, load_generator
from serving.rollout import Rollout
from storage import ArtifactStore, StoreConfig
from tests.conftest import free_port, ship_by_value, start_local_ray
from tests.fixtures.generative_models import fit
from tests.fixtures.paced_generators import PacedGRU
from workflows import Workflow, serve_model, stage
from workflows.engine import run_workflow

pytestmark = pytest.mark.integration
APP = "gen"
CORPUS = "the quick brown fox jumps over the lazy dog. " * 20
MAX_NEW = 400


def bundle(seed: int):
    import torch

    torch.manual_seed(seed)
    model = fit(PacedGRU(step_s=0.004), CORPUS, steps=30, seed=seed)
    return generator_model(
        model, builder=PacedGRU, args={"step_s": 0.004}, max_context=1024, example_prompt="the quick"
    )


def source_of(store: ArtifactStore, b, run: str) -> ModelSource:
    ref = store.put(b, run_id=run, stage="train")
    return ModelSource(digest=ref.digest, artifact=ref, store_config=store.config)  # task read from the bundle


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generation")
    port = free_port()
    restore = pytest.MonkeyPatch()
    restore.setenv("RAY_metrics_report_interval_ms", "500")  # `serve status` sees recent requests
    start_local_ray(num_cpus=4)
    try:
        store = ArtifactStore(StoreConfig.from_urls([str(tmp / "store")]))
        v1, v2 = bundle(0), bundle(1)
        config = ServeConfig(
            app_name=APP,
            port=port,
            max_batch_size=8,
            max_ongoing_requests=32,
            max_new_tokens=MAX_NEW,
            max_prompt_tokens=200,
            max_body_bytes=4096,
            target_ttft_s=0.5,
            target_tbt_s=0.05,
        )
        rollout = Rollout(store.config, config)
        first = source_of(store, v1, "r1")
        rollout.deploy(first)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/{APP}", timeout=30) as client:
            yield {
                "client": client,
                "port": port,
                "rollout": rollout,
                "store": store,
                "v1": v1,
                "v2": v2,
                "first": first,
                "tmp": tmp,
            }
    finally:
        serve.shutdown()
        ray.shutdown()
        restore.undo()


def stream_events(client: httpx.Client, body: dict) -> list:
    """A small SSE client: the JSON payload of every `data:` line, and the literal [DONE]."""
    events = []
    with client.stream("POST", "/generate", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
            else:
                assert line == "", line  # events are separated by blank lines, nothing else
    return events


def test_streams_sse_and_answers_json_with_the_same_seeded_text(env):
    body = {"prompt": "the lazy", "max_tokens": 40, "temperature": 0.8, "seed": 7}
    events = stream_events(env["client"], body)
    assert events[-1] == "[DONE]" and len(events) > 3
    *chunks, final = events[:-1]
    assert all(set(c) == {"text"} and c["text"] for c in chunks)
    text = "".join(c["text"] for c in chunks)
    assert final["finish_reason"] == "length" and final["usage"] == {"prompt_tokens": 8, "completion_tokens": 40}
    m = final["metrics"]
    assert m["tokens"] == 40 and 0 < m["ttft_s"] <= m["e2e_s"] and 0.0 <= m["fluidity"] <= 1.0
    assert m["tokens_per_s"] > 0 and m["deadlines"] >= 40

    answer = env["client"].post("/generate", json=body).json()
    assert answer["text"] == text and answer["finish_reason"] == "length"
    # exactly the generator's own one-sequence loop on the same weights
    assert text == load_generator(env["v1"]).generate("the lazy", max_tokens=40, temperature=0.8, seed=7)


def test_stop_strings_end_the_stream(env):
    free = env["client"].post("/generate", json={"prompt": "the", "max_tokens": 60}).json()["text"]
    stop = free[20:23]
    got = env["client"].post("/generate", json={"prompt": "the", "max_tokens": 60, "stop": [stop]}).json()
    assert got["finish_reason"] == "stop" and got["text"] == free[: free.index(stop)]


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"prompt": "a", "max_tokens": MAX_NEW + 1}, 422, f"[1, {MAX_NEW}]"),
        ({"prompt": "a", "temperature": -1}, 422, "temperature"),
        (b'{"prompt": "a", "temperature": NaN}', 422, "NaN"),
        (b'{"prompt": "a", "temperature": 1e999}', 422, "temperature"),
        ({"prompt": "a", "stop": ["x"] * 5}, 422, "at most 4"),
        ({"prompt": "a", "stop": ["x" * 65]}, 422, "at most 64 characters"),
        ({"prompt": "a", "max_tokens": "10"}, 422, "max_tokens"),
        ({"prompt": "a", "best_of": 2}, 422, "unknown field"),
        ({"prompt": "x" * 201}, 413, "at most 200"),
        ({"prompt": "x" * 5000}, 413, "over 4096 bytes"),
    ],
)
def test_bad_input_is_refused_by_name(env, body, status, says):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {}
    resp = env["client"].post("/generate", **(kwargs or {"json": body}))
    assert resp.status_code == status and says in resp.json()["detail"]


fuzz_bodies = st.fixed_dictionaries(
    {"prompt": st.text(max_size=30)},
    optional={
        "max_tokens": st.integers(-3, MAX_NEW + 3) | st.floats() | st.text(max_size=3) | st.booleans(),
        "temperature": st.floats() | st.integers(-3, 200) | st.none(),
        "seed": st.integers(-(2**64), 2**64) | st.none() | st.floats(),
        "stop": st.lists(st.text(max_size=70), max_size=6) | st.text(max_size=5) | st.integers(),
        "stream": st.booleans() | st.integers(0, 2),
        "junk": st.integers(),
    },
)


@settings(derandomize=True, max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fuzz_bodies)
def test_fuzzed_bodies_get_200_or_a_named_4xx(env, body):
    if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool):
        body["max_tokens"] = min(body["max_tokens"], 8)  # keep accepted ones short
    else:
        body.setdefault("max_tokens", 4)
    raw = json.dumps(body).encode()  # NaN / Infinity literals included, as hostile clients send them
    resp = env["client"].post("/generate", content=raw, headers={"content-type": "application/json"})
    assert resp.status_code in (200, 413, 422), resp.text
    if resp.status_code != 200:
        assert resp.json()["detail"].isascii()
    elif body.get("stream") is True:
        assert resp.text.endswith("data: [DONE]\n\n")
    else:
        assert resp.json()["usage"]["completion_tokens"] <= 8


def stats(env) -> dict:
    return env["client"].get("/stats").json()


def test_a_client_disconnect_stops_generation_and_frees_the_slot(env):
    before = stats(env)["engine"]
    body = json.dumps({"prompt": "the", "max_tokens": MAX_NEW, "stream": True}).encode()
    head = f"POST /{APP}/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    sock = socket.create_connection(("127.0.0.1", env["port"]))
    sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    while got.count(b"data: ") < 2:  # two events read, then the client goes away
        got += sock.recv(4096)
    assert b"200 OK" in got.split(b"\r\n", 1)[0]
    mid = stats(env)["engine"]
    assert mid["active"] == 1 and mid["tokens"] > before["tokens"]
    sock.close()
    deadline = time.monotonic() + 10
    while (now := stats(env)["engine"])["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert now["active"] == 0 and now["cancelled"] == before["cancelled"] + 1
    time.sleep(0.3)
    settled = stats(env)["engine"]
    assert settled["tokens"] - now["tokens"] <= 1  # at most the step that was running when it left
    time.sleep(0.3)
    after = stats(env)["engine"]
    assert after["tokens"] == settled["tokens"]  # nothing decodes for the abandoned request any more
    assert after["tokens"] - before["tokens"] < MAX_NEW  # and it stopped well before its max_tokens
    assert after["finished"] == before["finished"]


def test_generation_metrics_in_stats_and_in_rays_prometheus_export(env):
    from actors.ray_api import cluster_nodes
    from serving.metrics import deployment_metrics

    env["client"].post("/generate", json={"prompt": "the", "max_tokens": 10})
    s = stats(env)
    assert s["requests"] >= 1 and s["ttft_s_p50"] > 0 and s["tbt_s_p99"] >= s["tbt_s_p50"] > 0
    assert 0 <= s["fluidity_mean"] <= 1 and 0 <= s["fluidity_pooled"] <= 1 and s["engine"]["mode"] == "continuous"
    deadline = time.monotonic() + 20
    # replicas push their metrics every 0.5 s here: wait until every stream this replica scored is exported
    while (m := deployment_metrics(APP, cluster_nodes())).get("streams") != s["requests"]:
        assert time.monotonic() < deadline, (m, s)
        time.sleep(0.5)
    assert m["streams"] >= 1 and m["generated_tokens"] >= 10
    assert 0 < m["ttft_s_p50"] <= m["ttft_s_p99"] and 0 < m["tbt_s_p50"] <= m["tbt_s_p99"]
    assert 0 <= m["fluidity_pooled"] <= 1 and 0 <= m["fluid_share"] <= 1
    # the whole app's pooled fluidity is the replica's (one replica, counters exact, both since it started)
    assert m["fluidity_pooled"] == pytest.approx(stats(env)["fluidity_pooled"], abs=1e-6)

    # `tierflow serve status` shows them and `--log-mlflow` records them
    from mlflow import MlflowClient

    from workflows.serve_cli import _status, metrics_to_log

    status = _status(env["rollout"])
    assert status["generation"]["source"] == "prometheus" and status["generation"]["ttft_s_p99"] > 0
    uri = f"sqlite:///{env['tmp'] / 'mlflow.db'}"
    run_id = env["rollout"].log_stats(uri, metrics_to_log(status))
    logged = MlflowClient(uri).get_run(run_id).data.metrics
    assert logged["generation_fluidity_pooled"] == pytest.approx(status["generation"]["fluidity_pooled"])
    assert logged["engine_tokens"] >= 10 and logged["deployment_streams"] >= 1


def test_blue_green_canary_and_rollback(env):
    client, rollout = env["client"], env["rollout"]
    info = client.get("/info").json()
    assert info["task"] == "generator" and info["model_digest"] == env["first"].digest
    assert info["batching"] == "continuous" and info["deadlines"] == {"target_ttft_s": 0.5, "target_tbt_s": 0.05}
    rollout.deploy(source_of(env["store"], env["v2"], "r2"))
    assert client.get("/info").json()["model_digest"] != env["first"].digest
    answer = client.post("/generate", json={"prompt": "the", "max_tokens": 12}).json()
    assert answer["text"] == load_generator(env["v2"]).generate("the", max_tokens=12)
    # v1 again as a canary for half the requests: streamed from the canary's replica through the stable one
    rollout.deploy(env["first"], canary_share=0.5)
    texts = {g: load_generator(env[g]).generate("the", max_tokens=12) for g in ("v1", "v2")}
    seen = {}
    for _ in range(30):
        events = stream_events(client, {"prompt": "the", "max_tokens": 12})
        final = events[-2]
        seen[final["served_by"]] = final["model_digest"]
        expected = texts["v1" if final["served_by"] == "canary" else "v2"]
        assert "".join(e["text"] for e in events[:-1]) == expected
        if len(seen) == 2:
            break
    assert seen.keys() == {"stable", "canary"} and seen["canary"] == env["first"].digest
    dropped = rollout.rollback()  # drops the canary; v2 keeps serving
    assert dropped["digest"] != env["first"].digest and rollout.status()["canary"] is None
    back = rollout.rollback()
    assert back["digest"] == env["first"].digest == client.get("/info").json()["model_digest"]
    assert rollout.status()["stable"]["task"] == "generator"


# A user's own generative workflow: train their model, then `serve_model` puts it on the streaming app.
@stage(cpus=1)
def train_user_lm(seed: int = 3):
    from serving.generation import generator_model as bundle_of

    model = fit(PacedGRU(hidden=24, step_s=0.0), CORPUS, steps=20, seed=seed)
    return bundle_of(model, builder=PacedGRU, args={"hidden": 24, "step_s": 0.0}, max_context=256, example_prompt="the")


def test_a_users_workflow_serves_its_generator_with_serve_model(env):
    ship_by_value(__name__)
    wf = Workflow("user_lm", [train_user_lm, serve_model("train_user_lm", app_name="user-lm", port=env["port"])])
    run = run_workflow(wf, store_config=env["store"].config, params={"serve.generation_batching": "request"})
    served = ArtifactStore(env["store"].config).get(run.records["serve"].artifact)
    assert served["task"] == "generator" and served["predict_url"].endswith("/user-lm/generate")
    answer = httpx.post(served["predict_url"], json=served["example"], timeout=30).json()
    info = httpx.get(served["url"] + "/info", timeout=30).json()
    assert info["batching"] == "request" and info["model_digest"] == served["model_digest"]
    bundle_ = ArtifactStore(env["store"].config).get(run.records["train_user_lm"].artifact)
    expected = load_generator(bundle_).generate(
        served["example"]["prompt"], max_tokens=answer["usage"]["completion_tokens"]
    )
    assert answer["text"] == expected and answer["finish_reason"] in ("length", "eos")
    serve.delete("user-lm")
