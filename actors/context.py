"""What a running stage can see and record. Collected in the actor, logged by the driver's hooks."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from storage import ArtifactRef, StoreConfig

PROGRESS_INTERVAL_S = 1.0


@dataclass(frozen=True)
class Metric:
    key: str
    value: float
    step: int
    timestamp_ms: int


@dataclass(frozen=True)
class SourceInput:
    """Data a stage read from outside the store (raw data): logged as an MLflow dataset."""

    name: str
    source: str
    digest: str
    num_rows: int | None = None


@dataclass
class StageContext:
    """Passed to a stage function that declares a `ctx` parameter."""

    run_id: str
    stage: str
    node_id: str
    device: str
    gpu_ids: list[Any] = field(default_factory=list)
    upstream: dict[str, dict[str, str]] = field(default_factory=dict)
    input_refs: dict[str, ArtifactRef] = field(default_factory=dict)
    store_config: StoreConfig | None = None
    metrics: list[Metric] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    sources: list[SourceInput] = field(default_factory=list)
    # Latest value per metric, published for the driver's live progress at most once per interval, the
    # first time once the stage has run that long: a short stage's metrics come with its result anyway, and a
    # publish is a synchronous round trip to Ray's GCS (~1/3 of a no-op stage's time in its actor).
    _latest: dict[str, float] = field(default_factory=dict, repr=False)
    _published_at: float = field(default_factory=time.monotonic, repr=False)

    def log_metric(self, key: str, value: float, step: int = 0) -> None:
        self.metrics.append(Metric(key, float(value), int(step), int(time.time() * 1000)))
        self._latest[key] = float(value)
        now = time.monotonic()
        if now - self._published_at >= PROGRESS_INTERVAL_S:
            self._published_at = now
            from actors.ray_api import publish_progress  # noqa: PLC0415  # keeps this module Ray-free to import

            publish_progress(self.run_id, self.stage, {"step": int(step), "metrics": dict(self._latest)})

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        for key, value in metrics.items():
            self.log_metric(key, value, step)

    def set_tag(self, key: str, value: Any) -> None:
        self.tags[key] = str(value)

    def log_source(self, name: str, source: str, digest: str, num_rows: int | None = None) -> None:
        """Record raw input read from outside tierflow's store, for lineage back to the data."""
        self.sources.append(SourceInput(name, source, digest, num_rows))
