"""`ray job submit` of the digits workflow to a real `ray start --head` on non-default ports.

The head runs as `ray start --head --block` in a session and process group of its own, with the venv's
`bin` first on PATH (so the job's `python` is the venv's) and its own `--temp-dir` (so its
`ray_current_cluster` file never redirects anyone else's `ray.init()`). Token auth is on: clients send
`~/.ray/auth_token` only when their own `RAY_AUTH_MODE=token`.

Teardown ends only what this module started. Ray puts every worker process (actors such as the Serve
controller and proxy) in a process group of its own, and the job supervisor starts the job's driver in a
session of its own, so `killpg` of the head's group does not signal them: the raylet ends them when it
shuts down. With Ray's default SIGTERM drain (30 s, which fails because the GCS got the same SIGTERM)
they outlive the head, so the drain is turned off, and teardown tracks them by pid (the head's
descendants and the members of its session, snapshotted before the kill) and ends any survivor by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

pytestmark = pytest.mark.integration

PROJECT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent  # not resolved: a venv's python is a symlink to the base interpreter
RAY = str(VENV_BIN / "ray")
TOKEN_FILE = Path.home() / ".ray" / "auth_token"
STAGES = ["preprocess", "train", "evaluate", "compress", "serve"]
# Variables that would point the head, the CLI or the job somewhere other than where this module says
# (a token from the environment would also differ from the one in TOKEN_FILE that the tests send).
_FOREIGN_ENV = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "MLFLOW_TRACKING_URI",
    "TIERFLOW_STORE",
)
HEAD_PORT_FLAGS = (
    "--port",
    "--dashboard-port",
    "--ray-client-server-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
    "--node-manager-port",
    "--object-manager-port",
)


# -- processes (Linux /proc) ------------------------------------------------------------------------
def _stat(pid: int) -> tuple[str, int, int, int, int] | None:
    """(state, ppid, pgid, sid, start time in clock ticks) of `pid`, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19])


def _all_processes() -> dict[int, tuple[str, int, int, int, int]]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            out[int(entry)] = st
    return out


def _ours(head_pid: int) -> dict[int, int]:
    """pid -> start time of every live process in the head's session or descended from the head."""
    procs = _all_processes()
    found = {p for p, st in procs.items() if st[3] == head_pid}
    found.add(head_pid)
    grew = True
    while grew:
        more = {p for p, st in procs.items() if st[1] in found and p not in found}
        found |= more
        grew = bool(more)
    return {p: procs[p][4] for p in found if p in procs and procs[p][0] != "Z"}


def _alive(tracked: dict[int, int]) -> dict[int, int]:
    """The tracked processes still running (same pid *and* start time: never a recycled pid)."""
    out = {}
    for pid, start in tracked.items():
        st = _stat(pid)
        if st is not None and st[4] == start and st[0] != "Z":
            out[pid] = start
    return out


def _group_members(pgid: int) -> list[int]:
    return [p for p, st in _all_processes().items() if st[2] == pgid and st[0] != "Z"]


def _describe(pids: list[int] | dict[int, int]) -> str:
    lines = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            cmd = "?"
        lines.append(f"{pid}: {cmd[:160]}")
    return "\n".join(lines)


