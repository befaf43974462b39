"""Run state shared with lifecycle hooks. Hooks (MLflow lineage, progress output) observe the
engine through keyword-only callbacks instead of living inside it (Hamilton's lifecycle hooks)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from actors.placement import PlacementDecision
from actors.runner import StageResult
from storage import ArtifactRef, StoreConfig

PENDING, RUNNING, RETRYING, SUCCEEDED, CACHED, FAILED, NOT_RUN, CANCELLED = (
    "pending",
    "running",
    "retrying",
    "succeeded",
    "cached",
    "failed",
    "not_run",
    "cancelled",
)
DONE = (SUCCEEDED, CACHED)


@dataclass
class StageRecord:
    name: str
    decision: PlacementDecision
    params: dict[str, Any]
    status: str = PENDING
    cache_key: str = ""
    artifact: ArtifactRef | None = None
    result: StageResult | None = None
    inputs: dict[str, ArtifactRef] = field(default_factory=dict)
    error: str = ""
    annotations: dict[str, str] = field(default_factory=dict)
    attempts: int = 0
    restored: bool = False  # committed by an earlier driver of this run (--resume)

    @property
    def cache(self) -> str:
        return "hit" if self.status == CACHED else "miss"


@dataclass
class RunInfo:
    run_id: str
    workflow: Any  # workflows.model.Workflow (kept loose to avoid an import cycle)
    params: dict[str, dict[str, Any]]
    records: dict[str, StageRecord]
    store_config: StoreConfig
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    status: str = RUNNING
    annotations: dict[str, str] = field(default_factory=dict)
    resumed: bool = False
    workflow_ref: str = ""

    @property
    def duration_s(self) -> float:
        return (self.ended_at or time.time()) - self.started_at


class RunHook(Protocol):
    """Lifecycle callbacks. A hook may also define `on_stage_start(*, run, record)`; it is optional."""

    def on_run_start(self, *, run: RunInfo) -> None: ...

    def on_stage_end(self, *, run: RunInfo, record: StageRecord) -> None: ...

    def on_run_end(self, *, run: RunInfo, error: BaseException | None) -> None: ...
