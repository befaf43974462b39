"""`tierflow` / `python -m workflows`: run and validate workflows.

Exit codes: 0 success, 1 a stage failed, 2 the workflow or its request is invalid (nothing ran),
130 cancelled.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from rich.console import Console

from serving.config import ServingError
from storage import StorageError, StoreConfig, validate_name
from workflows import plan_cli, serve_cli, store_cli
from workflows.errors import StageFailedError, TierflowError, ValidationError
from workflows.hooks import RunInfo, StageRecord
from workflows.loader import BUILTINS, load_workflow
from workflows.model import Workflow
from workflows.node_wait import DEFAULT_NODE_WAIT_S
from workflows.progress import ProgressHook

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_CANCELLED = 0, 1, 2, 130

# Wide enough off a terminal (CI logs, `ray job logs`) that run ids and tables are not cut.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def _parse_param(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param {text!r}: expected KEY=VALUE, e.g. train.epochs=5")
    try:
        value = json.loads(raw)  # numbers, booleans, lists; anything else stays a string
    except json.JSONDecodeError:
        value = raw
    return key, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tierflow", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("workflow", help=f"built-in ({', '.join(BUILTINS)}), file.py:obj or module:obj")
        sp.add_argument(
            "-p",
            "--param",
            action="append",
            type=_parse_param,
            default=[],
            metavar="KEY=VALUE",
            help="stage parameter: stage.param=value or param=value (repeatable)",
        )
        sp.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS, else start a local Ray)")

    run = sub.add_parser("run", help="run a workflow")
    common(run)
    run.add_argument(
        "--store",
        help="comma-separated tier URLs, fastest first; last is durable "
        "(default: $TIERFLOW_STORE, else memory://tierflow,./.tierflow/store)",
    )
    run.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    run.add_argument("--run-id", help="name this run (letters, digits, . _ -)")
    run.add_argument("--no-cache", action="store_true", help="run every stage even if a verified output exists")
    run.add_argument(
        "--no-streaming",
        action="store_true",
        help="barrier mode: run each streaming stage to completion before its consumer starts",
    )
    run.add_argument(
        "--rerun",
        action="append",
        default=[],
        metavar="STAGE",
        help="skip the cache for STAGE and everything downstream of it (repeatable)",
    )
    run.add_argument(
        "--resume", metavar="RUN_ID", help="continue a run whose driver stopped; committed stages are not run again"
    )
    run.add_argument("--serve", action="store_true", help="keep deployed endpoints up until Ctrl-C")
    run.add_argument("--num-cpus", type=float, help="CPUs of a locally started Ray (default: all)")
    run.add_argument("--num-gpus", type=float, help="GPUs of a locally started Ray (default: detected)")
    run.add_argument("--json", action="store_true", help="print the run summary as JSON")
    run.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="stream Ray, Serve and MLflow logs to the terminal too (they always go to the run's log file)",
    )
    run.add_argument(
        "--placement-timeout-s",
        type=float,
        default=60.0,
        help="fail a stage whose actor Ray has not placed after this long with nothing else of the run running "
        "(default: 60; a stage waiting for a node the autoscaler launches is bounded by --node-wait-s instead)",
    )
    run.add_argument(
        "--node-wait-s",
        type=float,
        default=DEFAULT_NODE_WAIT_S,
        help="fail a stage that waited this long for a node the autoscaler has to launch for it "
        f"(default: {DEFAULT_NODE_WAIT_S:g})",
    )
    run.add_argument(
        "--cluster-yaml",
        type=Path,
        help="the cluster's config (e.g. ~/ray_bootstrap_config.yaml on a `ray up` head): the node types the "
        "autoscaler can launch, when the cluster does not publish them itself",
    )

    val = sub.add_parser("validate", help="check a workflow without running anything")
    common(val)
    val.add_argument(
        "--cluster-yaml",
        type=Path,
        help="check resources against this cluster.yaml's node types instead of the connected cluster",
    )

    sub.add_parser("list", help="list built-in workflows")
    init = sub.add_parser("init", help="write a starter workflow NAME.py, its test and a tierflow.toml")
    init.add_argument("name", help="the workflow's module name, e.g. churn_model")
    init.add_argument("--dir", type=Path, default=Path("."), help="where to write the files (default: here)")
    doctor = sub.add_parser("doctor", help="check what a first run needs and say how to fix what is not right")
    doctor.add_argument("--address", help="Ray cluster to check (default: $RAY_ADDRESS, else none: a local Ray)")
    doctor.add_argument("--store", help="tier URLs (default: $TIERFLOW_STORE, else ./tierflow.toml, else defaults)")
    doctor.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    runs = sub.add_parser("runs", help="list runs recorded in the store")
    show = sub.add_parser("show", help="show one run's stages: state, attempts, cache, node, device, duration")
    show.add_argument("run_id")
    show.add_argument("--logs", action="store_true", help="print the run's log file (Ray, Serve, MLflow output)")
    store_cli.add_parser(sub)
    serve_cli.add_parser(sub)
    plan_cli.add_parsers(sub, common)
    for sp in (runs, show):
        sp.add_argument("--store", help="tier URLs (default: $TIERFLOW_STORE, else ./.tierflow/store)")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "list":
        for name, target in BUILTINS.items():
            console.print(f"{name}\t{target}")
        return EXIT_OK
    try:
        if args.command == "init":
            from workflows.starter import init  # noqa: PLC0415

            for path in init(args.name, args.dir):
                console.print(f"wrote {path}", markup=False)
            console.print(f"run it: tierflow run {args.dir / args.name}.py:workflow", markup=False, soft_wrap=True)
            return EXIT_OK
        if args.command == "doctor":
            return _doctor(args)
        if args.command == "store":
            return store_cli.run(args, console)
        if args.command == "serve":
            return serve_cli.run(args, console)
        if args.command in ("runs", "show"):
            from workflows.runs import show_run, show_runs  # noqa: PLC0415

            store = StoreConfig.resolve(args.store)
            if args.command == "runs":
                return show_runs(store, console)
            return show_run(store, args.run_id, console, logs=args.logs)
        wf = load_workflow(args.workflow)
        params = dict(args.param)
        if not getattr(args, "resume", None):
            wf.resolve_params(params)  # parameter errors before Ray starts
        if getattr(args, "run_id", None):
            validate_name(args.run_id, "run id")
        if args.command == "validate":
            return _validate(wf, params, args)
        if args.command in ("profile", "plan"):
            return plan_cli.run(args, wf, params, console)
        return _run(wf, params, args)
    except ValidationError as exc:
        console.print(f"[bold red]invalid:[/] {exc}", markup=True)
        return EXIT_INVALID
    except ServingError as exc:
        console.print("[bold red]serving:[/]", end=" ")
        console.print(str(exc), markup=False)
        return EXIT_INVALID
    except StorageError as exc:
        console.print(f"[bold red]storage error:[/] {exc}", markup=True)
        return EXIT_INVALID
    except StageFailedError as exc:
        console.print("[bold red]run failed:[/]", end=" ")
        console.print(str(exc), markup=False)
        return EXIT_FAILED
    except KeyboardInterrupt:
        console.print("cancelled")
        return EXIT_CANCELLED
    except TierflowError as exc:
        console.print(f"[bold red]error:[/] {exc}", markup=True)
        return EXIT_FAILED


def _doctor(args: argparse.Namespace) -> int:
    from workflows.doctor import run_checks  # noqa: PLC0415

    checks = run_checks(args.address, args.store, args.tracking_uri)
    for c in checks:
        mark = "[green]ok[/]  " if c.ok else "[bold red]FAIL[/]"
        console.print(f"{mark} {c.name}: ", end="")
        console.print(c.detail, markup=False, soft_wrap=True)
        if not c.ok and c.fix:
            console.print(f"      fix: {c.fix}", markup=False, soft_wrap=True)
    failed = [c.name for c in checks if not c.ok]
    console.print(
        f"{len(checks) - len(failed)}/{len(checks)} checks passed"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return EXIT_FAILED if failed else EXIT_OK


def _read_cluster_yaml(path: Path) -> tuple[list[Any], list[Any]]:
    """(nodes alive right after `ray up`, launchable node types) of a cluster-launcher config."""
    import yaml  # noqa: PLC0415

    from actors.placement import cluster_from_yaml  # noqa: PLC0415

    try:
        config = yaml.safe_load(path.read_text())
        return cluster_from_yaml(config if isinstance(config, dict) else {})
    except (OSError, yaml.YAMLError, ValueError, TypeError) as exc:
        raise ValidationError(f"--cluster-yaml {path}: {exc}. Fix: name a Ray cluster-launcher config") from None


def _validate(wf: Workflow, params: dict[str, Any], args: argparse.Namespace) -> int:
    from workflows.engine import plan  # noqa: PLC0415

    if args.cluster_yaml:
        nodes, types = _read_cluster_yaml(args.cluster_yaml)
        where = f"{args.cluster_yaml} right after `ray up` (head and min_workers alive)"
    else:
        from actors.ray_api import cluster_nodes, connect, node_types  # noqa: PLC0415

        connect(args.address)
        nodes = cluster_nodes()
        types = node_types(None, nodes)
        where = "the connected cluster"
    decisions = plan(wf, nodes, types)
    for name, d in decisions.items():
        why = f"  ({d.reason})" if d.reason != d.label else ""
        line = f"{name}: {d.requested.describe()} -> {d.effective.describe()}  [{d.label}]{why}"  # type: ignore[union-attr]
        console.print(line, markup=False, soft_wrap=True)  # one line per stage, for grep
    console.print(f"workflow {wf.name!r} is valid on {where}")
    return EXIT_OK


def _run(wf: Workflow, params: dict[str, Any], args: argparse.Namespace) -> int:
    from storage import ArtifactStore  # noqa: PLC0415
    from workflows.engine import new_run_id  # noqa: PLC0415
    from workflows.runlog import RunLog, local_log_path  # noqa: PLC0415

    store = StoreConfig.resolve(args.store)
    args.cluster_types = _read_cluster_yaml(args.cluster_yaml)[1] if args.cluster_yaml else None  # before Ray starts
    if not args.resume:
        _hint_unfinished(wf, store)
    run_id = args.resume or args.run_id or new_run_id()
    if args.run_id and not args.resume:
        from workflows.journal import Journals  # noqa: PLC0415

        if Journals(ArtifactStore(store)).exists(run_id):  # checked here too so its log is not overwritten
            raise ValidationError(f"run id {run_id!r} is taken; continue it with --resume {run_id} or pick another")
    runlog = RunLog(local_log_path(run_id), stream=args.verbose)
    try:
        with runlog as terminal:
            console.file = terminal  # tierflow's lines go to the terminal; everything else to the log file
            return _run_logged(wf, params, args, store, run_id, runlog)
    finally:
        console.file = sys.stdout
        kept = runlog.keep(ArtifactStore(store), run_id)
        if not args.json:
            console.print(
                f"log: {runlog.path}  (kept at {kept}; tierflow show {run_id} --logs)", markup=False, soft_wrap=True
            )


def _run_logged(
    wf: Workflow, params: dict[str, Any], args: argparse.Namespace, store: StoreConfig, run_id: str, runlog: Any
) -> int:
    import ray  # noqa: PLC0415

    from actors.ray_api import connect, read_progress  # noqa: PLC0415
    from workflows.engine import run_workflow  # noqa: PLC0415
    from workflows.lineage import MLflowHook  # noqa: PLC0415
    from workflows.profile import EnergyHook  # noqa: PLC0415

    init_kwargs = {k: v for k, v in (("num_cpus", args.num_cpus), ("num_gpus", args.num_gpus)) if v is not None}
    started_ray = connect(args.address, **init_kwargs)
    mlflow_hook = MLflowHook(args.tracking_uri)
    run: RunInfo | None = None
    try:
        run = run_workflow(
            wf,
            params=params,
            run_id=None if args.resume else run_id,
            store_config=store,
            # EnergyHook after MLflowHook: it logs co2/cost on the runs that one made
            hooks=[ProgressHook(console, progress=read_progress), mlflow_hook, EnergyHook(mlflow_hook)],
            use_cache=not args.no_cache,
            streaming=not args.no_streaming,
            rerun=args.rerun,
            resume=args.resume,
            workflow_ref=args.workflow,
            keep_warm_s=0.0,  # one run per process: nothing to keep warm for
            placement_timeout_s=args.placement_timeout_s,
            node_wait_s=args.node_wait_s,
            cluster_types=args.cluster_types,
        )
        answers = _smoke_requests(run)
        if args.json:
            summary = _summary(run, mlflow_hook, answers) | {"log": str(runlog.path)}
            print(json.dumps(summary, indent=1, default=str), file=console.file)
        else:
            _print_summary(run, mlflow_hook, answers)
        if args.serve and answers:
            console.print("serving; press Ctrl-C to stop")
            while True:
                time.sleep(3600)
        return EXIT_OK
    finally:
        if run is not None and not args.serve:
            _undeploy(run)
        if started_ray:
            ray.shutdown()


def _hint_unfinished(wf: Workflow, store: StoreConfig) -> None:
    from storage import ArtifactStore  # noqa: PLC0415
    from workflows.journal import Journals  # noqa: PLC0415

    for j in Journals(ArtifactStore(store)).unfinished(wf.name):
        done = ", ".join(j.committed()) or "none"
        console.print(
            f"note: run {j.run_id} of {wf.name} stopped before finishing (its driver is gone; "
            f"committed: {done}). Continue it with: tierflow run {j.workflow_ref} --resume {j.run_id}",
            markup=False,
            soft_wrap=True,  # one copyable line
        )


def _endpoints(run: RunInfo) -> list[tuple[StageRecord, dict[str, Any]]]:
    from storage import ArtifactStore  # noqa: PLC0415

    out = []
    store = ArtifactStore(run.store_config)
    for rec in run.records.values():
        if rec.artifact is not None and rec.artifact.format == "json" and rec.status == "succeeded":
            value = store.get(rec.artifact)
            if isinstance(value, dict) and "predict_url" in value:
                out.append((rec, value))
    return out


def _smoke_requests(run: RunInfo) -> list[dict[str, Any]]:
    """Send each deployed endpoint its example request, as a user would (and each direct-ingress replica)."""
    answers = []
    for rec, info in _endpoints(run):
        body = json.dumps(info.get("example", {})).encode()
        answer = {"stage": rec.name, "url": info["predict_url"], "expected": info.get("example_label")}
        answer["response"] = _ask(info["predict_url"], body)
        if direct := info.get("direct_predict_urls"):
            answer["direct"] = [{"url": url, "response": _ask(url, body)} for url in direct]
        answers.append(answer)
    return answers


def _answer(response: dict[str, Any]) -> Any:
    """The part of an endpoint's answer worth a line: a classifier's predictions, a generator's text."""
    return response.get("predictions", response.get("text", response))


