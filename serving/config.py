"""How a model is served: resources, scaling, batching, limits. Validated plain data (travels to replicas)."""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from actors.errors import ResourceSpecError
from actors.resources import Resources
from storage import ArtifactRef, StoreConfig

log = logging.getLogger(__name__)
_APP = re.compile(r"[a-z][a-z0-9-]{0,47}")
_SERVE_METRICS_INTERVAL_S = 10.0  # Serve's default; it warns whenever the field is set to anything else
USER_CODE_THREAD_ENV = "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"
BATCHING_MODES = ("continuous", "request", "none")  # the decoding engine's modes (serving.batcher)


class ServingError(Exception):
    """Base of every error raised by `serving`."""


class RolloutRefused(ServingError):
    """A new version was not put in service; whatever served before keeps serving."""


@dataclass(frozen=True)
class ServeConfig:
    app_name: str = "digits"
    host: str = "127.0.0.1"
    port: int = 8000
    # replicas are pinned like stages, with the same CPU fallback
    num_cpus: float = 0.25
    num_gpus: float = 0.0
    accelerator_type: str | None = None
    fallback: str | None = None
    # scaling: a fixed count when min == max, else Serve autoscaling on ongoing requests. The delays and
    # windows are Serve's own defaults, which react to a change of load in tens of seconds and scale down
    # after 10 minutes. metrics_interval_s is how often replicas and routers push their counts to Serve's
    # controller (deprecated in Serve's config in favour of environment variables, but what 2.60 uses).
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    look_back_period_s: float = 30.0
    metrics_interval_s: float = _SERVE_METRICS_INTERVAL_S
    # overload: a replica holds max_ongoing_requests (slots well above the batch size keep batches full), Serve's
    # router queues max_queued_requests more and answers 503 to the rest at once. Requests should wait in the
    # replica, not the router: 2 routing tasks per replica poll a full replica with exponential backoff (Serve's
    # default 25 ms doubling up to 0.5 s) and hand out the oldest request first without resetting their own
    # backoff, so a deep router queue reaches the replica about one request per sleep. With 128 queued, a replica
    # serving ~250 req/s got 4 req/s under overload and accepted requests waited 10 s or more. A capped backoff
    # refills a freed slot within ~20 ms, far sooner than a full replica drains.
    # The queue limit must still be at least the replicas' capacity: Serve 2.60 counts a request as queued from
    # the moment its router (in the HTTP proxy) receives it until a routing task has handed it to a replica,
    # whether or not any replica is full (router.py: wrap_queued_request around _choose_replica_for_request; a
    # direct-ingress replica counts from admission to its slot). Clients whose answers leave one batch together
    # come back together, so all of them sit in that window at once: with a fixed 8, 16 closed-loop clients
    # against a replica with 64 slots got 503s (1-6 in 5 s here, 31 with 32 clients). None sizes the limit to
    # max_ongoing_requests x max_replicas, so concurrency up to the deployment's capacity is never refused.
    max_ongoing_requests: int = 64
    max_queued_requests: int | None = None
    router_initial_backoff_s: float = 0.005
    router_max_backoff_s: float = 0.02
    # dynamic batching (max_batch_size=1 turns it off). With no wait a batch is whatever queued while the
    # previous batch ran: a lone request at low load goes straight to the model, and batches grow on their
    # own as load rises. A positive wait holds every batch open that long for more requests (it can help a
    # model whose cost per batch barely grows with its size, at the price of latency at low load).
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.0
    # generators (serving.generate_app): how the decoding engine batches sequences (serving.batcher:
    # continuous, request or none; max_batch_size caps the sequences decoded together), the request limits,
    # and the deadline schedule the fluidity index and goodput are scored against (docs/serving.md)
    generation_batching: str = "continuous"
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512
    max_stop_strings: int = 4
    max_stop_chars: int = 64
    target_ttft_s: float = 1.0
    target_tbt_s: float = 0.1
    # request limits
    max_body_bytes: int = 1 << 20
    max_rows: int = 1024
    canary_share: float = 0.0
    # Serve runs a replica's user code on an event loop of its own by default, so that code which blocks its
    # loop cannot stall the replica's control plane (health checks, the routers' queue-length probes).
    # ModelServer never blocks its loop (forward passes over INLINE_FORWARD_S go to a worker thread), so it
    # runs on the replica's main loop and skips two cross-thread hand-offs per request. Measured side by side
    # (BENCHMARKS.md): 1.4x the requests at saturation for a model whose forward pass is ~free through direct
    # ingress, but 0.76-0.96x for a 34M-parameter model with batching; True restores Serve's thread.
    separate_user_code_thread: bool = False
    # replica lifecycle (Ray Serve's defaults): a stopping replica re-checks for in-flight requests every
    # graceful_shutdown_wait_loop_s and is killed after graceful_shutdown_timeout_s; a version whose
    # replicas fail to construct max_constructor_retry_count times (at most 3 per replica) is refused
    graceful_shutdown_wait_loop_s: float = 2.0
    graceful_shutdown_timeout_s: float = 20.0
    max_constructor_retry_count: int = 20

    def __post_init__(self) -> None:
        if not _APP.fullmatch(self.app_name):
            raise ServingError(f"app_name {self.app_name!r}: use 1-48 lowercase letters, digits or '-'")
        # (holds, the rule that says how to fix it)
        checks = {
            "port": (0 < self.port < 65536, "1..65535"),
            "min_replicas": (0 < self.min_replicas <= self.max_replicas, "1 <= min_replicas <= max_replicas"),
            "target_ongoing_requests": (self.target_ongoing_requests > 0, "> 0"),
            "upscale_delay_s": (self.upscale_delay_s >= 0, ">= 0"),
            "downscale_delay_s": (self.downscale_delay_s >= 0, ">= 0"),
            "metrics_interval_s": (self.metrics_interval_s > 0, "> 0"),
            # Serve averages the pushed counts over this window: it needs more than one push in it
            "look_back_period_s": (self.look_back_period_s > self.metrics_interval_s, "> metrics_interval_s"),
            "max_ongoing_requests": (self.max_ongoing_requests >= 1, ">= 1"),
            "max_queued_requests": (
                self.max_queued_requests is None or self.max_queued_requests == -1 or self.max_queued_requests >= 1,
                ">= 1, -1 for no limit, or None for max_ongoing_requests x max_replicas",
            ),
            "router_initial_backoff_s": (
                0 < self.router_initial_backoff_s <= self.router_max_backoff_s,
                "0 < router_initial_backoff_s <= router_max_backoff_s",
            ),
            "router_max_backoff_s": (0 < self.router_max_backoff_s <= 10, "in (0, 10]"),
            "max_batch_size": (self.max_batch_size >= 1, ">= 1 (1 turns batching off)"),
            "batch_wait_timeout_s": (0 <= self.batch_wait_timeout_s <= 10, "in [0, 10]"),
            "generation_batching": (self.generation_batching in BATCHING_MODES, f"one of {', '.join(BATCHING_MODES)}"),
            "max_prompt_tokens": (self.max_prompt_tokens >= 1, ">= 1"),
            "max_new_tokens": (self.max_new_tokens >= 1, ">= 1"),
            "max_stop_strings": (self.max_stop_strings >= 0, ">= 0"),
            "max_stop_chars": (self.max_stop_chars >= 1, ">= 1"),
            "target_ttft_s": (0 < self.target_ttft_s < 3600, "in (0, 3600) seconds"),
            "target_tbt_s": (0 < self.target_tbt_s < 3600, "in (0, 3600) seconds"),
            "max_body_bytes": (self.max_body_bytes >= 1024, ">= 1024"),
            "max_rows": (self.max_rows >= 1, ">= 1"),
            "canary_share": (0.0 <= self.canary_share < 1.0, "in [0, 1): promote a canary to give it everything"),
            "graceful_shutdown_wait_loop_s": (0 < self.graceful_shutdown_wait_loop_s <= 60, "in (0, 60]"),
            "graceful_shutdown_timeout_s": (self.graceful_shutdown_timeout_s >= 0, ">= 0"),
            "max_constructor_retry_count": (self.max_constructor_retry_count >= 1, ">= 1"),
        }
        bad = {k: rule for k, (ok, rule) in checks.items() if not ok}
        if bad:
            problems = "; ".join(f"{k}={getattr(self, k)!r} (must be {rule})" for k, rule in bad.items())
            raise ServingError(f"invalid serving settings: {problems}")
        if self.max_batch_size > self.max_ongoing_requests:
            log.warning(
                "max_batch_size=%d can never fill with max_ongoing_requests=%d: every batch waits the full "
                "batch_wait_timeout_s; raise max_ongoing_requests (2x the batch size is a good start)",
                self.max_batch_size,
                self.max_ongoing_requests,
            )
        if 0 < self.queue_limit < self.max_ongoing_requests * self.max_replicas:
            log.warning(
                "max_queued_requests=%d is below the replicas' capacity (%d): Serve counts every request its router "
                "has not yet handed to a replica, so more than %d clients arriving together can get 503 while slots "
                "are free; leave max_queued_requests unset to size it from the capacity",
                self.queue_limit,
                self.max_ongoing_requests * self.max_replicas,
                self.queue_limit,
            )
        try:
            self.resources()
        except ResourceSpecError as exc:
            raise ServingError(f"replica resources: {exc}") from None

    @property
    def queue_limit(self) -> int:
        """Serve's max_queued_requests: as set, else the capacity of the most replicas this config runs."""
        if self.max_queued_requests is not None:
            return self.max_queued_requests
        return self.max_ongoing_requests * self.max_replicas

    @property
    def route_prefix(self) -> str:
        return f"/{self.app_name}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.route_prefix}"

    def resources(self) -> Resources:
        return Resources(
            cpus=self.num_cpus, gpus=self.num_gpus, accelerator_type=self.accelerator_type, fallback=self.fallback
        )

    def deployment_options(self, ray_actor_options: dict[str, Any]) -> dict[str, Any]:
        """Options for `Deployment.options(...)`."""
        actor = dict(ray_actor_options)
        if not self.separate_user_code_thread:  # read by Serve when the replica's process starts
            runtime_env = dict(actor.get("runtime_env") or {})
            runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), USER_CODE_THREAD_ENV: "0"}
            actor["runtime_env"] = runtime_env
        opts: dict[str, Any] = {
            "ray_actor_options": actor,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.queue_limit,
            "request_router_config": {
                "initial_backoff_s": self.router_initial_backoff_s,
                "backoff_multiplier": 2,
                "max_backoff_s": self.router_max_backoff_s,
            },
            "graceful_shutdown_wait_loop_s": self.graceful_shutdown_wait_loop_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "max_constructor_retry_count": self.max_constructor_retry_count,
        }
        if self.max_replicas > self.min_replicas:
            opts["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
                "look_back_period_s": self.look_back_period_s,
            }
            if self.metrics_interval_s != _SERVE_METRICS_INTERVAL_S:
                opts["autoscaling_config"]["metrics_interval_s"] = self.metrics_interval_s
        else:
            opts["num_replicas"] = self.min_replicas
        return opts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ModelSource:
    """Where a replica loads verified weights from: a store artifact or a registered MLflow version."""

    digest: str
    version: str = ""  # registered model version, when known
    model_name: str = ""
    artifact: ArtifactRef | None = None
    store_config: StoreConfig | None = None
    tracking_uri: str = ""
    lineage: dict[str, str] = field(default_factory=dict)
    task: str = ""  # the bundle's task when known (it picks the Serve app); "" = read it from the bundle

    def __post_init__(self) -> None:
        if self.artifact is None and not (self.model_name and self.version and self.tracking_uri):
            raise ServingError("a model source needs a store artifact or an MLflow model name, version and URI")

    @property
    def label(self) -> str:
        return f"{self.model_name} v{self.version}" if self.version else f"artifact {self.digest[:12]}"
