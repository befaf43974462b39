"""The Ray Serve application for any tierflow model: FastAPI ingress, request validation, dynamic batching.

The request schema comes from the model's contract (`serving.contract.InputSpec`: width, dtype, range),
checked by `serving.validation` on the raw body. Client mistakes (wrong JSON, types, shapes, non-finite
or dtype-overflowing numbers, values outside the model's range) answer 422, bodies over the limit 413;
none reaches the model, none is a 500, and no 200 carries a non-finite number. Past
`max_ongoing_requests` + `max_queued_requests`, Serve answers 503.
"""

import asyncio
import os
import random
import time
from collections import deque
from typing import Annotated, Any

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import metrics

from actors.runner import detect_device
from serving.config import USER_CODE_THREAD_ENV, ModelSource, ServeConfig, ServingError
from serving.contract import forward
from serving.loading import load_model
from serving.validation import EndpointError, check_model, check_outputs, parse_instances, probe

FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
# A forward pass expected to take less than this runs on the replica's event loop: handing it to a worker
# thread costs ~60 us plus a GIL hand-off (up to the 5 ms switch interval when the loop is busy), more than a
# small model's whole forward pass. Longer ones go to a thread so the loop keeps parsing the next requests.
INLINE_FORWARD_S = 0.001


def serving_device(gpu_ids: list[str], *, compressed: bool) -> tuple[str, str]:
    """The torch device a replica runs its model on, and why (both reported at `/info`)."""
    if gpu_ids and compressed:
        return "cpu", "int8 dynamic quantisation (torch.ao) runs on CPU only; serve the float model to use the GPU"
    device = detect_device(gpu_ids)  # the stages' rule: cuda only when Ray assigned a GPU and torch has CUDA
    if device != "cpu":
        return device, f"Ray assigned GPU {gpu_ids}"
    if gpu_ids:
        return "cpu", f"Ray assigned GPU {gpu_ids} but torch sees no CUDA device (CPU-only build or no driver)"
    return "cpu", "no GPU assigned to this replica"


api = FastAPI(title="tierflow model endpoint", description="Predictions from a tierflow-trained model.")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instances: list[list[FiniteFloat]] = Field(
        min_length=1, description="Rows of features, one list per example; width, dtype and range: GET /info."
    )


class PredictResponse(BaseModel):
    # a classifier: class labels and probabilities; a regressor: its outputs (one number or list per row)
    predictions: list[Any]
    probabilities: list[list[float]] | None = None
    model_digest: str
    model_version: str
    served_by: str


@api.exception_handler(EndpointError)
async def _endpoint_error(request: Request, exc: EndpointError) -> JSONResponse:
    return JSONResponse(exc.body, exc.status)


@api.exception_handler(Exception)  # anything unexpected still answers JSON (Starlette logs and re-raises it)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the replica's log"}, 500)


# The body is parsed by serving.validation, not FastAPI (whose 422 echoes the input and cannot encode a
# NaN in it); the OpenAPI document still shows the request schema.
_PREDICT_BODY = {"required": True, "content": {"application/json": {"schema": PredictRequest.model_json_schema()}}}


class BodyLimit:
    """Pure ASGI middleware: 413 from Content-Length before the body is read, or as soon as a chunked
    body passes the limit. (Starlette's BaseHTTPMiddleware costs a task group per request.)"""

    def __init__(self, app: Any, state: Any = None) -> None:
        self.app = app
        self.state = state  # where the replica put its limit (`max_body_bytes`); None: this module's app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = getattr(self.state if self.state is not None else api.state, "max_body_bytes", 1 << 20)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _refuse(scope, receive, send, limit)
            return
        seen, refused = 0, False

        async def counted() -> dict[str, Any]:
            nonlocal seen, refused
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit and not refused:
                refused = True
                await _refuse(scope, receive, send, limit)
                return {"type": "http.disconnect"}  # the app stops reading; it answers nobody
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counted, guarded_send)


async def _refuse(scope: dict[str, Any], receive: Any, send: Any, limit: int) -> None:
    response = JSONResponse({"detail": f"request body over {limit} bytes; send less per request"}, 413)
    await response(scope, receive, send)


api.add_middleware(BodyLimit)


