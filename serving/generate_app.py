"""The Ray Serve application for a generator (task `generator`): streamed text over server-sent events.

`POST /<app>/generate` with `{"prompt": ..., "stream": true}` answers `text/event-stream`: one
`data: {"text": ...}` event per chunk of generated text, then a final event with the finish reason, the
token counts and the request's user-experience metrics (serving.ux_metrics), then `data: [DONE]`. With
`"stream": false` the same arrives as one JSON answer. Sequences are decoded by one `serving.batcher`
engine per replica, batched as `ServeConfig.generation_batching` says. A client that disconnects stops its
generation: its sequence leaves the batch at the next step.

Client mistakes answer 422 (413 for a prompt or body over the limit), named and never echoed
(serving.generate_request); a full admission queue answers 503. Per request, TTFT, each time between
tokens, end-to-end latency and the fluidity index are observed as Prometheus histograms
(`tierflow_ttft_s`, `tierflow_tbt_s`, `tierflow_e2e_s`, `tierflow_fluidity`) next to Serve's own metrics.
"""

import contextlib
import json
import logging
import os
import random
import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve import metrics
from starlette.requests import ClientDisconnect

from serving.app import BodyLimit, _endpoint_error, _unexpected, serving_device
from serving.batcher import DecodeEngine, EngineBusy, EngineError, GenerationParams
from serving.config import USER_CODE_THREAD_ENV, ModelSource, ServeConfig, ServingError
from serving.generate_request import SHAPE, GenerateRequest, Limits, parse_generate, sse
from serving.ux_metrics import Deadlines, RequestMetrics, RequestTimeline
from serving.validation import EndpointError

log = logging.getLogger(__name__)
api = FastAPI(title="tierflow generation endpoint", description="Text streamed from a tierflow-trained generator.")
api.add_exception_handler(EndpointError, _endpoint_error)  # type: ignore[arg-type]
api.add_exception_handler(Exception, _unexpected)
api.add_middleware(BodyLimit, state=api.state)
_BODY = {"required": True, "content": {"application/json": {"example": json.loads(SHAPE)}}}
SMOKE_TOKENS = 4
_SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
_GAPS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
_FLUIDITY = [0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0]

