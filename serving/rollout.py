"""Versioned rollout on Ray Serve: blue/green with an optional canary, refusals, rollback.

A new version is first started as its own application without a route and must load, pass health
checks and answer a smoke prediction; only then does the public application switch to it (or send
it a canary share). If anything fails, the candidate is removed and the old version keeps serving.
The history lives on the durable tier (`serving/<app>/state.json`) so status and rollback work from
any driver.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from typing import Any

import ray
from ray import serve
from ray.serve.schema import ApplicationStatus

from serving.config import ModelSource, RolloutRefused, ServeConfig, ServingError
from serving.placement import replica_options
from storage import ArtifactNotFoundError, ArtifactRef, ArtifactStore, StoreConfig

STATE = "serving"
# Serve's blocking run/delete re-check once a second; rollouts wait on status at this interval instead
_POLL_S = 0.1
_WAIT_S = 300.0
# A candidate has no route and its only requests are the smoke calls, awaited before it is deleted:
# nothing to drain, so its replica need not sleep Serve's 2 s drain loop before exiting.
_CANDIDATE_DRAIN_LOOP_S = 0.1
_REPLICA_TARGET = "SERVE_REPLICA::"  # Serve's replica actor names; proxy targets are SERVE_PROXY_ACTOR-...
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")  # noqa: S104  # names, not binds: such a replica is reached by node IP


def _candidate(app: str) -> str:
    return f"{app}-candidate"


def _canary(app: str) -> str:
    return f"{app}-canary"


class Rollout:
    def __init__(self, store_config: StoreConfig, config: ServeConfig) -> None:
        self.store = ArtifactStore(store_config)
        self.config = config
        self.app = config.app_name
        self.replica_options: dict[str, Any] = {}  # what the last deploy placed its replicas with

    # -- state -----------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        try:
            return self.store.get_document((STATE, self.app, "state"))
        except ArtifactNotFoundError:
            return {"app": self.app, "stable": None, "canary": None, "history": []}

    def _save(self, state: dict[str, Any]) -> None:
        self.store.put_document((STATE, self.app, "state"), state)

    # -- operations ------------------------------------------------------------------------------
    def deploy(self, source: ModelSource, *, canary_share: float | None = None) -> str:
        """Put `source` in service (or behind a canary share). Raise RolloutRefused and keep the old on failure."""
        share = self.config.canary_share if canary_share is None else canary_share
        try:  # which app serves it (its task); a bundle that cannot be read is refused like an unhealthy one
            source = with_task(source)
        except Exception as exc:
            raise _refused(source, exc) from exc
        serve.start(http_options={"host": self.config.host, "port": self.config.port})
        state = self.state()
        actor_opts = self.replica_options = replica_options(self.config)
        target = _canary(self.app) if share > 0 and state["stable"] else _candidate(self.app)
        self._start_checked(target, source, actor_opts)
        entry = _entry(source, role="canary" if target == _canary(self.app) else "stable", share=share)
        if target == _canary(self.app):
            stable = _source(state["stable"], self.store.config)
            cfg = _with(self.config, canary_share=share)
            _run(
                bind_for(stable, cfg, actor_opts, _canary(self.app)),
                name=self.app,
                route_prefix=self.config.route_prefix,
            )
            state["canary"] = entry
        else:
            _run(
                bind_for(source, _with(self.config, canary_share=0.0), actor_opts),
                name=self.app,
                route_prefix=self.config.route_prefix,
            )
            _delete(_candidate(self.app))
            self._drop_canary(state)
            state["stable"] = entry
        state["history"].append(entry)
        self._save(state)
        return self.config.url

    def promote(self) -> str:
        """The canary becomes the stable version."""
        state = self.state()
        if not state["canary"]:
            raise ServingError(f"app {self.app!r} has no canary to promote")
        source = _source(state["canary"], self.store.config)
        _run(
            bind_for(source, _with(self.config, canary_share=0.0), replica_options(self.config)),
            name=self.app,
            route_prefix=self.config.route_prefix,
        )
        promoted = {**state["canary"], "role": "stable", "share": 0.0, "deployed_at": time.time()}
        self._drop_canary(state)
        state["stable"] = promoted
        state["history"].append(state["stable"])
        self._save(state)
        return self.config.url

    def rollback(self) -> dict[str, Any]:
        """Drop a canary if there is one; otherwise go back to the stable version before the current one."""
        state = self.state()
        if state["canary"]:
            _run(
                bind_for(
                    _source(state["stable"], self.store.config),
                    _with(self.config, canary_share=0.0),
                    replica_options(self.config),
                ),
                name=self.app,
                route_prefix=self.config.route_prefix,
            )
            self._drop_canary(state)
            self._save(state)
            return state["stable"]
        stables = [h for h in state["history"] if h["role"] == "stable"]
        current = state["stable"]
        previous = next((h for h in reversed(stables) if current and h["digest"] != current["digest"]), None)
        if previous is None:
            raise ServingError(f"app {self.app!r} has no earlier version to roll back to")
        self.deploy(_source(previous, self.store.config), canary_share=0.0)
        return previous

    def status(self) -> dict[str, Any]:
        state = self.state()
        apps = serve.status().applications
        live = {
            name: getattr(a.status, "value", str(a.status)) for name, a in apps.items() if name.startswith(self.app)
        }
        return {
            "app": self.app,
            "url": self.config.url,
            "applications": live,
            "direct_urls": self.direct_urls(),
            "stable": state["stable"],
            "canary": state["canary"],
            "versions": len(state["history"]),
        }

    def direct_urls(self) -> list[str]:
        return direct_urls(self.app, self.config.host)

    def log_stats(self, tracking_uri: str, stats: dict[str, Any]) -> str:
        """Record the endpoint's request statistics in MLflow: one run per app in `tierflow-serving`, one step
        per call. Keys as given (`tierflow serve status` logs a replica's `/stats` and `deployment_*`)."""
        from mlflow import MlflowClient  # noqa: PLC0415
        from mlflow.entities import Metric  # noqa: PLC0415

        client = MlflowClient(tracking_uri)
        exp = client.get_experiment_by_name("tierflow-serving")
        exp_id = exp.experiment_id if exp else client.create_experiment("tierflow-serving")
        found = client.search_runs([exp_id], f"tags.`tierflow.app` = '{self.app}'", max_results=1)
        run_id = found[0].info.run_id if found else client.create_run(exp_id, run_name=f"serve-{self.app}").info.run_id
        stable = self.state()["stable"] or {}
        for key, value in {
            "tierflow.app": self.app,
            "tierflow.model_name": stable.get("model_name", ""),
            "tierflow.model_version": stable.get("version", ""),
            "tierflow.model_digest": stable.get("digest", ""),
        }.items():
            client.set_tag(run_id, key, value)
        now = int(time.time() * 1000)
        counted = "requests" if "requests" in stats else "deployment_requests"
        step = len(client.get_metric_history(run_id, counted))
        numeric = {k: float(v) for k, v in stats.items() if isinstance(v, int | float)}
        client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in numeric.items()])
        return run_id

    def shutdown(self) -> None:
        for name in (self.app, _canary(self.app), _candidate(self.app)):
            _delete(name)

    # -- helpers ---------------------------------------------------------------------------------
    def _start_checked(self, name: str, source: ModelSource, actor_opts: dict[str, Any]) -> None:
        cfg = _with(self.config, canary_share=0.0)
        if name == _candidate(self.app):
            loop = min(cfg.graceful_shutdown_wait_loop_s, _CANDIDATE_DRAIN_LOOP_S)
            cfg = _with(cfg, graceful_shutdown_wait_loop_s=loop)
        try:
            handle = _run(bind_for(source, cfg, actor_opts), name=name, route_prefix=None)
            # the model's own example (a row, or a prompt for a generator), answered with finite outputs
            handle.smoke_check.remote().result(timeout_s=60)
        except Exception as exc:
            _delete(name)
            raise _refused(source, exc) from exc

    def _drop_canary(self, state: dict[str, Any]) -> None:
        _delete(_canary(self.app))
        state["canary"] = None


