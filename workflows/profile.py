"""Stage profiles across runs (`tierflow profile`), and the hook that prices a run's energy in MLflow.

Profiles are read from the stage records committed in the store (`records/<run>/<stage>.json`), so
they are there for every run that committed, with or without MLflow.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from actors.errors import RecordError
from storage import ArtifactStore, StorageError, StoreConfig
from workflows.costs import CostConfig, co2_g, stage_cost_usd
from workflows.hooks import RunInfo, StageRecord
from workflows.journal import Journals

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageRun:
    """One execution of a stage, as its record has it."""

    run_id: str
    stage: str
    started_at: float
    params: dict[str, Any]
    profile: dict[str, Any]
    metrics: dict[str, float]  # last value of each metric the stage logged
    pid: int = 0  # the actor process that ran it: the earliest stage per process in a run was its first call


def load_profiles(store_config: StoreConfig, workflow: str) -> dict[str, list[StageRun]]:
    """Every profiled execution of `workflow`'s stages in the store, oldest first, by stage."""
    store = ArtifactStore(store_config)
    out: dict[str, list[StageRun]] = {}
    for journal in Journals(store).list():
        if journal.workflow != workflow:
            continue
        for stage in journal.stages:
            try:
                doc = store.record(journal.run_id, stage)
            except (StorageError, RecordError) as exc:
                log.warning("run %s stage %s: record unreadable (%s); skipped", journal.run_id, stage, exc)
                continue
            if not doc or not isinstance(doc.get("profile"), dict) or not doc["profile"]:
                continue  # a cache hit, or a record written before profiles existed
            metrics = {m["key"]: float(m["value"]) for m in doc.get("metrics", []) if isinstance(m, dict)}
            out.setdefault(stage, []).append(
                StageRun(
                    journal.run_id,
                    stage,
                    float(doc.get("started_at", 0.0)),
                    dict(journal.params.get(stage, {})),
                    doc["profile"],
                    metrics,
                    int(doc.get("pid", 0) or 0),
                )
            )
    for runs in out.values():
        runs.sort(key=lambda r: r.started_at)
    return out


def startup_s(store_config: StoreConfig, workflow: str) -> float | None:
    """Median time from a run's start to its first stage's start (placement + the first actor) over the
    profiled runs of `workflow`, or None if there are none: the planner's measured actor start-up."""
    runs = load_profiles(store_config, workflow)
    first: dict[str, float] = {}
    for stage_runs in runs.values():
        for r in stage_runs:
            first[r.run_id] = min(first.get(r.run_id, r.started_at), r.started_at)
    starts = {j.run_id: j.started_at for j in Journals(ArtifactStore(store_config)).list() if j.run_id in first}
    gaps = [first[rid] - t for rid, t in starts.items() if first[rid] >= t]
    return statistics.median(gaps) if gaps else None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}GiB"  # pragma: no cover


def summarise(runs: list[StageRun]) -> dict[str, Any]:
    def med(key: str) -> float:
        return statistics.median(float(r.profile.get(key, 0.0) or 0.0) for r in runs)

    durations = [float(r.profile.get("duration_s", 0.0)) for r in runs]
    methods = sorted({str(r.profile.get("energy_method", "")) for r in runs} - {""})
    devices = sorted({str(r.profile.get("device", "")) for r in runs} - {""})
    return {
        "runs": len(runs),
        "duration_s": statistics.median(durations),
        "duration_min_s": min(durations),
        "duration_max_s": max(durations),
        "cpu_s": med("cpu_s"),
        "peak_rss_bytes": med("peak_rss_bytes"),
        "rows_in": med("rows_in"),
        "rows_out": med("rows_out"),
        "bytes_read": med("bytes_read"),
        "bytes_written": med("bytes_written"),
        "energy_j": med("energy_j"),
        "energy_method": ",".join(methods),
        "device": ",".join(devices),
        "cpus": med("cpus"),
        "gpus": med("gpus"),
    }


