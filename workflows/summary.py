"""The run summary as rows: printed by the CLI and written as the MLflow parent run's description."""

from __future__ import annotations

import inspect

from workflows.hooks import RunInfo
from workflows.model import Stage

COLUMNS = ("stage", "resources", "node", "device", "duration", "cache")


def stage_rows(run: RunInfo) -> list[tuple[str, ...]]:
    rows = []
    for r in run.records.values():
        requested = r.decision.requested.describe()
        placed = r.decision.effective.describe() if r.decision.effective else ""
        res = requested if requested == placed or not placed else f"{requested} -> {placed}"
        node = r.result.node_id[:8] if r.result else "-"
        device = r.result.device if r.result else "-"
        took = f"{r.result.duration_s:.2f}s" if r.result else "-"
        rows.append((r.name, res, node, device or "-", took, r.cache if r.status != "failed" else "failed"))
    return rows


def markdown(run: RunInfo) -> str:
    """A short markdown description: what ran, where, how long (MLflow renders `mlflow.note.content`)."""
    head = f"**tierflow run `{run.run_id}`** of workflow `{run.workflow.name}`: {run.status}"
    if run.ended_at is not None:
        head += f" in {run.duration_s:.1f}s"
    lines = [head, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in stage_rows(run)]
    return "\n".join(lines)


def description(stage: Stage) -> str:
    """The stage's docstring: the description of its MLflow run."""
    return inspect.getdoc(stage.fn) or ""