def _ask(url: str, body: bytes) -> dict[str, Any]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})  # noqa: S310  # http(s) from our stage
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310  # our own loopback URL
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return {"error": f"HTTP {exc.code}: {exc.read().decode(errors='replace')[:500]}"}
    except (urllib.error.URLError, TimeoutError) as exc:
        return {"error": str(exc)}


def _undeploy(run: RunInfo) -> None:
    apps = [info["app_name"] for _, info in _endpoints(run) if "app_name" in info]
    if apps:
        from ray import serve  # noqa: PLC0415

        for app in apps:
            for name in (app, f"{app}-canary"):
                serve.delete(name)


def _summary(run: RunInfo, hook: Any, answers: list[dict[str, Any]]) -> dict[str, Any]:
    from workflows.summary import mlflow_ui_url  # noqa: PLC0415

    return {
        "run_id": run.run_id,
        "workflow": run.workflow.name,
        "status": run.status,
        "duration_s": round(run.duration_s, 3),
        "store": run.store_config.durable_url,
        "mlflow": {
            "tracking_uri": hook.tracking_uri,
            "experiment_id": hook.experiment_id,
            "run_id": hook.parent_run_id,
            "ui_url": mlflow_ui_url(hook.tracking_uri, hook.experiment_id, hook.parent_run_id),
        },
        "stages": [
            {
                "stage": r.name,
                "status": r.status,
                "cache": r.cache,
                "requested": r.decision.requested.describe(),
                "placed": r.decision.effective.describe() if r.decision.effective else "",
                "placement": r.decision.label,
                "node_type_waited_for": r.decision.waits_for or "",
                "node": r.result.node_ip if r.result else "",
                "node_id": r.result.node_id if r.result else "",
                "device": r.result.device if r.result else "",
                "duration_s": round(r.result.duration_s, 3) if r.result else 0.0,
                "energy_j": round(float(r.result.profile.get("energy_j", 0.0)), 3) if r.result else 0.0,
                "energy_method": str(r.result.profile.get("energy_method", "")) if r.result else "",
                "digest": r.artifact.digest if r.artifact else "",
            }
            for r in run.records.values()
        ],
        "endpoints": answers,
    }


