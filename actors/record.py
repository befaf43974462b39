"""A stage's record: what it measured (a `StageResult` minus its manifest), as JSON.

Written by the actor just before the stage's manifest (`ArtifactStore.put_encoded(record=...)`), so a
committed artifact always has its record, and a resumed run can log the stage as if its driver had lived.
JSON only: a record is read back by drivers of other versions and must never run code when loaded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from actors.context import Metric, SourceInput
from actors.errors import RecordError
from actors.runner import StageResult
from storage import ArtifactRef
from storage.errors import StorageError

VERSION = 1
_KEYS = frozenset(
    {
        "version", "run_id", "stage", "digest", "cache_key", "attempt", "node_id", "node_ip", "pid", "device",
        "gpu_ids", "cuda_visible_devices", "started_at", "duration_s", "metrics", "tags", "sources", "inputs",
        "streams",
    }
)  # fmt: skip
_OPTIONAL = frozenset({"profile"})  # added after VERSION 1 shipped: records without it still read
_METRIC_KEYS = frozenset({"key", "value", "step", "timestamp_ms"})
_SOURCE_KEYS = frozenset({"name", "source", "digest", "num_rows"})


@dataclass(frozen=True)
class RestoredStage:
    """What a record gives back to a resumed driver."""

    result: StageResult
    inputs: dict[str, ArtifactRef] = field(default_factory=dict)  # param -> upstream artifact it read
    cache_key: str = ""
    attempt: int = 0


def to_record(
    result: StageResult, *, run_id: str, cache_key: str, attempt: int, inputs: dict[str, ArtifactRef]
) -> dict[str, Any]:
    """The JSON document for `result` (whose `artifact` is the manifest about to be committed)."""
    return {
        "version": VERSION,
        "run_id": run_id,
        "stage": result.stage,
        "digest": result.artifact.digest,
        "cache_key": cache_key,
        "attempt": attempt,
        "node_id": result.node_id,
        "node_ip": result.node_ip,
        "pid": result.pid,
        "device": result.device,
        "gpu_ids": [g if isinstance(g, int | str) else str(g) for g in result.gpu_ids],
        "cuda_visible_devices": result.cuda_visible_devices,
        "started_at": result.started_at,
        "duration_s": result.duration_s,
        # Field by field, not `asdict`: it deep-copies, and a record is built for every stage.
        "metrics": [
            {"key": m.key, "value": m.value, "step": m.step, "timestamp_ms": m.timestamp_ms} for m in result.metrics
        ],
        "tags": {str(k): str(v) for k, v in result.tags.items()},
        "sources": [asdict(s) for s in result.sources],
        "inputs": {p: ref.to_dict() for p, ref in inputs.items()},
        # Facts only: a stream's own stage has its own record; its artifact is among `inputs`.
        "streams": {s: {**asdict(c), "artifact": c.artifact.digest} for s, c in result.streams.items()},
        "profile": result.profile,  # actors.stage_profile: JSON-safe numbers and strings
    }


def from_record(doc: dict[str, Any], artifact: ArtifactRef, *, run_id: str, stage: str) -> RestoredStage:
    """Rebuild the result of the stage whose committed manifest is `artifact`; raise `RecordError` if the
    document is malformed or describes another run, stage or digest."""
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise RecordError(f"a stage record has version {_get(doc, 'version')!r}; this tierflow reads {VERSION}")
    if set(doc) - _OPTIONAL != _KEYS:
        raise RecordError(f"a stage record has keys {sorted((set(doc) - _OPTIONAL) ^ _KEYS)} it should not / lacks")
    profile = doc.get("profile", {})
    if not isinstance(profile, dict):
        raise RecordError("a stage record's profile must be a JSON object")
    for key, want in {"run_id": run_id, "stage": stage, "digest": artifact.digest}.items():
        if doc[key] != want:
            raise RecordError(f"the record of stage {doc['stage']!r} names {key} {doc[key]!r}, not {want!r}")
    try:
        metrics = [Metric(**_exact(m, _METRIC_KEYS, "metric")) for m in doc["metrics"]]
        metrics = [Metric(str(m.key), float(m.value), int(m.step), int(m.timestamp_ms)) for m in metrics]
        sources = [SourceInput(**_exact(s, _SOURCE_KEYS, "source")) for s in doc["sources"]]
        inputs = {str(p): ArtifactRef.from_json(json.dumps(r).encode()) for p, r in doc["inputs"].items()}
        tags = doc["tags"]
        if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
            raise RecordError("a stage record's tags must map names to strings")
        result = StageResult(
            stage=str(doc["stage"]),
            artifact=artifact,
            node_id=str(doc["node_id"]),
            node_ip=str(doc["node_ip"]),
            pid=int(doc["pid"]),
            device=str(doc["device"]),
            gpu_ids=list(doc["gpu_ids"]),
            cuda_visible_devices=str(doc["cuda_visible_devices"]),
            started_at=float(doc["started_at"]),
            duration_s=float(doc["duration_s"]),
            metrics=metrics,
            tags=dict(tags),
            sources=sources,
            profile=dict(profile),
        )
        return RestoredStage(result, inputs, str(doc["cache_key"]), int(doc["attempt"]))
    except (TypeError, ValueError, AttributeError, StorageError) as exc:
        if isinstance(exc, RecordError):
            raise
        raise RecordError(f"the record of stage {doc['stage']!r} is malformed: {exc}") from exc


def _exact(item: Any, keys: frozenset[str], what: str) -> dict[str, Any]:
    if not isinstance(item, dict) or set(item) != keys:
        raise RecordError(f"a {what} in a stage record must have exactly the keys {sorted(keys)}")
    return item


def _get(doc: Any, key: str) -> Any:
    return doc.get(key) if isinstance(doc, dict) else None


__all__ = ["VERSION", "RestoredStage", "from_record", "to_record"]
