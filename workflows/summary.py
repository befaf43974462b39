"""The run summary as rows: printed by the CLI and written as the MLflow parent run's description."""

from __future__ import annotations

import inspect
from collections import Counter

from workflows.hooks import RunInfo
from workflows.model import Stage

COLUMNS = ("stage", "resources", "placement", "node", "device", "duration", "energy (method)", "cache")


def stage_rows(run: RunInfo) -> list[tuple[str, ...]]:
    rows = []
    for r in run.records.values():
        requested = r.decision.requested.describe()
        placed = r.decision.effective.describe() if r.decision.effective else ""
        res = requested if requested == placed or not placed else f"{requested} -> {placed}"
        node = r.result.node_id[:8] if r.result else "-"
        device = r.result.device if r.result else "-"
        took = f"{r.result.duration_s:.2f}s" if r.result else "-"
        prof = r.result.profile if r.result else {}
        energy = f"{prof['energy_j']:.1f} J ({prof.get('energy_method', '')})" if "energy_j" in prof else "-"
        cache = r.cache if r.status != "failed" else "failed"
        rows.append((r.name, res, r.decision.label, node, device or "-", took, energy, cache))
    return rows


MARKDOWN_ROWS = 40  # a table of more stages would pass MLflow's 8,000-character description limit


def markdown(run: RunInfo) -> str:
    """A short markdown description: what ran, where, how long (MLflow renders `mlflow.note.content`)."""
    head = f"**tierflow run `{run.run_id}`** of workflow `{run.workflow.name}`: {run.status}"
    if run.ended_at is not None:
        head += f" in {run.duration_s:.1f}s"
    if len(run.records) > MARKDOWN_ROWS:  # MLflow truncates a description past 8,000 characters, with a warning
        counts = Counter(r.status for r in run.records.values())
        per = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        where = "its nested runs, or the table artifact `tierflow/stages.json` for a run in summary mode"
        return f"{head}\n\n{len(run.records)} stages: {per}. Each stage: {where}."
    lines = [head, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in stage_rows(run)]
    return "\n".join(lines)


def description(stage: Stage) -> str:
    """The stage's docstring: the description of its MLflow run."""
    return inspect.getdoc(stage.fn) or ""


def mlflow_ui_url(tracking_uri: str, experiment_id: str, run_id: str = "") -> str:
    """Where the run is in the MLflow UI, opened in the model-training view.

    MLflow 3.17's UI picks GenAI or model-training from its own switch (`workflowType` in the URL, else
    the browser's last choice, GenAI by default), not from the experiment's kind tag, so the link says it.
    A database URI is served by `mlflow ui` on its default address.
    """
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}/{page}?workflowType=machine_learning"
