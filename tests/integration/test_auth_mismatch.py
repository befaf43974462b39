"""A driver whose token-auth mode differs from its cluster's gets a clear error at once, not 4 retries."""

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def head_without_auth():
    # Its own process group, ended by id; a short temp dir keeps Ray's socket paths under the OS limit.
    temp = tempfile.mkdtemp(prefix="tf-noauth-", dir="/tmp")
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         "--disable-usage-stats", f"--temp-dir={temp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not list(Path(temp).glob("session_*/sockets/raylet")):
            assert head.poll() is None and time.monotonic() < deadline, "the auth-less head did not start"
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # `ray start --block` takes ~20 s to stop on SIGTERM
        head.wait(10)
        shutil.rmtree(temp, ignore_errors=True)


def test_token_auth_mismatch_fails_fast_with_the_fix(head_without_auth, tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    t0 = time.monotonic()
    proc = subprocess.run(
        ["tierflow", "run", "tests/fixtures/user_workflows.py:good", "--address", head_without_auth,
         "--store", str(tmp_path / "store"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--run-id", "mismatch"],
        check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "token-authentication mismatch" in out and "RAY_AUTH_MODE=token" in out, out
    assert "retrying" not in out  # found before any stage was retried
    assert elapsed < 200, elapsed