def direct_urls(app: str, host: str = "127.0.0.1") -> list[str]:
    """Base URLs of `app`'s ingress replicas when Serve runs with direct ingress; [] when it does not.

    With `RAY_SERVE_ENABLE_DIRECT_INGRESS=1` in the environment Ray's processes start in, every ingress
    replica also serves HTTP on a port of its own (30000-31000, on the proxy's host), which skips the proxy
    and the two Ray calls it makes per request (see BENCHMARKS.md). The ports change whenever a rollout
    replaces replicas. Serve 2.60 publishes them only through its controller's `get_target_groups`, the call
    its own HAProxy integration reads, so this asks there.
    """
    controller = serve.context._get_global_client()._controller  # no public accessor in 2.60
    groups = ray.get(controller.get_target_groups.remote(app), timeout=30)
    return [
        f"http://{t.ip if host in _WILDCARD_HOSTS else host}:{t.port}{g.route_prefix.rstrip('/')}"
        for g in groups
        if g.app_name == app and g.protocol == "HTTP"
        for t in g.targets
        if t.name.startswith(_REPLICA_TARGET)
    ]


def _run(app: Any, *, name: str, route_prefix: str | None) -> Any:
    """`serve.run`, waiting for RUNNING (or raising on DEPLOY_FAILED) with a finer status poll."""
    handle = serve.run_many(
        [serve.RunTarget(app, name=name, route_prefix=route_prefix)], wait_for_applications_running=False
    )[0]
    wait_running(name)
    return handle


