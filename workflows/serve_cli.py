"""`tierflow serve deploy | status | promote | rollback | build`."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from serving.config import ServeConfig, ServingError

# ServeConfig fields that are also flags (--num-gpus 0.5 ...), with the type argparse parses them as
_SETTINGS: dict[str, type] = {
    "num_cpus": float,
    "num_gpus": float,
    "accelerator_type": str,
    "fallback": str,
    "min_replicas": int,
    "max_replicas": int,
    "target_ongoing_requests": float,
    "upscale_delay_s": float,
    "downscale_delay_s": float,
    "look_back_period_s": float,
    "metrics_interval_s": float,
    "max_batch_size": int,
    "batch_wait_timeout_s": float,
    "max_ongoing_requests": int,
    "max_queued_requests": int,
    "router_max_backoff_s": float,
    "max_body_bytes": int,
    # generators (serving.generate_app)
    "generation_batching": str,
    "max_prompt_tokens": int,
    "max_new_tokens": int,
    "target_ttft_s": float,
    "target_tbt_s": float,
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    serve_p = sub.add_parser("serve", help="deploy and manage model endpoints on Ray Serve")
    ops = serve_p.add_subparsers(dest="serve_command", required=True)
    deploy = ops.add_parser("deploy", help="roll out a registered model version (blue/green, optional canary)")
    deploy.add_argument("model_uri", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    deploy.add_argument("--canary-share", type=float, default=0.0, help="send this share to the new version")
    status = ops.add_parser("status", help="what is serving, canary, history, and the replica's request statistics")
    status.add_argument(
        "--log-mlflow",
        action="store_true",
        help="also record the request statistics in MLflow (experiment tierflow-serving)",
    )
    ops.add_parser("promote", help="make the canary the stable version")
    ops.add_parser("rollback", help="drop the canary, or go back to the previous stable version")
    build = ops.add_parser("build", help="write a Serve config YAML for `serve run` / `serve deploy`")
    build.add_argument("model_uri")
    build.add_argument("-o", "--output", type=Path, default=Path("serve_config.yaml"))
    for p in ops.choices.values():
        p.add_argument(
            "--app",
            help="application name (route /APP); default: deploy/build name it after the model "
            "(models:/breast-cancer/1 -> breast-cancer), the other commands use the one app the store knows",
        )
        p.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless you mean it)")
        p.add_argument("--port", type=int, default=8000)
        p.add_argument("--address", help="Ray cluster (default: $RAY_ADDRESS)")
        p.add_argument("--store", help="tier URLs or a .toml file (rollout state lives on the durable tier)")
        p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
        for name, kind in _SETTINGS.items():
            p.add_argument(f"--{name.replace('_', '-')}", type=kind)


def _config(args: argparse.Namespace) -> ServeConfig:
    extra = {k: getattr(args, k) for k in _SETTINGS if getattr(args, k) is not None}
    return ServeConfig(app_name=args.app, host=args.host, port=args.port, **extra)


def app_for_model(model_uri: str) -> str:
    """The application a registered model is served as by default: its name, as a route segment."""
    name = model_uri.removeprefix("models:/").split("/")[0].split("@")[0]
    app = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:48].rstrip("-")
    if not app or not app[0].isalpha():
        raise ServingError(f"cannot name an application after {model_uri!r}; pass --app NAME")
    return app


def _default_app(args: argparse.Namespace) -> str:
    """deploy/build: the app already serving this model (a new version replaces it), else one named after
    it; the other commands: the one app the store knows."""
    from serving.rollout import STATE  # noqa: PLC0415
    from storage import ArtifactStore, StoreConfig  # noqa: PLC0415

    store = ArtifactStore(StoreConfig.resolve(args.store))
    apps = sorted({parts[1] for parts in store.list_documents(STATE, "state")})
    if args.serve_command in ("deploy", "build"):
        name = args.model_uri.removeprefix("models:/").split("/")[0].split("@")[0]
        serving = [
            a for a in apps if ((store.get_document((STATE, a, "state")).get("stable") or {}).get("model_name")) == name
        ]
        return serving[0] if len(serving) == 1 else app_for_model(args.model_uri)
    if len(apps) != 1:
        known = f"the store knows {', '.join(apps)}" if apps else "nothing was deployed from this store"
        raise ServingError(f"which application? {known}; pass --app NAME")
    return apps[0]


def run(args: argparse.Namespace, console: Console) -> int:
    from storage import StoreConfig  # noqa: PLC0415
    from workflows.lineage import default_tracking_uri  # noqa: PLC0415

    if args.app is None:
        args.app = _default_app(args)
    config = _config(args)
    tracking_uri = args.tracking_uri or default_tracking_uri()
    if args.serve_command == "build":
        _build(args, config, tracking_uri, console)
        return 0
    from actors.ray_api import connect  # noqa: PLC0415
    from serving.loading import registry_source  # noqa: PLC0415
    from serving.rollout import Rollout  # noqa: PLC0415

    connect(args.address)
    rollout = Rollout(StoreConfig.resolve(args.store), config)
    if args.serve_command == "deploy":
        url = rollout.deploy(registry_source(args.model_uri, tracking_uri), canary_share=args.canary_share)
        console.print(
            f"serving {args.model_uri} at {url}" + (f" (canary {args.canary_share:.0%})" if args.canary_share else "")
        )
    elif args.serve_command == "promote":
        console.print(f"canary promoted; serving at {rollout.promote()}")
    elif args.serve_command == "rollback":
        back = rollout.rollback()
        console.print(f"rolled back to {back['model_name']} v{back['version']} ({back['digest'][:12]})")
    else:
        status = _status(rollout)
        if args.log_mlflow:
            numbers = metrics_to_log(status)
            if numbers:
                status["mlflow_run_id"] = rollout.log_stats(tracking_uri, numbers)
        console.print_json(json.dumps(status, default=str))
    return 0


_NOT_METRICS = ("endpoints", "errors", "error")


def metrics_to_log(status: dict[str, Any]) -> dict[str, Any]:
    """`serve status` flattened for MLflow: the replica's stats, `engine_*` (a generator's decoding engine),
    `deployment_*` (the whole app, from Prometheus) and `generation_*` (what the status shows for streams)."""
    numbers = {} if "error" in status["stats"] else dict(status["stats"])
    numbers |= {f"engine_{k}": v for k, v in numbers.pop("engine", {}).items()}
    numbers |= {f"deployment_{k}": v for k, v in status["deployment"].items() if k not in _NOT_METRICS}
    numbers |= {f"generation_{k}": v for k, v in status.get("generation", {}).items()}
    return numbers


def _status(rollout: Any) -> dict[str, Any]:
    """Rollout state, the answering replica's `/stats`, and the whole app's metrics from Ray's endpoints."""
    import urllib.request  # noqa: PLC0415

    from actors.ray_api import cluster_nodes  # noqa: PLC0415
    from serving.metrics import deployment_metrics, generation_status  # noqa: PLC0415

    status = rollout.status()
    status["deployment"] = deployment_metrics(rollout.app, cluster_nodes())
    try:
        with urllib.request.urlopen(f"{status['url']}/stats", timeout=5) as resp:  # noqa: S310  # our loopback URL
            status["stats"] = json.loads(resp.read())
    except OSError as exc:
        status["stats"] = {"error": str(exc)}
    if generation := generation_status(status["stats"], status["deployment"]):  # TTFT, TBT, fluidity, tokens/s
        status["generation"] = generation
    return status


def _build(args: argparse.Namespace, config: ServeConfig, tracking_uri: str, console: Console) -> None:
    """A Serve config whose application is built by `serving.rollout:build_app` from the registry version."""
    app_args = {k: v for k, v in config.to_dict().items() if k not in ("host", "port", "canary_share")}
    doc = {
        "proxy_location": "EveryNode",
        "http_options": {"host": config.host, "port": config.port},
        "applications": [
            {
                "name": config.app_name,
                "route_prefix": config.route_prefix,
                "import_path": "serving.rollout:build_app",
                "args": {"model_uri": args.model_uri, "tracking_uri": tracking_uri, **app_args},
            }
        ],
    }
    args.output.write_text(yaml.safe_dump(doc, sort_keys=False))
    console.print(f"wrote {args.output}; run it with: serve run {args.output}  (or serve deploy {args.output})")
