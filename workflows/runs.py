"""`tierflow runs` and `tierflow show RUN_ID`: read run journals from the durable tier."""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from storage import ArtifactStore, StoreConfig
from workflows.journal import Journals


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def show_runs(store: StoreConfig, console: Console) -> int:
    journals = Journals(ArtifactStore(store)).list()
    table = Table(title=f"runs in {store.durable_url}")
    for col in ("run id", "workflow", "status", "started", "duration", "stages done"):
        table.add_column(col)
    for j in journals:
        status = j.status if j.status != "running" or j.driver_alive() is not False else "running (driver gone)"
        dur = f"{j.duration_s:.1f}s" if j.duration_s is not None else "-"
        table.add_row(j.run_id, j.workflow, status, _when(j.started_at), dur, f"{len(j.committed())}/{len(j.stages)}")
    console.print(table)
    return 0


def show_run(store: StoreConfig, run_id: str, console: Console, *, logs: bool = False) -> int:
    artifacts = ArtifactStore(store)
    j = Journals(artifacts).read(run_id)
    if logs:
        from workflows.runlog import read_log  # noqa: PLC0415

        console.file.write(read_log(artifacts, run_id).decode(errors="replace"))
        return 0
    dur = f"{j.duration_s:.1f}s" if j.duration_s is not None else "-"
    title = f"run {j.run_id} ({j.workflow}) - {j.status}, started {_when(j.started_at)}, {dur}"
    table = Table(title=title)
    for col in ("stage", "status", "attempts", "cache", "placement", "node", "device", "duration", "error"):
        table.add_column(col)
    for name, e in j.stages.items():
        table.add_row(
            name,
            e.status,
            str(e.attempts),
            e.cache,
            e.placement or "-",
            e.node_id[:8] or "-",
            e.device or "-",
            f"{e.duration_s:.2f}s",
            e.error[:80],
        )
    console.print(table)
    if mlflow_id := j.annotations.get("mlflow_run_id"):
        console.print(f"MLflow parent run: {mlflow_id}")
    return 0