def _print_summary(run: RunInfo, hook: Any, answers: list[dict[str, Any]]) -> None:
    from rich.table import Table  # noqa: PLC0415

    from workflows.summary import COLUMNS, stage_rows  # noqa: PLC0415

    data = _summary(run, hook, answers)
    table = Table(title=f"tierflow run {run.run_id} ({run.workflow.name}) - {run.status} in {run.duration_s:.1f}s")
    for col in COLUMNS:
        table.add_column(col)
    for row in stage_rows(run):
        table.add_row(*row)
    console.print(table)
    for a in answers:
        console.print(f"endpoint: {a['url']}")
        console.print(
            f"  example request -> {json.dumps(_answer(a['response']))}"
            + (f" (true label {a['expected']})" if a["expected"] is not None else "")
        )
        for d in a.get("direct", []):
            answer = _answer(d["response"])
            console.print(f"  direct ingress: {d['url']} -> {json.dumps(answer)}")
    ml = data["mlflow"]
    console.print(f"MLflow: {ml['tracking_uri']}  experiment {ml['experiment_id']}  run {ml['run_id']}")
    if ml["tracking_uri"].startswith("sqlite:"):
        console.print(f"  browse: mlflow ui --backend-store-uri {ml['tracking_uri']}", soft_wrap=True)
    console.print(f"  open: {ml['ui_url']}", markup=False, soft_wrap=True)
    console.print(f"artifacts: {data['store']}")


if __name__ == "__main__":
    sys.exit(main())
