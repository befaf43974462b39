"""Live per-stage status: a rich table that redraws on a terminal, plain log lines otherwise."""

from __future__ import annotations

import time

from rich.console import Console
from rich.live import Live
from rich.table import Table

from workflows.hooks import RunInfo, StageRecord

_STYLE = {"succeeded": "green", "cached": "cyan", "failed": "red", "running": "yellow", "retrying": "magenta"}


class ProgressHook:
    """Observes the engine (`on_stage_start` is optional for hooks; the driver calls it when present)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live: Live | None = None
        self.started: dict[str, float] = {}

    def on_run_start(self, *, run: RunInfo) -> None:
        self.console.print(f"run {run.run_id}: workflow {run.workflow.name} ({len(run.records)} stages)")
        if self.console.is_terminal:
            self.live = Live(self._table(run), console=self.console, refresh_per_second=4, transient=False)
            self.live.start()

    def on_stage_start(self, *, run: RunInfo, record: StageRecord) -> None:
        self.started[record.name] = time.monotonic()
        if self.live:
            self.live.update(self._table(run))
        else:
            attempt = f" (attempt {record.attempts})" if record.attempts > 1 else ""
            where = record.decision.effective.describe() if record.decision.effective else ""
            self.console.print(f"  started   {record.name}{attempt} [{where}]", markup=False)

    def on_stage_end(self, *, run: RunInfo, record: StageRecord) -> None:
        if self.live:
            self.live.update(self._table(run))
            return
        res = record.result
        if record.status == "failed":
            detail = record.error.splitlines()[0] if record.error else ""
        elif res:
            detail = f"on {res.node_ip} ({res.device}) in {res.duration_s:.2f}s"
        else:
            detail = "from cache" if record.status == "cached" else "restored (resumed run)"
        self.console.print(f"  {record.status:<9} {record.name} {detail}", markup=False)

    def on_run_end(self, *, run: RunInfo, error: BaseException | None) -> None:
        if self.live:
            self.live.update(self._table(run))
            self.live.stop()

    def _table(self, run: RunInfo) -> Table:
        table = Table(title=f"{run.workflow.name} {run.run_id}", expand=False)
        for col in ("stage", "status", "attempt", "node", "device", "time"):
            table.add_column(col)
        now = time.monotonic()
        for rec in run.records.values():
            res = rec.result
            if res:
                took = f"{res.duration_s:.2f}s"
            elif rec.status == "running" and rec.name in self.started:
                took = f"{now - self.started[rec.name]:.1f}s…"
            else:
                took = "-"
            style = _STYLE.get(rec.status, "")
            table.add_row(
                rec.name,
                f"[{style}]{rec.status}[/]" if style else rec.status,
                str(rec.attempts or "-"),
                res.node_id[:8] if res else "-",
                res.device if res else "-",
                took,
            )
        return table