class _Stats:
    """Recent latencies and batch sizes, for `tierflow serve status` and the MLflow summary."""

    def __init__(self) -> None:
        self.requests = 0
        self.latencies_ms: deque[float] = deque(maxlen=10_000)
        self.batch_sizes: deque[int] = deque(maxlen=10_000)

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        sizes = np.asarray(self.batch_sizes) if self.batch_sizes else np.zeros(1)
        return {
            "requests": self.requests,
            "latency_ms_p50": float(np.percentile(lat, 50)),
            "latency_ms_p95": float(np.percentile(lat, 95)),
            "latency_ms_p99": float(np.percentile(lat, 99)),
            "batch_size_mean": float(sizes.mean()),
            "batch_size_max": int(sizes.max()),
        }


@serve.deployment
@serve.ingress(api)
class ModelServer:
    """One model version. With a canary configured, a share of requests goes to the canary app."""

    def __init__(self, source: ModelSource, config: ServeConfig, canary_app: str | None = None) -> None:
        self.model, self.spec = load_model(source)
        self.source = source
        self.config = config
        self.n_features = self.spec.input.width
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        self.device, self.device_reason = serving_device(self.gpu_ids, compressed=self.spec.compression is not None)
        self.model.to(self.device)
        # a model non-finite on a row inside its own range is broken for every request: refuse it at load
        check_model(forward(self.model, self.spec, probe(self.spec.input), self.device), self.spec.input)
        api.state.max_body_bytes = config.max_body_bytes
        self.canary = serve.get_deployment_handle("ModelServer", app_name=canary_app) if canary_app else None
        self.canary_app = canary_app
        self._predict_batch.set_max_batch_size(config.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.forward_s = 0.0  # moving average of a forward pass; 0 until the first one ran (inline)
        self.idle = asyncio.Event()  # clear while a batch computes on a worker thread
        self.idle.set()
        self.queued = 0  # requests handed to the batch queue and not answered yet
        self.stats = _Stats()
        self.batch_hist = metrics.Histogram(
            "tierflow_batch_size", description="rows per model call", boundaries=[1, 2, 4, 8, 16, 32, 64, 128]
        )
        self.request_counter = metrics.Counter(
            "tierflow_requests", description="predictions served", tag_keys=("served_by",)
        )

    def check_health(self) -> None:  # Serve restarts a replica whose check fails
        if self.model is None:
            raise RuntimeError("model not loaded")

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)  # both replaced from the ServeConfig
    async def _predict_batch(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        proba = await self._run(np.concatenate(batches) if len(batches) > 1 else batches[0])
        out, start = [], 0
        for b in batches:
            out.append(proba[start : start + len(b)])
            start += len(b)
        return out

    async def _run(self, rows: np.ndarray) -> np.ndarray:
        """One model call: inline when forward passes are short, else on a worker thread (`idle` clear meanwhile)."""
        self.batch_hist.observe(len(rows))
        self.stats.batch_sizes.append(len(rows))
        if self.forward_s < INLINE_FORWARD_S:
            proba, took = self._forward(rows)
        else:
            self.idle.clear()  # before the first await: a request arriving now waits for the next batch
            try:
                proba, took = await asyncio.to_thread(self._forward, rows)
            finally:
                self.idle.set()
        self.forward_s = took if self.forward_s == 0.0 else 0.8 * self.forward_s + 0.2 * took
        return proba

    def _forward(self, rows: np.ndarray) -> tuple[np.ndarray, float]:
        """Outputs (a classifier's probabilities) and the seconds the forward pass took (timed where it runs)."""
        t0 = time.perf_counter()
        proba = forward(self.model, self.spec, rows, self.device)
        return proba, time.perf_counter() - t0

    async def infer(self, rows: np.ndarray) -> np.ndarray:
        """Model outputs for rows (a classifier's probabilities).

        Adaptive batching (`batch_wait_timeout_s=0`): a request that finds no batch computing and none
        queued has nothing to join and goes straight to the model, skipping the batch queue's event-loop
        hops. While a batch computes, arrivals wait here and all join the queue the moment it ends, so the
        next batch is everything that arrived meanwhile (up to `max_batch_size`). Ray Serve 2.60 on its own
        forms a batch as soon as its first request arrives, before the previous batch has finished, so
        without this gate batches stay at ~1-2 rows however long the model runs. With a positive wait,
        every request goes through the queue and Serve's wait applies.
        """
        if self.idle.is_set() and not self.queued and not self.config.batch_wait_timeout_s:
            return await self._run(rows)
        if not self.idle.is_set():
            await self.idle.wait()
        self.queued += 1
        try:
            return await self._predict_batch(rows)
        finally:
            self.queued -= 1

    @api.post("/predict", response_model=PredictResponse, openapi_extra={"requestBody": _PREDICT_BODY})
    async def predict(self, request: Request) -> PredictResponse:
        t0 = time.perf_counter()
        body, content_type = await request.body(), request.headers.get("content-type")
        rows = parse_instances(body, content_type, self.spec.input, max_rows=self.config.max_rows)
        to_canary = self.canary is not None and random.random() < self.config.canary_share  # noqa: S311
        try:
            answer = await (self.canary.answer.remote(rows) if to_canary else self.answer(rows))
        except Exception as exc:  # the canary's refusal arrives wrapped in Ray's task error: answer it as ours
            if isinstance(cause := getattr(exc, "cause", None), EndpointError):
                raise cause from None
            raise
        self.stats.requests += 1
        self.stats.latencies_ms.append((time.perf_counter() - t0) * 1000)
        self.request_counter.inc(tags={"served_by": "canary" if to_canary else "stable"})
        return PredictResponse(**answer, served_by="canary" if to_canary else "stable")

    async def answer(self, rows: np.ndarray) -> dict[str, Any]:
        """The response body for rows, from this replica's model; also what a stable replica asks its canary."""
        out = await self.infer(rows)
        check_outputs(out, self.spec.input)  # never a 200 with null or non-finite numbers
        classifier = self.spec.task == "classifier"
        return {
            "predictions": self.spec.labels(out) if classifier else np.round(out, 6).tolist(),
            "probabilities": np.round(out, 6).tolist() if classifier else None,
            "model_digest": self.source.digest,
            "model_version": self.source.version,
        }

    def smoke_rows(self) -> np.ndarray:
        """One row the model declares valid (its input example): what a rollout asks before switching."""
        return self.spec.example_rows()[:1]

    async def smoke_check(self) -> None:
        """What a rollout asks before switching: one prediction on the model's own example row, finite."""
        proba = await self.infer(self.smoke_rows())
        if proba.shape[0] != 1 or not np.isfinite(proba).all():
            raise ServingError(f"smoke prediction returned {proba!r}")

    def describe(self) -> dict[str, Any]:
        return {
            "model_digest": self.source.digest,
            "model_version": self.source.version,
            "model_name": self.source.model_name,
            "n_features": self.n_features,
            "input": {
                "width": self.n_features,
                "dtype": self.spec.input.dtype,
                "min": self.spec.input.min,
                "max": self.spec.input.max,
            },
            "task": self.spec.task,
            "outputs": self.spec.outputs,
            "classes": self.spec.classes,
            "builder": self.spec.builder,
            "compression": (self.spec.compression or {}).get("method", "none"),
            "canary_app": self.canary_app or "",
            "canary_share": self.config.canary_share,
            "device": self.device,
            "device_reason": self.device_reason,
            "gpu_ids": self.gpu_ids,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            # as Serve reads it when the replica's process starts (ServeConfig.separate_user_code_thread)
            "user_code_loop": "separate" if os.environ.get(USER_CODE_THREAD_ENV, "1") != "0" else "main",
            **self.source.lineage,
        }

    @api.get("/healthz")
    def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    def readyz(self) -> dict[str, Any]:
        return {"ready": self.model is not None, "model_version": self.source.version}

    @api.get("/info")
    def info(self) -> dict[str, Any]:
        return self.describe()

    @api.get("/stats")
    def stats_summary(self) -> dict[str, Any]:
        return self.stats.summary()


def bind(
    source: ModelSource, config: ServeConfig, ray_actor_options: dict[str, Any], canary_app: str | None = None
) -> Any:
    return ModelServer.options(**config.deployment_options(ray_actor_options)).bind(source, config, canary_app)