def wait_running(name: str, timeout_s: float = _WAIT_S) -> None:
    """Return once application `name` is RUNNING; raise if it failed to deploy or is still deploying."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = serve.status().applications.get(name)
        status = getattr(found, "status", None)
        if status == ApplicationStatus.RUNNING:
            return
        if status in (ApplicationStatus.DEPLOY_FAILED, None):
            message = found.message if found else "the application disappeared"
            raise RuntimeError(f"Deploying application {name} failed: {message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"application {name} is still {status} after {timeout_s:.0f}s")
        time.sleep(_POLL_S)


def _delete(name: str) -> None:
    """`serve.delete`, returning once the application (and its replicas) are gone."""
    serve.delete(name, _blocking=False)
    deadline = time.monotonic() + _WAIT_S
    while name in serve.status().applications:
        if time.monotonic() > deadline:
            raise TimeoutError(f"application {name} was not deleted after {_WAIT_S:.0f}s")
        time.sleep(_POLL_S)


def bind_for(source: ModelSource, config: ServeConfig, actor_opts: dict[str, Any], canary: str | None = None) -> Any:
    """The Serve app for `source`'s task: a generator gets the streaming app (serving.generate_app), any
    other model the prediction app (serving.app). FastAPI apps are imported only where Serve is used."""
    if with_task(source).task == "generator":
        from serving.generate_app import bind  # noqa: PLC0415
    else:
        from serving.app import bind  # noqa: PLC0415
    return bind(source, config, actor_opts, canary)


def build_app(args: dict[str, Any]) -> Any:
    """Serve application builder: `import_path: serving.rollout:build_app` in a Serve config (`serve run`).

    Here rather than in serving.app so that the app modules never import the rollout (no import cycle)."""
    from serving.loading import registry_source  # noqa: PLC0415

    args = dict(args)
    source = registry_source(args.pop("model_uri"), args.pop("tracking_uri"))
    explicit = args.pop("ray_actor_options", None)
    config = ServeConfig(**args)
    # placed as a rollout places it (declared resources, else the CPU fallback), against the nodes of the
    # cluster `serve run` / `serve deploy` builds on, unless the config spells out ray_actor_options itself
    return bind_for(source, config, explicit if explicit is not None else replica_options(config))


def with_task(source: ModelSource) -> ModelSource:
    """`source` with its bundle's task filled in (read from the bundle's metadata when not yet known)."""
    if source.task:
        return source
    from serving.contract import spec_of  # noqa: PLC0415
    from serving.loading import load_bundle  # noqa: PLC0415

    return replace(source, task=spec_of(load_bundle(source)).task)


def _refused(source: ModelSource, exc: Exception) -> RolloutRefused:
    return RolloutRefused(
        f"{source.label} did not become healthy ({type(exc).__name__}: {exc}); the current version keeps serving"
    )


def _with(config: ServeConfig, **changes: Any) -> ServeConfig:
    return ServeConfig(**{**config.to_dict(), **changes})


def _entry(source: ModelSource, *, role: str, share: float) -> dict[str, Any]:
    return {
        "role": role,
        "share": share,
        "deployed_at": time.time(),
        "digest": source.digest,
        "version": source.version,
        "model_name": source.model_name,
        "tracking_uri": source.tracking_uri,
        "artifact": asdict(source.artifact) if source.artifact else None,  # loaded via this store's tiers
        "lineage": source.lineage,
        "task": source.task,
    }


def _source(entry: dict[str, Any] | None, store: StoreConfig) -> ModelSource:
    # Tier settings (which may hold credentials) are never written into the state: use the current ones.
    if entry is None:
        raise ServingError("nothing is deployed yet")
    return ModelSource(
        digest=entry["digest"],
        version=entry["version"],
        model_name=entry["model_name"],
        artifact=ArtifactRef(**entry["artifact"]) if entry.get("artifact") else None,
        store_config=store,
        tracking_uri=entry["tracking_uri"],
        lineage=entry.get("lineage", {}),
        task=entry.get("task", ""),
    )
