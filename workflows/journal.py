"""The run journal: a run's state kept on the durable tier and rewritten (atomically) as stages commit.

It is what `--resume`, `tierflow runs` and `tierflow show` read. A stage is committed when its
manifest is on the durable tier; the journal records that fact plus where and how it ran.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass, field
from typing import Any

from storage import ArtifactNotFoundError, ArtifactStore
from workflows.errors import ValidationError
from workflows.hooks import CACHED, DONE, RUNNING, RunInfo, StageRecord

PREFIX, NAME = "runs", "journal"


class RunNotFoundError(ValidationError):
    """No journal for the requested run id."""


@dataclass
class StageEntry:
    status: str
    attempts: int = 0
    cache: str = "miss"
    digest: str = ""
    node_id: str = ""
    device: str = ""
    duration_s: float = 0.0
    error: str = ""
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass
class Journal:
    run_id: str
    workflow: str
    workflow_ref: str
    params: dict[str, dict[str, Any]]
    status: str
    started_at: float
    ended_at: float | None
    host: str
    pid: int
    annotations: dict[str, str]
    stages: dict[str, StageEntry]

    @property
    def duration_s(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.started_at

    def committed(self) -> list[str]:
        return [n for n, e in self.stages.items() if e.status in DONE]

    def driver_alive(self) -> bool | None:
        """True/False when the driver ran on this host; None when we cannot tell."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Journal:
        stages = {n: StageEntry(**e) for n, e in raw.pop("stages").items()}
        return cls(**raw, stages=stages)


def entry_for(record: StageRecord) -> StageEntry:
    res = record.result
    return StageEntry(
        status=record.status,
        attempts=record.attempts,
        cache=record.cache,
        digest=record.artifact.digest if record.artifact else "",
        node_id=res.node_id if res else "",
        device=res.device if res else "",
        duration_s=round(res.duration_s, 6) if res else 0.0,
        error=record.error,
        annotations=dict(record.annotations),
    )


class Journals:
    """Read and write journals in a store's durable tier."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        # stage -> (entry, its JSON): a rewrite re-encodes only the stages that changed, so a run of
        # N stages costs O(N) small string joins per event instead of O(N) JSON encodings.
        self._fragments: dict[tuple[str, str], tuple[StageEntry, str]] = {}

    def write(self, run: RunInfo, workflow_ref: str) -> Journal:
        journal = Journal(
            run_id=run.run_id,
            workflow=run.workflow.name,
            workflow_ref=workflow_ref,
            params=run.params,
            status=run.status,
            started_at=run.started_at,
            ended_at=run.ended_at,
            host=socket.gethostname(),
            pid=os.getpid(),
            annotations=dict(run.annotations),
            stages={n: entry_for(r) for n, r in run.records.items()},
        )
        head = {k: v for k, v in vars(journal).items() if k != "stages"}
        stages = ",\n".join(f"{json.dumps(n)}: {self._fragment(run.run_id, n, e)}" for n, e in journal.stages.items())
        self.store.put_document(
            (PREFIX, run.run_id, NAME), f'{json.dumps(head)[:-1]}, "stages": {{\n{stages}}}}}'.encode()
        )
        return journal

    def _fragment(self, run_id: str, name: str, entry: StageEntry) -> str:
        cached = self._fragments.get((run_id, name))
        if cached is None or cached[0] != entry:
            cached = (entry, json.dumps(asdict(entry)))
            self._fragments[(run_id, name)] = cached
        return cached[1]

    def exists(self, run_id: str) -> bool:
        try:
            self.store.get_document((PREFIX, run_id, NAME))
        except ArtifactNotFoundError:
            return False
        return True

    def read(self, run_id: str) -> Journal:
        try:
            return Journal.from_dict(self.store.get_document((PREFIX, run_id, NAME)))
        except ArtifactNotFoundError:
            raise RunNotFoundError(
                f"no run {run_id!r} in {self.store.durable.url}; list runs with `tierflow runs`"
            ) from None

    def list(self) -> list[Journal]:
        out = [Journal.from_dict(self.store.get_document(parts)) for parts in self.store.list_documents(PREFIX, NAME)]
        return sorted(out, key=lambda j: j.started_at)

    def unfinished(self, workflow: str) -> list[Journal]:
        """Runs of `workflow` still marked running whose driver is known to be gone."""
        return [j for j in self.list() if j.workflow == workflow and j.status == RUNNING and j.driver_alive() is False]


__all__ = ["CACHED", "Journal", "Journals", "RunNotFoundError", "StageEntry"]
