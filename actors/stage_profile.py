"""What a planner needs to know about one stage execution, measured in the stage actor.

A profile is a flat JSON-safe dict (it travels in `StageResult.profile` and the stage's committed
record). Numbers are also logged as MLflow metrics `profile.<name>` and energy as `energy_j`.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Mapping
from typing import Any

from actors.energy import EnergyConfig, EnergyMeter, EnergyReading, estimate_j
from storage import ArtifactRef

NUMERIC = (
    "duration_s", "cpu_s", "runqueue_wait_s", "peak_rss_bytes", "rows_in", "rows_out", "bytes_read",
    "bytes_written", "energy_j", "cpus", "gpus",
)  # fmt: skip


def peak_rss_bytes() -> int:
    """The actor process's peak resident set so far (a warm actor's peak covers earlier stages too)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


def runqueue_wait_s() -> float | None:
    """Seconds this thread has waited for a CPU while runnable (Linux schedstat), None where unavailable."""
    try:  # fd calls: read twice per stage, and a text file object costs more than the read
        fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        try:
            return int(os.read(fd, 256).split()[1]) / 1e9
        finally:
            os.close(fd)
    except (OSError, ValueError, IndexError):
        return None


class StageSampler:
    """Counters read at a stage's start and end: energy, and how long the stage waited for a CPU.

    The wait is what other processes (a shared machine, sibling stages) added to the stage's wall time;
    `duration_s - runqueue_wait_s` is its time with a core to itself, what the planner scales from.
    """

    def __init__(self, meter: EnergyMeter) -> None:
        self.meter = meter
        self._wait0: float | None = None

    def start(self) -> None:
        self._wait0 = runqueue_wait_s()
        self.meter.start()

    def stop(self, *, cpu_s: float, wall_s: float) -> tuple[EnergyReading, float]:
        wait1 = runqueue_wait_s()
        wait = wait1 - self._wait0 if wait1 is not None and self._wait0 is not None else 0.0
        return self.meter.stop(cpu_s=cpu_s, wall_s=wall_s), min(max(0.0, wait), wall_s)


def assigned_resources() -> dict[str, float]:
    """What Ray reserved for this actor (CPU, GPU, custom), as Ray reports it."""
    import ray  # noqa: PLC0415

    try:
        return {k: float(v) for k, v in ray.get_runtime_context().get_assigned_resources().items()}
    except Exception:  # outside an actor (unit tests)
        return {}


def build_profile(
    duration_s: float,
    cpu_s: float,
    device: str,
    inputs: Mapping[str, ArtifactRef],
    out_schema: Mapping[str, Any] | None,
    out_bytes: int,
    energy: EnergyReading,
    resources: Mapping[str, float],
    runqueue_wait: float = 0.0,
) -> dict[str, Any]:
    rows_in = sum(int(ref.schema.get("num_rows", 0) or 0) for ref in inputs.values())
    return {
        "duration_s": duration_s,
        "cpu_s": cpu_s,
        "runqueue_wait_s": runqueue_wait,
        "peak_rss_bytes": peak_rss_bytes(),
        "rows_in": rows_in,
        "rows_out": int((out_schema or {}).get("num_rows", 0) or 0),
        "bytes_read": sum(ref.size_bytes for ref in inputs.values()),
        "bytes_written": out_bytes,
        "input_bytes": {p: ref.size_bytes for p, ref in inputs.items()},
        "device": device,
        "cpus": float(resources.get("CPU", 0.0)),
        "gpus": float(resources.get("GPU", 0.0)),
        "resources": {k: float(v) for k, v in resources.items()},
        "energy_j": energy.energy_j,
        "energy_cpu_j": energy.cpu_j,
        "energy_gpu_j": energy.gpu_j,
        "energy_method": energy.method,
        "energy_note": energy.note,
    }


def stream_profile(
    *, wall_s: float, busy_s: float, workers: int, rows: int, out_bytes: int, config: EnergyConfig
) -> dict[str, Any]:
    """A streaming stage's profile: its producers ran in Ray Data's pool, whose CPU time is their busy time
    (no counter sees them there), so its energy is always the estimate."""
    energy_j = estimate_j(busy_s, config)
    return {
        "duration_s": wall_s,
        "cpu_s": busy_s,
        "rows_in": 0,
        "rows_out": rows,
        "bytes_read": 0,
        "bytes_written": out_bytes,
        "input_bytes": {},
        "device": "cpu",
        "workers": workers,
        "energy_j": energy_j,
        "energy_cpu_j": energy_j,
        "energy_gpu_j": 0.0,
        "energy_method": "estimate",
        "energy_note": "streaming producers run in a Ray Data pool: CPU-seconds x cpu_watts_per_core",
    }


def profile_metrics(profile: Mapping[str, Any]) -> dict[str, float]:
    """MLflow metrics for a profile: `energy_j` by its own name, the rest as `profile.<name>`."""
    out = {f"profile.{k}": float(profile[k]) for k in NUMERIC if k in profile and k != "energy_j"}
    if "energy_j" in profile:
        out["energy_j"] = float(profile["energy_j"])
    return out


def profile_tags(profile: Mapping[str, Any]) -> dict[str, str]:
    out = {"tierflow.energy.method": str(profile.get("energy_method", ""))}
    if profile.get("energy_note"):
        out["tierflow.energy.note"] = str(profile["energy_note"])[:1000]
    return out
