"""Live progress: a redrawn table on a terminal, plain lines otherwise (no Ray needed)."""

import io

from rich.console import Console

from actors.placement import NodeInfo
from storage import StoreConfig
from workflows import Workflow, stage
from workflows.engine import plan
from workflows.hooks import RunInfo, StageRecord
from workflows.progress import ProgressHook


@stage(cpus=1)
def first() -> dict:
    return {}


@stage(cpus=1)
def second(first: dict) -> dict:
    return first


def make_run(tmp_path) -> RunInfo:
    wf = Workflow("prog", [first, second])
    decisions = plan(wf, [NodeInfo("n", {"CPU": 2.0})])
    records = {n: StageRecord(n, decisions[n], {}) for n in wf.order}
    return RunInfo("r1", wf, {}, records, StoreConfig.from_urls([str(tmp_path)]))


def test_plain_lines_off_a_terminal(tmp_path):
    out = io.StringIO()
    hook, run = ProgressHook(Console(file=out, force_terminal=False, width=200)), make_run(tmp_path)
    hook.on_run_start(run=run)
    rec = run.records["first"]
    rec.status, rec.attempts = "running", 1
    hook.on_stage_start(run=run, record=rec)
    rec.status, rec.error = "failed", "ValueError: bad row 7\ntraceback..."
    hook.on_stage_end(run=run, record=rec)
    hook.on_run_end(run=run, error=None)
    text = out.getvalue()
    assert "run r1: workflow prog (2 stages)" in text
    assert "started   first [cpus=1]" in text and "failed    first ValueError: bad row 7" in text
    assert "traceback" not in text


def test_a_live_table_on_a_terminal(tmp_path):
    out = io.StringIO()
    hook, run = ProgressHook(Console(file=out, force_terminal=True, width=120)), make_run(tmp_path)
    hook.on_run_start(run=run)
    rec = run.records["second"]
    rec.status, rec.attempts = "running", 2
    hook.on_stage_start(run=run, record=rec)
    hook.on_run_end(run=run, error=None)
    text = out.getvalue()
    assert "prog r1" in text and "second" in text and "running" in text and "started" not in text


def test_stage_metrics_show_as_progress_without_user_code(tmp_path):
    import time

    out = io.StringIO()
    published = {("r1", "first"): {"step": 3, "metrics": {"epoch": 3, "loss": 0.21}}}
    hook = ProgressHook(
        Console(file=out, force_terminal=False, width=200),
        progress=lambda run_id, stage: published.get((run_id, stage)),
        poll_s=0.02,
        plain_every_s=0.0,
    )
    run = make_run(tmp_path)
    hook.on_run_start(run=run)
    rec = run.records["first"]
    rec.status, rec.attempts = "running", 1
    hook.on_stage_start(run=run, record=rec)
    deadline = time.monotonic() + 5
    while "progress" not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.02)
    hook.on_run_end(run=run, error=None)
    assert "progress  first step 3: epoch=3 loss=0.21" in out.getvalue()
    assert "second" not in out.getvalue().split("progress", 1)[1]  # a pending stage reports nothing
