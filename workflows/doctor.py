"""`tierflow doctor`: check what a first run needs, and say how to fix each thing that is not right."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
import uuid
from dataclasses import dataclass
from importlib import metadata

from storage import ArtifactStore, StorageError, StoreConfig

RAY_SERIES = "2.60"
PORTS = {8000: "Ray Serve's HTTP proxy (change with -p serve.port=...)", 8265: "the Ray dashboard"}
# Connect, then run one actor: a token-auth mismatch shows only when an actor is cancelled before it runs.
PROBE = """
import json, sys, ray
try:
    ray.init(address=sys.argv[1], log_to_driver=False)
    @ray.remote(num_cpus=0)
    class Ping:
        def ping(self):
            return 1
    ray.get(Ping.remote().ping.remote(), timeout=30)
    print(json.dumps({"ok": True, "nodes": sum(1 for n in ray.nodes() if n["Alive"])}))
except Exception as exc:
    print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"[:800]}))
"""


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def check_python() -> Check:
    v = sys.version_info
    ok = v >= (3, 11)
    return Check("python", ok, f"{v.major}.{v.minor}.{v.micro} at {sys.executable}", "" if ok else "use Python 3.11+")


def check_ray_version() -> Check:
    try:
        version = metadata.version("ray")
    except metadata.PackageNotFoundError:
        return Check("ray", False, "not installed", "pip install -e . (installs ray[default,serve]==2.60.*)")
    ok = version.startswith(RAY_SERIES + ".")
    fix = "" if ok else f"pip install 'ray[default,serve]>={RAY_SERIES},<2.61' (tierflow is tested on {RAY_SERIES})"
    return Check("ray", ok, version, fix)


def check_cluster(address: str | None, timeout_s: float = 90.0) -> list[Check]:
    """The cluster named by --address / $RAY_ADDRESS, and whether this client's auth mode agrees with it."""
    address = address or os.environ.get("RAY_ADDRESS")
    mode = os.environ.get("RAY_AUTH_MODE", "unset")
    token = os.path.expanduser("~/.ray/auth_token")
    if not address:
        detail = "no --address or $RAY_ADDRESS: `tierflow run` starts a local Ray"
        auth = f"RAY_AUTH_MODE={mode}; a local Ray started by tierflow agrees with its own driver"
        return [Check("cluster", True, detail), Check("auth", True, auth)]
    try:
        p = subprocess.run(
            [sys.executable, "-c", PROBE, address], capture_output=True, text=True, timeout=timeout_s, check=False
        )
        result = (
            json.loads(p.stdout.strip().splitlines()[-1])
            if p.stdout.strip()
            else {"ok": False, "error": p.stderr[-800:]}
        )
    except subprocess.TimeoutExpired:
        result = {"ok": False, "error": f"no answer in {timeout_s:.0f} s"}
    if result["ok"]:
        detail = f"{address}: {result['nodes']} node(s) alive, an actor ran"
        return [Check("cluster", True, detail), Check("auth", True, f"RAY_AUTH_MODE={mode} agrees with the cluster")]
    error = result["error"]
    if any(s in error for s in ("never ran", "authorization", "Unauthenticated", "UNAUTHENTICATED", "token")):
        fix = (
            "run with the cluster's mode: `export RAY_AUTH_MODE=token` (token in ~/.ray/auth_token, "
            "`ray get-auth-token --generate` makes one) for a cluster from `ray start` on Ray 2.60, or "
            "`export RAY_AUTH_MODE=disabled` for one started without auth"
        )
        has_token = "present" if os.path.exists(token) else "absent"
        return [
            Check("cluster", True, f"{address} answers"),
            Check("auth", False, f"RAY_AUTH_MODE={mode}, ~/.ray/auth_token {has_token}: {error}", fix),
        ]
    fix = f"start one (`ray start --head`), or unset RAY_ADDRESS to let tierflow start a local Ray; tried {address}"
    return [Check("cluster", False, error, fix), Check("auth", False, "not checked: no cluster", "")]


def check_store(value: str | None) -> Check:
    try:
        config = StoreConfig.resolve(value)
        store = ArtifactStore(config)
        key = f"doctor/{uuid.uuid4().hex}"
        store.durable.write(key, b"ok")
        ok = store.durable.read(key) == b"ok"
        store.durable.delete(key)
    except (StorageError, OSError) as exc:
        return Check("store", False, str(exc), "pass --store URLS or set TIERFLOW_STORE to a writable location")
    return Check("store", ok, f"{config.durable_url} is writable", "")


def check_mlflow(uri: str | None) -> Check:
    from workflows.lineage import default_tracking_uri  # noqa: PLC0415

    uri = uri or default_tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as resp:  # noqa: S310  # user's server
                return Check("mlflow", resp.status == 200, f"{uri} answers /health", "")
        except OSError as exc:
            fix = f"start it (`mlflow server --host 127.0.0.1 --port ...`) or unset MLFLOW_TRACKING_URI; {uri}"
            return Check("mlflow", False, f"{uri}: {exc}", fix)
    if uri.startswith("sqlite:///"):
        directory = os.path.dirname(uri.removeprefix("sqlite:///")) or "."
        probe = directory
        while not os.path.exists(probe):
            probe = os.path.dirname(probe) or "."
        ok = os.access(probe, os.W_OK)
        return Check("mlflow", ok, f"{uri} ({directory} {'writable' if ok else 'not writable'})",
                     "" if ok else "set MLFLOW_TRACKING_URI or --tracking-uri to a writable place")  # fmt: skip
    return Check("mlflow", True, f"{uri} (not checked: only http(s) and sqlite are probed)", "")


def check_ports() -> list[Check]:
    out = []
    for port, what in PORTS.items():
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                out.append(Check(f"port {port}", True, f"free ({what})"))
            except OSError:
                fix = "another process holds it (often another Ray: `ray status`); stop it if it is yours" + (
                    ", or serve elsewhere with -p serve.port=8100" if port == 8000 else ""
                )
                out.append(Check(f"port {port}", False, f"in use ({what})", fix))
    return out


def run_checks(address: str | None, store: str | None, tracking_uri: str | None) -> list[Check]:
    return [
        check_python(),
        check_ray_version(),
        *check_cluster(address),
        check_store(store),
        check_mlflow(tracking_uri),
        *check_ports(),
    ]