def _wait_gone(tracked: dict[int, int], timeout_s: float) -> dict[int, int]:
    deadline = time.monotonic() + timeout_s
    while (left := _alive(tracked)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _exited_unreaped(pid: int, timeout_s: float) -> bool:
    """Wait for our child `pid` to exit without reaping it (it stays a zombie, holding its pid)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        time.sleep(0.1)
    return False


def stop_process_group(proc: subprocess.Popen, timeout_s: float = 30.0) -> tuple[str, list[int]]:
    """End `proc`'s group (SIGTERM, then SIGKILL), then any of its processes that live outside the group.

    Returns the processes found alive outside the group once the head had exited, and the pids nothing
    could end (should be none).
    """
    pgid = proc.pid  # start_new_session=True: the head leads its own session and group
    tracked = _ours(proc.pid)  # snapshot first: orphans are re-parented and lose their link to the head
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    if not _exited_unreaped(proc.pid, timeout_s):
        os.killpg(pgid, signal.SIGKILL)
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    # The head is a zombie now, so its pid (= our session id) cannot be recycled: rescan for anything
    # the session spawned while it shut down, then reap the head.
    tracked |= _ours(proc.pid)
    proc.wait(timeout=10)
    outside_group = _describe([p for p in _alive(tracked) if (st := _stat(p)) is not None and st[2] != pgid])
    left = _wait_gone(tracked, timeout_s)  # workers exit by themselves once their raylet is gone
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        left = _wait_gone(left, 10.0)
    in_group = _group_members(pgid)
    if in_group:
        os.killpg(pgid, signal.SIGKILL)
        time.sleep(0.5)
        in_group = _group_members(pgid)
    return outside_group, sorted(set(left) | set(in_group))


# -- the head -------------------------------------------------------------------------------------
def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on every interface (the GCS and raylet bind the node IP, not loopback)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("0.0.0.0", 0))  # only to ask the kernel for a free port
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def auth_token() -> str:
    """The token `ray start` and the clients read; created the way Ray documents when it is missing."""
    if not TOKEN_FILE.is_file() or not TOKEN_FILE.read_text().strip():
        subprocess.run([RAY, "get-auth-token", "--generate"], check=True, capture_output=True, timeout=60)
    return TOKEN_FILE.read_text().strip()


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


@dataclass
class RayHead:
    proc: subprocess.Popen
    dashboard_url: str
    gcs_port: int
    serve_port: int
    temp_dir: Path
    log: Path
    token: str

    def api(self, path: str, *, token: str | None = None, timeout: float = 10.0) -> tuple[int, str]:
        """GET the dashboard's REST API as a client holding `token` (default: the right one)."""
        token = self.token if token is None else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        req = urllib.request.Request(self.dashboard_url + path, headers=headers)  # our loopback URL
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def logs(self) -> str:
        parts = [f"--- {self.log}\n{self.log.read_text(errors='replace')[-4000:]}"]
        for name in ("dashboard.err", "dashboard.log", "raylet.err", "gcs_server.err"):
            for f in sorted(self.temp_dir.glob(f"session_*/logs/{name}")):
                parts.append(f"--- {f}\n{f.read_text(errors='replace')[-2000:]}")
        return "\n".join(parts)


def _wait_until_ready(head: RayHead, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if head.proc.poll() is not None:
            pytest.fail(f"`ray start --head` exited with {head.proc.returncode}\n{head.logs()}")
        try:
            # /api/version answers once the dashboard is up; /api/jobs/ once its job module is too.
            status_v, _ = head.api("/api/version", timeout=2)
            status_j, body = head.api("/api/jobs/", timeout=2)
            if status_v == 200 and status_j == 200:
                return
            last = f"/api/version {status_v}, /api/jobs/ {status_j}: {body[:200]}"
        except (urllib.error.URLError, OSError) as exc:
            last = repr(exc)
        time.sleep(0.5)
    pytest.fail(f"the head's dashboard did not answer within {timeout_s}s (last: {last})\n{head.logs()}")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    token = auth_token()
    ports = free_ports(len(HEAD_PORT_FLAGS) + 1)
    head_ports, serve_port = dict(zip(HEAD_PORT_FLAGS, ports, strict=False)), ports[-1]
    # Short and private: Ray's unix sockets live under it (107-byte limit) and so does ray_current_cluster.
    temp_dir = Path(tempfile.mkdtemp(prefix="tf-ray-"))
    log = tmp_path_factory.mktemp("ray-head") / "head.log"
    env = base_env()
    env["RAY_AUTH_MODE"] = "token"
    # On SIGTERM `ray start --block` first drains the node for up to 30 s, and cannot (its GCS got the
    # same SIGTERM): skip straight to ending its processes.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    # Serve's direct ingress, as a cluster turns it on: ingress replicas also answer on ports of their own.
    # Their 30 s minimum drain (for external load balancers to deregister them) is off: nothing here balances.
    env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "0"
    cmd = [RAY, "start", "--head", "--block", "--num-cpus", "2", "--dashboard-host", "127.0.0.1"]
    cmd += ["--include-dashboard", "true", "--disable-usage-stats", "--temp-dir", str(temp_dir)]
    for flag, port in head_ports.items():
        cmd += [flag, str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, cwd=temp_dir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    head = RayHead(
        proc=proc,
        dashboard_url=f"http://127.0.0.1:{head_ports['--dashboard-port']}",
        gcs_port=head_ports["--port"],
        serve_port=serve_port,
        temp_dir=temp_dir,
        log=log,
        token=token,
    )
    try:
        _wait_until_ready(head)
        yield head
    finally:
        outside_group, unkillable = stop_process_group(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)
        if outside_group:  # Ray workers (actors) live in groups of their own; see the module docstring
            print(f"alive outside the head's group after it exited:\n{outside_group}")
        assert not unkillable, f"processes of our Ray head survived:\n{_describe(unkillable)}"
        assert not _group_members(proc.pid), "the head's process group is not empty"


# -- the job --------------------------------------------------------------------------------------
def ray_job_submit(
    head: RayHead, entrypoint: list[str], *, env_vars: dict[str, str], auth: bool = True, timeout: float = 480
) -> subprocess.CompletedProcess:
    env = base_env()
    if auth:
        env["RAY_AUTH_MODE"] = "token"
    else:
        env.pop("RAY_AUTH_MODE", None)
    cmd = [RAY, "job", "submit", "--address", head.dashboard_url, "--working-dir", str(PROJECT)]
    cmd += ["--runtime-env-json", json.dumps({"env_vars": env_vars}), "--", *entrypoint]
    return subprocess.run(
        cmd, check=False, env=env, cwd=head.temp_dir, capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def json_summary(output: str) -> dict:
    """The `--json` summary the driver printed, among the job's log lines."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"^\{$", output, re.MULTILINE):
        try:
            value, _ = decoder.raw_decode(output, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and {"run_id", "status", "stages"} <= value.keys():
            return value
    pytest.fail(f"no JSON run summary in the job's output:\n{output[-6000:]}")


def _answers(url: str) -> int | None:
    """The HTTP status a prediction request to `url` gets, None if nothing listens there."""
    try:
        req = urllib.request.Request(url, data=b'{"instances": [[0]]}', method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def jobs(head: RayHead) -> list[dict]:
    status, body = head.api("/api/jobs/")
    assert status == 200, body
    return json.loads(body)


@pytest.mark.timeout(600)
def test_submitted_digits_job_trains_serves_and_records_lineage(ray_head: RayHead, tmp_path: Path) -> None:
    store = tmp_path / "store"
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    entrypoint = ["python", "-m", "workflows", "run", "digits", "-p", "train.epochs=10"]
    entrypoint += ["-p", f"serve.port={ray_head.serve_port}", "--json"]
    env_vars = {"MLFLOW_TRACKING_URI": tracking_uri, "TIERFLOW_STORE": str(store)}
    # One write() per print: the JSON summary is not split by log lines appended to the same job log.
    env_vars["PYTHONUNBUFFERED"] = "1"

    proc = ray_job_submit(ray_head, entrypoint, env_vars=env_vars)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"ray job submit exited {proc.returncode}:\n{output[-8000:]}"

    # The Jobs API (with the token) agrees, and the job saw the runtime env it was given.
    job_id = re.search(r"Job '(raysubmit_\w+)' submitted successfully", output).group(1)
    status, body = ray_head.api(f"/api/jobs/{job_id}")
    job = json.loads(body)
    assert status == 200 and job["status"] == "SUCCEEDED", body
    assert job["entrypoint"] == " ".join(entrypoint)
    assert job["runtime_env"]["env_vars"] == env_vars

    summary = json_summary(output)
    assert summary["status"] == "succeeded", summary
    assert summary["workflow"] == "digits"
    assert [s["stage"] for s in summary["stages"]] == STAGES
    for s in summary["stages"]:
        assert s["status"] in ("succeeded", "cached"), s
        assert re.fullmatch(r"[0-9a-f]{64}", s["digest"]), s
        assert s["device"] == "cpu" and s["node_id"], s  # a CPU-only head; train fell back to CPU
    # The env vars reached the driver: the store and the tracking URI are the ones passed in.
    assert summary["store"] == str(store)
    assert summary["mlflow"]["tracking_uri"] == tracking_uri
    manifests = sorted(p.stem for p in (store / "manifests" / summary["run_id"]).glob("*.json"))
    assert manifests == sorted(STAGES)

    # The one example request was answered by the model served on the head, on the port asked for.
    [endpoint] = summary["endpoints"]
    assert endpoint["url"] == f"http://127.0.0.1:{ray_head.serve_port}/digits/predict"
    assert isinstance(endpoint["expected"], int)
    assert endpoint["response"].get("predictions") == [endpoint["expected"]], endpoint
    served = next(s for s in summary["stages"] if s["stage"] == "compress")  # what serve deployed
    assert endpoint["response"]["model_digest"] == served["digest"]
    # The head runs Serve with direct ingress: the replica answered the same request on its own port.
    [direct] = endpoint["direct"]
    port = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/digits/predict", direct["url"])
    assert port and 30000 <= int(port.group(1)) <= 31000, direct
    assert direct["response"].get("predictions") == [endpoint["expected"]], direct
    assert direct["response"]["model_digest"] == served["digest"]
    # ... and the app was deleted when the job ended (the proxy may still answer, but not this route).
    for url in (endpoint["url"], direct["url"]):
        assert _answers(url) in (404, None), f"{url} still answers after the job ended"

    # MLflow lineage landed in the sqlite file the job was told to use.
    ml = summary["mlflow"]
    client = MlflowClient(tracking_uri)
    parent = client.get_run(ml["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.info.experiment_id == ml["experiment_id"]
    assert client.get_experiment(ml["experiment_id"]).name == "digits"
    assert parent.data.tags["tierflow.run_id"] == summary["run_id"]
    assert parent.data.params["train.epochs"] == "10"
    children = client.search_runs([ml["experiment_id"]], f"tags.`mlflow.parentRunId` = '{ml['run_id']}'")
    assert sorted(c.info.run_name for c in children) == sorted(STAGES)


def test_submission_without_token_auth_mode_is_refused(ray_head: RayHead, tmp_path: Path) -> None:
    before = jobs(ray_head)
    proc = ray_job_submit(
        ray_head,
        ["python", "-c", "print('must not run')"],
        env_vars={"TIERFLOW_STORE": str(tmp_path / "store")},
        auth=False,
        timeout=120,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "AuthenticationError" in output and "Unauthorized" in output, output[-4000:]
    assert "submitted successfully" not in output
    assert len(jobs(ray_head)) == len(before), "a job was created without the token"
    # The REST API refuses a missing or wrong bearer token too.
    assert ray_head.api("/api/jobs/", token="")[0] == 401
    assert ray_head.api("/api/jobs/", token="not-the-token")[0] in (401, 403)
