"""What a user sees from `tierflow run`: tierflow's lines and the summary; Ray's output in the run's log."""

import io
import re
import time
from pathlib import Path

import pytest
from rich.console import Console

from actors.ray_api import read_progress
from storage import StoreConfig
from tests.conftest import ship_by_value, start_local_ray, tierflow
from workflows import Workflow, stage
from workflows.engine import run_workflow
from workflows.progress import ProgressHook

pytestmark = pytest.mark.integration
ship_by_value(__name__)
REPO = Path(__file__).resolve().parents[2]


def test_run_prints_only_tierflow_lines_and_keeps_the_rest_in_the_log(tmp_path):
    fixture = REPO / "tests/fixtures/user_workflows.py"
    p = tierflow("run", f"{fixture}:good", "--num-cpus", "2", "--run-id", "quiet-1", cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout + p.stderr
    # Ray's INFO/WARNING lines, forwarded worker lines "(pid=...)" and Python warnings stay out of the terminal.
    assert not re.search(r"\bINFO\b|\bWARNING\b|pid=\d+|Warning:", out), out
    assert "succeeded double" in p.stdout and "tierflow run quiet-1" in p.stdout
    log_line = next(line for line in p.stdout.splitlines() if line.startswith("log: "))
    local = Path(log_line.split()[1])
    assert local.is_file() and local.is_relative_to(tmp_path)
    assert "Started a local Ray instance" in local.read_text()
    shown = tierflow("show", "quiet-1", "--logs", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "Started a local Ray instance" in shown.stdout


@stage(cpus=1)
def long_training(ctx) -> dict:
    for epoch in range(1, 6):
        time.sleep(0.6)
        ctx.log_metric("loss", 1.0 / epoch, step=epoch)
    return {"epochs": 5}


def test_a_long_stage_shows_its_logged_metrics_while_it_runs(tmp_path):
    start_local_ray(num_cpus=2)
    try:
        out = io.StringIO()
        hook = ProgressHook(
            Console(file=out, force_terminal=False, width=200), progress=read_progress, poll_s=0.2, plain_every_s=0
        )
        run_workflow(
            Workflow("long", [long_training]),
            store_config=StoreConfig.from_urls([str(tmp_path / "store")]),
            hooks=[hook],
            keep_warm_s=0,
        )
    finally:
        import ray

        ray.shutdown()
    lines = [line for line in out.getvalue().splitlines() if line.strip().startswith("progress")]
    # published at most once a second from inside the actor, seen by the driver before the stage ended
    assert lines and all("long_training" in line and "loss=" in line for line in lines), out.getvalue()
    assert out.getvalue().index("progress") < out.getvalue().index("succeeded long_training")