# Serve's ingress captures the routes when the class is decorated: what they call is defined before it.
# Proxies (nginx) would otherwise hold the stream back until their buffer fills.
_NO_BUFFERING = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _sse(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    async for event in events:
        yield sse(event)
    yield sse("[DONE]")


class GenerationStats:
    """Recent requests' user-experience figures, for `/stats`, `tierflow serve status` and MLflow."""

    def __init__(self, keep: int = 10_000) -> None:
        self.requests = 0
        self.finish = Counter[str]()
        self.ttft_s: deque[float] = deque(maxlen=keep)
        self.tbt_s: deque[float] = deque(maxlen=10 * keep)
        self.e2e_s: deque[float] = deque(maxlen=keep)
        self.fluidity: deque[float] = deque(maxlen=keep)
        self.tokens_per_s: deque[float] = deque(maxlen=keep)
        self.met: deque[bool] = deque(maxlen=keep)
        self.deadlines = 0
        self.missed = 0

    def add(self, m: RequestMetrics, finish_reason: str) -> None:
        self.requests += 1
        self.finish[finish_reason] += 1
        if m.ttft_s is not None:
            self.ttft_s.append(m.ttft_s)
        self.tbt_s.extend(m.tbt_s)
        self.e2e_s.append(m.e2e_s)
        self.fluidity.append(m.fluidity)
        self.met.append(m.met_deadlines)
        self.deadlines += m.deadlines
        self.missed += m.missed_deadlines
        if m.tokens_per_s is not None:
            self.tokens_per_s.append(m.tokens_per_s)

    def summary(self) -> dict[str, Any]:
        def pct(values: deque[float], q: float) -> float | None:
            return round(float(np.percentile(values, q)), 6) if values else None

        return {
            "requests": self.requests,
            "finish_reasons": dict(self.finish),
            "ttft_s_p50": pct(self.ttft_s, 50),
            "ttft_s_p99": pct(self.ttft_s, 99),
            "tbt_s_p50": pct(self.tbt_s, 50),
            "tbt_s_p99": pct(self.tbt_s, 99),
            "e2e_s_p50": pct(self.e2e_s, 50),
            "e2e_s_p99": pct(self.e2e_s, 99),
            "fluidity_mean": round(float(np.mean(self.fluidity)), 6) if self.fluidity else None,
            "fluidity_pooled": round(1 - self.missed / self.deadlines, 6) if self.deadlines else None,
            "fluid_share": round(float(np.mean(self.met)), 6) if self.met else None,
            "tokens_per_s_p50": pct(self.tokens_per_s, 50),
        }


@serve.deployment
@serve.ingress(api)
class GenerationServer:
    """One generator version behind a decoding engine. With a canary configured, a share of requests is
    streamed from the canary app instead."""

    def __init__(self, source: ModelSource, config: ServeConfig, canary_app: str | None = None) -> None:
        from serving.generation import load_generator  # noqa: PLC0415  # torch: only in replicas

        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        self.device, self.device_reason = serving_device(self.gpu_ids, compressed=False)
        self.gen = load_generator(source, device=self.device)
        self.source = source
        self.config = config
        self.engine = DecodeEngine(
            self.gen,
            mode=config.generation_batching,
            max_batch_size=config.max_batch_size,
            max_waiting=config.queue_limit if config.queue_limit > 0 else config.max_ongoing_requests,
        )
        self.deadlines = Deadlines(config.target_ttft_s, config.target_tbt_s)
        self.limits = Limits(
            max_prompt_tokens=min(config.max_prompt_tokens, self.gen.max_context - 1),
            max_new_tokens=config.max_new_tokens,
            max_stop_strings=config.max_stop_strings,
            max_stop_chars=config.max_stop_chars,
            default_max_tokens=min(64, config.max_new_tokens),
        )
        api.state.max_body_bytes = config.max_body_bytes
        self.canary = serve.get_deployment_handle("GenerationServer", app_name=canary_app) if canary_app else None
        self.canary_app = canary_app
        self.stats = GenerationStats()
        tags = ("served_by",)
        self.ttft_hist = metrics.Histogram("tierflow_ttft_s", "time to first token", _SECONDS, tag_keys=tags)
        self.tbt_hist = metrics.Histogram("tierflow_tbt_s", "time between tokens", _GAPS, tag_keys=tags)
        self.e2e_hist = metrics.Histogram("tierflow_e2e_s", "request end to end", _SECONDS, tag_keys=tags)
        self.fluidity_hist = metrics.Histogram(
            "tierflow_fluidity", "fluidity index per request (Etalon)", _FLUIDITY, tag_keys=tags
        )
        self.token_counter = metrics.Counter("tierflow_generated_tokens", "tokens streamed", tag_keys=tags)
        self.deadline_counter = metrics.Counter("tierflow_deadlines", "token deadlines owed", tag_keys=tags)
        self.missed_counter = metrics.Counter("tierflow_missed_deadlines", "token deadlines missed", tag_keys=tags)
        self.seconds_counter = metrics.Counter("tierflow_stream_seconds", "seconds spent streaming", tag_keys=tags)
        self.finish_counter = metrics.Counter(
            "tierflow_generations", "requests finished, by finish reason", tag_keys=("served_by", "finish_reason")
        )

    def check_health(self) -> None:  # Serve restarts a replica whose check fails
        if self.gen is None:
            raise RuntimeError("generator not loaded")

    async def smoke_check(self) -> None:
        """What a rollout asks before switching: a few greedy tokens of the model's own example prompt."""
        prompt = self.gen.encode(self.gen.spec.generation.example_prompt)
        chunks = [c async for c in self.engine.generate(prompt, GenerationParams(max_tokens=SMOKE_TOKENS))]
        if not chunks or chunks[-1].finish_reason is None:
            raise ServingError("the smoke generation did not finish")

    async def events(self, req: GenerateRequest, served_by: str = "stable") -> AsyncIterator[dict[str, Any]]:
        """The answer as events: `{"text"}` per non-empty chunk, then the final event. Also what a stable
        replica streams from its canary (`handle.options(stream=True).events.remote(...)`)."""
        timeline = RequestTimeline(arrival_s=time.perf_counter())
        finish, tokens = None, 0
        try:  # aclosing: a consumer that stops reading ends the engine's stream now, not at garbage collection
            async with contextlib.aclosing(self.engine.generate(req.prompt_ids, req.params)) as chunks:
                async for chunk in chunks:
                    timeline.token(time.perf_counter())
                    tokens += 1
                    if chunk.text:
                        yield {"text": chunk.text}
                    finish = chunk.finish_reason
        except EngineError as exc:  # a full queue (503), or the model raised (500): the final event says so
            yield {"error": str(exc), "status": 503 if isinstance(exc, EngineBusy) else 500}
            return
        timeline.end_s = time.perf_counter()
        m = timeline.summary(self.deadlines)
        try:  # a metrics failure must not cost the client its final event
            self._record(m, finish or "unknown", served_by)
        except Exception:
            log.exception("recording a generation's metrics failed")
        yield {
            "text": "",
            "finish_reason": finish,
            "usage": {"prompt_tokens": len(req.prompt_ids), "completion_tokens": tokens},
            "metrics": m.to_dict(),
            "model_digest": self.source.digest,
            "model_version": self.source.version,
            "served_by": served_by,
        }

    def _record(self, m: RequestMetrics, finish: str, served_by: str) -> None:
        tags = {"served_by": served_by}
        if m.ttft_s is not None:
            self.ttft_hist.observe(m.ttft_s, tags=tags)
        for gap in m.tbt_s:
            self.tbt_hist.observe(gap, tags=tags)
        self.e2e_hist.observe(m.e2e_s, tags=tags)
        self.fluidity_hist.observe(m.fluidity, tags=tags)
        counts = ((self.token_counter, m.tokens), (self.deadline_counter, m.deadlines))
        counts += ((self.missed_counter, m.missed_deadlines), (self.seconds_counter, m.e2e_s))
        for counter, value in counts:
            if value > 0:  # Ray's Counter.inc refuses 0
                counter.inc(value, tags=tags)
        self.finish_counter.inc(tags={"served_by": served_by, "finish_reason": finish})
        self.stats.add(m, finish)

    @api.post("/generate", openapi_extra={"requestBody": _BODY})
    async def generate(self, request: Request) -> Any:
        try:
            body = await request.body()
        except ClientDisconnect:  # gone before its body arrived: nobody to answer (nginx's 499)
            return Response(status_code=499)
        req = parse_generate(body, request.headers.get("content-type"), self.limits, self.gen.encode)
        if self.engine.stats()["waiting"] >= self.engine.max_waiting:
            raise EndpointError(503, "the replica's admission queue is full: retry later")
        to_canary = self.canary is not None and random.random() < self.config.canary_share  # noqa: S311
        events = self._canary_events(req) if to_canary else self.events(req)
        if req.stream:
            return StreamingResponse(_sse(events), media_type="text/event-stream", headers=_NO_BUFFERING)
        text, last = [], {}
        async for event in events:
            if "error" in event:
                raise EndpointError(event["status"], event["error"])
            text.append(event["text"])
            last = event
        return JSONResponse({**last, "text": "".join(text)})

    async def _canary_events(self, req: GenerateRequest) -> AsyncIterator[dict[str, Any]]:
        assert self.canary is not None  # only called with a canary
        async for event in self.canary.options(stream=True).events.remote(req, "canary"):
            yield event

    def describe(self) -> dict[str, Any]:
        generation = self.gen.spec.generation
        return {
            "model_digest": self.source.digest,
            "model_version": self.source.version,
            "model_name": self.source.model_name,
            "task": "generator",
            "builder": self.gen.spec.builder,
            "tokenizer": generation.tokenizer,
            "vocab_size": self.gen.vocab_size,
            "max_context": self.gen.max_context,
            "example_prompt": generation.example_prompt,
            "batching": self.engine.mode,
            "max_batch_size": self.engine.max_batch_size,
            "limits": {
                "max_prompt_tokens": self.limits.max_prompt_tokens,
                "max_tokens": self.limits.max_new_tokens,
                "max_stop_strings": self.limits.max_stop_strings,
                "max_stop_chars": self.limits.max_stop_chars,
                "max_body_bytes": self.config.max_body_bytes,
            },
            "deadlines": {"target_ttft_s": self.deadlines.ttft_s, "target_tbt_s": self.deadlines.tbt_s},
            "canary_app": self.canary_app or "",
            "canary_share": self.config.canary_share,
            "device": self.device,
            "device_reason": self.device_reason,
            "gpu_ids": self.gpu_ids,
            "user_code_loop": "separate" if os.environ.get(USER_CODE_THREAD_ENV, "1") != "0" else "main",
            **self.source.lineage,
        }

    @api.get("/healthz")
    def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    def readyz(self) -> dict[str, Any]:
        return {"ready": self.gen is not None, "model_version": self.source.version}

    @api.get("/info")
    def info(self) -> dict[str, Any]:
        return self.describe()

    @api.get("/stats")
    def stats_summary(self) -> dict[str, Any]:
        return {**self.stats.summary(), "engine": self.engine.stats()}


def bind(
    source: ModelSource, config: ServeConfig, ray_actor_options: dict[str, Any], canary_app: str | None = None
) -> Any:
    return GenerationServer.options(**config.deployment_options(ray_actor_options)).bind(source, config, canary_app)


__all__ = ["GenerationServer", "GenerationStats", "bind"]