def show_profiles(store_config: StoreConfig, workflow: str, console: Console, *, as_json: bool = False) -> int:
    profiles = load_profiles(store_config, workflow)
    if not profiles:
        console.print(
            f"no profiled runs of {workflow!r} in {store_config.durable_url}; run it first: tierflow run {workflow}"
        )
        return 1
    rows = {stage: summarise(runs) for stage, runs in profiles.items()}
    if as_json:
        print(json.dumps(rows, indent=1))
        return 0
    table = Table(title=f"profiles of {workflow} in {store_config.durable_url} (medians across runs)")
    for col in ("stage", "runs", "duration (min-max)", "cpu", "peak rss", "rows in/out", "read/written", "device"):
        table.add_column(col)
    table.add_column("energy (method)")
    for stage, s in rows.items():
        table.add_row(
            stage,
            str(s["runs"]),
            f"{s['duration_s']:.2f}s ({s['duration_min_s']:.2f}-{s['duration_max_s']:.2f})",
            f"{s['cpu_s']:.2f}s",
            _size(s["peak_rss_bytes"]),
            f"{s['rows_in']:.0f}/{s['rows_out']:.0f}",
            f"{_size(s['bytes_read'])}/{_size(s['bytes_written'])}",
            f"{s['device']} cpus={s['cpus']:g} gpus={s['gpus']:g}",
            f"{s['energy_j']:.1f} J ({s['energy_method']})",
        )
    console.print(table)
    return 0


class EnergyHook:
    """Adds `co2_g` and `cost_usd` to each stage's MLflow run and the run's totals (energy_j, co2_g, cost_usd,
    and the methods used) to the parent run. Runs after `MLflowHook` in the hook list (it needs its runs)."""

    def __init__(self, mlflow_hook: Any | None = None, config: CostConfig | None = None) -> None:
        self.mlflow = mlflow_hook
        self.config = config or CostConfig()
        self.totals = {"energy_j": 0.0, "co2_g": 0.0, "cost_usd": 0.0}
        self.methods: set[str] = set()

    def on_run_start(self, *, run: RunInfo) -> None:
        self.totals = dict.fromkeys(self.totals, 0.0)
        self.methods.clear()

    def stage_figures(self, record: StageRecord) -> dict[str, float] | None:
        prof = record.result.profile if record.result else {}
        if not prof:
            return None
        held = prof.get("resources") or (
            record.decision.effective.as_ray_resources() if record.decision.effective else {}
        )
        energy_j = float(prof.get("energy_j", 0.0))
        return {
            "energy_j": energy_j,
            "co2_g": co2_g(energy_j, self.config),
            "cost_usd": stage_cost_usd(held, float(prof.get("duration_s", 0.0)), self.config),
        }

    def on_stage_end(self, *, run: RunInfo, record: StageRecord) -> None:
        figures = self.stage_figures(record)
        if figures is None:
            return
        for k, v in figures.items():
            self.totals[k] += v
        self.methods.add(str(record.result.profile.get("energy_method", "")))  # type: ignore[union-attr]
        child = record.annotations.get("mlflow_run_id")
        already = record.restored and self.mlflow is not None and record.name in self.mlflow.recorded
        if self.mlflow is not None and child and not already:
            self._log(child, {"co2_g": figures["co2_g"], "cost_usd": figures["cost_usd"]}, {})

    def on_run_end(self, *, run: RunInfo, error: BaseException | None) -> None:
        run.annotations["energy_j"] = f"{self.totals['energy_j']:.3f}"
        if self.mlflow is None or not self.mlflow.parent_run_id:
            return
        tags = {
            "tierflow.energy.method": "+".join(sorted(self.methods - {""})) or "none",
            "tierflow.grid_gco2_per_kwh": f"{self.config.grid_gco2_per_kwh:g}",
        }
        self._log(self.mlflow.parent_run_id, self.totals, tags)

    def _log(self, run_id: str, metrics: Mapping[str, float], tags: Mapping[str, str]) -> None:
        import time  # noqa: PLC0415

        from mlflow.entities import Metric, RunTag  # noqa: PLC0415

        now = int(time.time() * 1000)
        self.mlflow.client.log_batch(  # type: ignore[union-attr]
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
