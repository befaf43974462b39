"""`tierflow init demo && tierflow run demo.py:workflow` on an empty directory, and `tierflow doctor`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tierflow

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_the_starter_runs_as_written_and_its_test_passes(tmp_path):
    p = tierflow("init", "demo", cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "run it: tierflow run demo.py:workflow" in p.stdout
    p = tierflow("run", "demo.py:workflow", "--num-cpus", "2", cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "succeeded evaluate" in p.stdout
    assert (tmp_path / ".tierflow" / "store").is_dir()  # the tierflow.toml it wrote was used
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_demo.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert t.returncode == 0 and "1 passed" in t.stdout, t.stdout[-2000:] + t.stderr[-2000:]


def test_doctor_reports_every_check_and_a_fix_for_each_failure(tmp_path):
    p = tierflow("doctor", "--tracking-uri", "http://127.0.0.1:9", cwd=tmp_path)
    out = p.stdout
    for name in ("python", "ray", "cluster", "auth", "store", "mlflow", "port 8000", "port 8265"):
        assert f" {name}: " in out, out
    assert "FAIL mlflow: http://127.0.0.1:9" in out and "fix: start it" in out
    assert p.returncode == 1  # the unreachable MLflow server
