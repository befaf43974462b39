"""Energy of one stage, measured where the hardware allows it and labelled with how it was obtained.

Methods, best first (the `tierflow.energy.method` tag names the ones used, e.g. `nvml+rapl`):
- `nvml`: the GPUs Ray assigned the stage, from NVML's total-energy counter (mJ since the driver loaded).
- `rapl`: CPU package energy from powercap sysfs (`intel-rapl:N/energy_uj`, wrapping at `max_energy_range_uj`),
  apportioned to the stage by its share of the node's busy CPU time over the same window (`/proc/stat`).
- `estimate`: CPU-seconds x `cpu_watts_per_core` (and, for a stage on CUDA without NVML, wall time x
  `gpu_watts` per GPU). A reader that fails falls back to this and the reason goes in `note`.

Both counters are machine-wide, so concurrent stages on one node each see the whole package: RAPL is
apportioned by CPU time for that reason; NVML is per GPU and Ray does not share a whole GPU between stages
unless they ask for fractions (then each fraction's stage sees the GPU's whole draw, said in `note`).
"""

from __future__ import annotations

import glob
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_CPU_WATTS_PER_CORE = 10.0  # ~ a server core's share of package power at full load (TDP 150-250 W / 16-24 cores)
DEFAULT_GPU_WATTS = 150.0  # an A10G's board power limit; only used when NVML is unavailable on a CUDA stage
ENV_CPU_WATTS = "TIERFLOW_CPU_WATTS_PER_CORE"
ENV_GPU_WATTS = "TIERFLOW_GPU_WATTS"
ENV_POWERCAP = "TIERFLOW_POWERCAP_ROOT"
ESTIMATE, RAPL, NVML = "estimate", "rapl", "nvml"
_PKG = re.compile(r"intel-rapl:\d+$")  # packages; intel-rapl:N:M are their sub-domains (core, dram), not added again


class EnergyReadError(RuntimeError):
    """A hardware counter could not be read; the meter falls back to the estimate and says why."""


