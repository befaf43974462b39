"""Live per-stage status: a rich table that redraws on a terminal, plain log lines otherwise."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from workflows.hooks import PENDING, RunInfo, StageRecord

# Above this many stages the live view is counts per status plus the stages running, retrying or failed:
# a row per stage would cost O(stages) per redraw and fill no screen.
SUMMARY_ABOVE = 30
_SHOWN = 20  # running / failed stages listed in the summary view

# (run_id, stage) -> {"step": int, "metrics": {...}} or None: what stages published via ctx.log_metric.
ProgressReader = Callable[[str, str], dict[str, Any] | None]
PLAIN_PROGRESS_EVERY_S = 10.0  # off a terminal, one progress line per stage per interval

_STYLE = {"succeeded": "green", "cached": "cyan", "failed": "red", "running": "yellow", "retrying": "magenta"}


class ProgressHook:
    """Observes the engine (`on_stage_start` is optional for hooks; the driver calls it when present)."""

    def __init__(
        self,
        console: Console,
        progress: ProgressReader | None = None,
        poll_s: float = 1.0,
        plain_every_s: float = PLAIN_PROGRESS_EVERY_S,
    ) -> None:
        self.console = console
        self.live: Live | None = None
        self.started: dict[str, float] = {}
        self.status: dict[str, str] = {}  # stage -> status at its last event (kept per event, not by a walk)
        self.counts: dict[str, int] = {}
        self.progress = progress
        self.poll_s, self.plain_every_s = poll_s, plain_every_s
        self.latest: dict[str, str] = {}  # stage -> "epoch=3 loss=0.21"
        self._printed_at: dict[str, float] = {}
        self._stop = threading.Event()

    def on_run_start(self, *, run: RunInfo) -> None:
        self.console.print(f"run {run.run_id}: workflow {run.workflow.name} ({len(run.records)} stages)")
        self.counts = {PENDING: len(run.records)}
        if self.console.is_terminal:
            # Rich redraws from get_renderable at most 4 times a second; stage events only update counters.
            self.live = Live(
                console=self.console, refresh_per_second=4, transient=False, get_renderable=lambda: self._table(run)
            )
            self.live.start()
        if self.progress is not None:
            threading.Thread(target=self._poll, args=(run,), daemon=True, name="tierflow-progress").start()

    def _poll(self, run: RunInfo) -> None:
        """Show what running stages report through `ctx.log_metric`: no extra code in the stage."""
        while not self._stop.wait(self.poll_s):
            for name, status in list(self.status.items()):  # unfinished stages only, not every stage of the run
                if status == "running" and self.progress is not None:
                    payload = self.progress(run.run_id, name)
                    if payload:
                        self._show_progress(run, name, payload)

    def _show_progress(self, run: RunInfo, name: str, payload: dict[str, Any]) -> None:
        text = " ".join(f"{k}={v:.4g}" for k, v in payload.get("metrics", {}).items())
        text = f"step {payload.get('step', 0)}: {text}" if payload.get("step") else text
        if text == self.latest.get(name):
            return
        self.latest[name] = text
        if self.live:
            return  # the next redraw (get_renderable) shows it
        if time.monotonic() - self._printed_at.get(name, 0.0) >= self.plain_every_s:
            self._printed_at[name] = time.monotonic()
            self.console.print(f"  progress  {name} {text}", markup=False)

    def on_stage_waiting(self, *, run: RunInfo, record: StageRecord, node_type: str) -> None:
        """The stage's actor waits for a node the autoscaler has to launch (shown until the stage starts)."""
        text = f"waiting for a node of type {node_type} since {time.strftime('%H:%M:%S')}"
        self.latest[record.name] = text
        if not self.live:
            self.console.print(f"  waiting   {record.name} {text[8:]}", markup=False)

    def on_stage_start(self, *, run: RunInfo, record: StageRecord) -> None:
        self.started[record.name] = time.monotonic()
        self.latest.pop(record.name, None)  # no longer waiting for a node
        self._seen(record)
        if not self.live:
            attempt = f" (attempt {record.attempts})" if record.attempts > 1 else ""
            where = record.decision.effective.describe() if record.decision.effective else ""
            self.console.print(f"  started   {record.name}{attempt} [{where}]", markup=False)

    def on_stage_end(self, *, run: RunInfo, record: StageRecord) -> None:
        self._seen(record)
        if self.live:
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
        self._stop.set()
        if self.live:
            self.live.refresh()
            self.live.stop()

    def _seen(self, record: StageRecord) -> None:
        old = self.status.get(record.name, PENDING)
        self.counts[old] = self.counts.get(old, 0) - 1
        self.counts[record.status] = self.counts.get(record.status, 0) + 1
        self.status[record.name] = record.status
        if record.status in ("succeeded", "cached", "not_run", "cancelled"):
            del self.status[record.name]  # only unfinished or failed stages are listed
            self.started.pop(record.name, None)

    def _table(self, run: RunInfo) -> Table:
        if len(run.records) > SUMMARY_ABOVE:
            return self._summary(run)
        table = Table(title=f"{run.workflow.name} {run.run_id}", expand=False)
        for col in ("stage", "status", "attempt", "node", "device", "time", "progress"):
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
                self.latest.get(rec.name, "") if rec.status in ("running", "pending") else "",
            )
        return table

    def _summary(self, run: RunInfo) -> Table:
        """Counts per status, then the stages running, retrying or failed: O(those), not O(stages)."""
        counts = " ".join(f"{k}={v}" for k, v in self.counts.items() if v > 0)
        table = Table(title=f"{run.workflow.name} {run.run_id}: {counts}", expand=False)
        for col in ("stage", "status", "attempt", "time", "progress"):
            table.add_column(col)
        now = time.monotonic()
        shown = list(self.status.items())[:_SHOWN]
        for name, status in shown:
            rec = run.records[name]
            took = f"{now - self.started[name]:.1f}s…" if name in self.started else "-"
            style = _STYLE.get(status, "")
            progress = self.latest.get(name, "") if status == "running" else ""
            table.add_row(name, f"[{style}]{status}[/]" if style else status, str(rec.attempts or "-"), took, progress)
        if len(self.status) > len(shown):
            table.add_row(f"… {len(self.status) - len(shown)} more", "", "", "", "")
        return table
