"""What a stage asks of the cluster. Declared, never coded (Hamilton / Dagster @asset)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from actors.errors import ResourceSpecError
from storage.units import parse_size

FALLBACKS = ("cpu",)
_RESERVED = {"CPU", "GPU", "memory", "object_store_memory"}


def parse_memory(value: int | float | str | None, what: str = "memory") -> int | None:
    """Bytes from an int or a string such as '512MiB' or '2GB'."""
    if value is None:
        return None
    try:
        return parse_size(value, what)
    except ValueError as exc:
        raise ResourceSpecError(str(exc)) from None


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
        """Hashable key: stages with the same shape may share a warm actor. Computed once: the driver asks it
        several times per stage and turn (frozen, so the key cannot go stale; kept outside the fields)."""
        try:
            return self.__dict__["_shape"]
        except KeyError:
            key = (self.cpus, self.gpus, self.memory_bytes, self.accelerator_type, tuple(sorted(self.custom.items())))
            self.__dict__["_shape"] = key
            return key
