"""What a stage asks of the cluster. Declared, never coded (Hamilton / Dagster @asset)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from actors.errors import ResourceSpecError

FALLBACKS = ("cpu",)
_RESERVED = {"CPU", "GPU", "memory", "object_store_memory"}
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_MEM = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*")


def parse_memory(value: int | float | str | None, what: str = "memory") -> int | None:
    """Bytes from an int or a string such as '512MiB' or '2GB'."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ResourceSpecError(f"{what}={value!r} is a bool; give bytes or a string like '2GiB'")
    if isinstance(value, int | float):
        number, unit = float(value), ""
    elif isinstance(value, str) and (m := _MEM.fullmatch(value)):
        number, unit = float(m.group(1)), m.group(2).lower()
    else:
        raise ResourceSpecError(f"{what}={value!r} is not a size; give bytes or a string like '2GiB'")
    if unit not in _UNITS:
        raise ResourceSpecError(f"{what}={value!r}: unknown unit {unit!r}; use one of B, KB, MB, GB, KiB, MiB, GiB")
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ResourceSpecError(f"{what}={value!r} must be positive")
    return size


def _number(name: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ResourceSpecError(f"{name}={value!r} must be a finite number")
    if value < 0 or (positive and value == 0):
        raise ResourceSpecError(f"{name}={value!r} must be {'positive' if positive else 'zero or more'}")
    return float(value)


@dataclass(frozen=True)
class Resources:
    """A resource request. `fallback='cpu'` lets a GPU stage run on CPU when no node has the GPUs."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_bytes: int | None = None
    accelerator_type: str | None = None
    custom: dict[str, float] = field(default_factory=dict)
    fallback: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "cpus", _number("cpus", self.cpus, positive=True))
        gpus = _number("gpus", self.gpus, positive=False)
        if gpus > 1 and not gpus.is_integer():
            raise ResourceSpecError(f"gpus={self.gpus!r}: fractions are allowed below 1 only (Ray's rule)")
        object.__setattr__(self, "gpus", gpus)
        if self.memory_bytes is not None:
            object.__setattr__(self, "memory_bytes", parse_memory(self.memory_bytes))
        if self.accelerator_type is not None:
            if not isinstance(self.accelerator_type, str) or not self.accelerator_type.strip():
                raise ResourceSpecError(f"accelerator_type={self.accelerator_type!r} must be a name like 'A100'")
            if gpus == 0:
                raise ResourceSpecError(
                    f"accelerator_type={self.accelerator_type!r} needs gpus > 0; add gpus=1 (or a fraction)"
                )
        if not isinstance(self.custom, dict):
            raise ResourceSpecError(f"resources={self.custom!r} must be a dict of name -> amount")
        for key, amount in self.custom.items():
            if not isinstance(key, str) or not key or key in _RESERVED:
                raise ResourceSpecError(
                    f"custom resource {key!r} is not allowed; use cpus=, gpus= and memory= for {sorted(_RESERVED)}"
                )
            _number(f"resources[{key!r}]", amount, positive=True)
        object.__setattr__(self, "custom", {k: float(v) for k, v in self.custom.items()})
        if self.fallback is not None:
            if self.fallback not in FALLBACKS:
                raise ResourceSpecError(f"fallback={self.fallback!r}; the supported fallback is 'cpu'")
            if gpus == 0:
                raise ResourceSpecError("fallback='cpu' only makes sense for a stage that asks for gpus")

    def as_ray_resources(self) -> dict[str, float]:
        """The request in Ray's resource names (what `ray.nodes()` reports per node)."""
        out: dict[str, float] = {"CPU": self.cpus}
        if self.gpus:
            out["GPU"] = self.gpus
        if self.memory_bytes:
            out["memory"] = float(self.memory_bytes)
        if self.accelerator_type:
            out[f"accelerator_type:{self.accelerator_type}"] = 0.001
        out.update(self.custom)
        return out

    def cpu_fallback(self) -> Resources:
        """The same request without GPUs or accelerator: what runs on a CPU-only cluster."""
        return Resources(cpus=self.cpus, memory_bytes=self.memory_bytes, custom=dict(self.custom))

    def describe(self) -> str:
        parts = [f"cpus={self.cpus:g}"]
        if self.gpus:
            parts.append(f"gpus={self.gpus:g}")
        if self.accelerator_type:
            parts.append(f"accelerator={self.accelerator_type}")
        if self.memory_bytes:
            parts.append(f"memory={self.memory_bytes / 2**20:.0f}MiB")
        parts += [f"{k}={v:g}" for k, v in self.custom.items()]
        if self.fallback:
            parts.append(f"fallback={self.fallback}")
        return " ".join(parts)

    def shape(self) -> tuple:
        """Hashable key: stages with the same shape may share a warm actor."""
        return (self.cpus, self.gpus, self.memory_bytes, self.accelerator_type, tuple(sorted(self.custom.items())))