@dataclass(frozen=True)
class EnergyConfig:
    """How stage energy is measured. Read in the stage actor from the environment (`from_env`)."""

    cpu_watts_per_core: float = DEFAULT_CPU_WATTS_PER_CORE
    gpu_watts: float = DEFAULT_GPU_WATTS
    powercap_root: str = "/sys/class/powercap"
    proc_stat: str = "/proc/stat"
    use_rapl: bool = True
    use_nvml: bool = True

    def __post_init__(self) -> None:
        for name in ("cpu_watts_per_core", "gpu_watts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"EnergyConfig.{name}={value!r} must be a finite number of watts >= 0")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> EnergyConfig:
        """`TIERFLOW_CPU_WATTS_PER_CORE`, `TIERFLOW_GPU_WATTS`, `TIERFLOW_POWERCAP_ROOT` (on a cluster, set them
        in the job's runtime_env so the stage actors see them)."""
        env = os.environ if env is None else env  # read three keys: no copy of the environment per stage
        kwargs: dict[str, Any] = {}
        for key, name in ((ENV_CPU_WATTS, "cpu_watts_per_core"), (ENV_GPU_WATTS, "gpu_watts")):
            if key in env:
                try:
                    kwargs[name] = float(env[key])
                except ValueError:
                    raise ValueError(f"{key}={env[key]!r} is not a number of watts; e.g. {key}=12.5") from None
        if ENV_POWERCAP in env:
            kwargs["powercap_root"] = env[ENV_POWERCAP]
        return cls(**kwargs)


@dataclass(frozen=True)
class EnergyReading:
    """A stage's energy and how it was obtained."""

    energy_j: float
    cpu_j: float
    gpu_j: float
    method: str  # e.g. "rapl", "nvml+estimate", "estimate"
    note: str = ""  # why a reader fell back, or a caveat of the method

    def metrics(self) -> dict[str, float]:
        return {"energy_j": self.energy_j, "energy_cpu_j": self.cpu_j, "energy_gpu_j": self.gpu_j}

    def tags(self) -> dict[str, str]:
        out = {"tierflow.energy.method": self.method}
        if self.note:
            out["tierflow.energy.note"] = self.note[:1000]
        return out


# -- RAPL ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RaplSample:
    energy_uj: dict[str, int]  # package path -> counter
    max_uj: dict[str, int]
    busy_jiffies: int  # node-wide busy CPU time from /proc/stat


_PACKAGES_TTL_S = 60.0  # packages do not come and go; listing them is a directory scan per stage start
_packages: dict[str, tuple[float, list[str]]] = {}  # root -> (when listed, packages)


def rapl_packages(root: str) -> list[str]:
    now = time.monotonic()
    listed = _packages.get(root)
    if listed is None or now - listed[0] > _PACKAGES_TTL_S:
        found = sorted(p for p in glob.glob(os.path.join(root, "intel-rapl:*")) if _PKG.search(p))
        _packages[root] = listed = (now, found)
    return list(listed[1])


def read_rapl(root: str, proc_stat: str) -> RaplSample:
    packages = rapl_packages(root)
    if not packages:
        raise EnergyReadError(f"no RAPL packages under {root} (not an Intel/AMD host with powercap, or a VM)")
    energy, max_range = {}, {}
    for pkg in packages:
        try:
            with open(os.path.join(pkg, "energy_uj")) as f:
                energy[pkg] = int(f.read().strip())
            with open(os.path.join(pkg, "max_energy_range_uj")) as f:
                max_range[pkg] = int(f.read().strip())
        except PermissionError:
            raise EnergyReadError(
                f"{pkg}/energy_uj is not readable (root-only since the 2020 PLATYPUS fix); "
                "grant read access (e.g. a udev rule or chmod o+r) to measure CPU energy"
            ) from None
        except (OSError, ValueError) as exc:
            raise EnergyReadError(f"reading {pkg}: {exc}") from None
    return RaplSample(energy, max_range, _busy_jiffies(proc_stat))


def rapl_delta_uj(before: RaplSample, after: RaplSample) -> int:
    """Package energy between two samples, across a counter wrap (it restarts at 0 past max_energy_range_uj)."""
    total = 0
    for pkg, start in before.energy_uj.items():
        end = after.energy_uj.get(pkg, start)
        total += end - start if end >= start else end + before.max_uj[pkg] - start
    return total


def _busy_jiffies(path: str) -> int:
    try:
        with open(path) as f:
            first = f.readline().split()
    except OSError as exc:
        raise EnergyReadError(f"cannot read {path} to apportion package energy: {exc}") from None
    if not first or first[0] != "cpu":
        raise EnergyReadError(f"{path} does not start with the aggregate 'cpu' line")
    values = [int(v) for v in first[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is inside user)


# -- NVML ------------------------------------------------------------------------------------------
def default_nvml() -> Any:
    """The `pynvml` module of nvidia-ml-py, initialised; raises EnergyReadError when it is absent or fails."""
    try:
        import pynvml  # noqa: PLC0415  # optional: `pip install tierflow[energy]`
    except ImportError:
        raise EnergyReadError("nvidia-ml-py is not installed (pip install 'tierflow[energy]')") from None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        raise EnergyReadError(f"NVML did not initialise ({type(exc).__name__}: {exc})") from None
    return pynvml


def read_nvml_mj(nvml: Any, gpu_ids: list[Any]) -> dict[str, int]:
    """Total-energy counters (mJ) of the GPUs Ray assigned (`ray.get_gpu_ids()`: physical indices or UUIDs)."""
    out = {}
    for gid in gpu_ids:
        try:
            text = str(gid)
            if text.isdigit():
                handle = nvml.nvmlDeviceGetHandleByIndex(int(text))
            else:
                handle = nvml.nvmlDeviceGetHandleByUUID(text)
            out[text] = int(nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        except Exception as exc:  # NVMLError_NotSupported on pre-Volta GPUs, an unknown id, ...
            raise EnergyReadError(f"NVML total energy of GPU {gid!r}: {type(exc).__name__}: {exc}") from None
    return out


# -- the meter -------------------------------------------------------------------------------------
@dataclass
class EnergyMeter:
    """Samples the counters at a stage's start and end. One per stage execution."""

    config: EnergyConfig
    gpu_ids: list[Any] = field(default_factory=list)
    on_cuda: bool = False  # the stage's device is CUDA (a GPU assigned but unusable draws ~idle: not counted)
    gpu_fraction: float = 1.0  # the stage's share of each assigned GPU (Ray fractional GPUs)
    nvml_factory: Callable[[], Any] = default_nvml
    _rapl0: RaplSample | None = None
    _nvml: Any = None
    _gpu0: dict[str, int] = field(default_factory=dict)
    _notes: list[str] = field(default_factory=list)

    def start(self) -> None:
        self._notes.clear()
        if self.config.use_rapl:
            try:
                self._rapl0 = read_rapl(self.config.powercap_root, self.config.proc_stat)
            except EnergyReadError as exc:
                self._notes.append(f"rapl: {exc}")
        if self.gpu_ids and self.on_cuda and self.config.use_nvml:
            try:
                self._nvml = self.nvml_factory()
                self._gpu0 = read_nvml_mj(self._nvml, self.gpu_ids)
            except EnergyReadError as exc:
                self._nvml = None
                self._notes.append(f"nvml: {exc}")

    def stop(self, *, cpu_s: float, wall_s: float) -> EnergyReading:
        methods, notes = [], list(self._notes)
        gpu_j = 0.0
        if self.gpu_ids and self.on_cuda:
            if self._nvml is not None:
                try:
                    after = read_nvml_mj(self._nvml, self.gpu_ids)
                    gpu_j = sum(after[g] - self._gpu0[g] for g in self._gpu0) / 1000.0
                    methods.append(NVML)
                    if self.gpu_fraction < 1:
                        notes.append("nvml: a fractional GPU sees the whole device's draw")
                except EnergyReadError as exc:
                    notes.append(f"nvml: {exc}")
            if NVML not in methods:
                gpu_j = self.config.gpu_watts * wall_s * len(self.gpu_ids) * min(self.gpu_fraction, 1.0)
                methods.append(ESTIMATE)
        cpu_j = None
        if self._rapl0 is not None:
            try:
                after_rapl = read_rapl(self.config.powercap_root, self.config.proc_stat)
                package_j = rapl_delta_uj(self._rapl0, after_rapl) / 1e6
                busy_s = (after_rapl.busy_jiffies - self._rapl0.busy_jiffies) / _clock_ticks()
                share = min(1.0, cpu_s / busy_s) if busy_s > 0 else 1.0
                cpu_j = package_j * share
                methods.append(RAPL)
            except EnergyReadError as exc:
                notes.append(f"rapl: {exc}")
        if cpu_j is None:
            cpu_j = cpu_s * self.config.cpu_watts_per_core
            if ESTIMATE not in methods:
                methods.append(ESTIMATE)
        method = "+".join(dict.fromkeys(methods))
        return EnergyReading(cpu_j + gpu_j, cpu_j, gpu_j, method, "; ".join(notes))


def estimate_j(cpu_s: float, config: EnergyConfig, gpu_s: float = 0.0) -> float:
    """The estimate method's accounting: what the planner predicts with and what `estimate` stages log."""
    return cpu_s * config.cpu_watts_per_core + gpu_s * config.gpu_watts


def _clock_ticks() -> float:
    try:
        return float(os.sysconf("SC_CLK_TCK"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not Linux
        return 100.0


__all__ = [
    "DEFAULT_CPU_WATTS_PER_CORE",
    "DEFAULT_GPU_WATTS",
    "EnergyConfig",
    "EnergyMeter",
    "EnergyReadError",
    "EnergyReading",
    "estimate_j",
    "rapl_delta_uj",
    "read_nvml_mj",
    "read_rapl",
]
