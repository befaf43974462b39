"""The run journal: a run's state on the durable tier, for `--resume`, `tierflow runs` and `tierflow show`.

A stage is committed when its manifest is on the durable tier; the journal records that fact plus
where and how it ran. Two files per run, so a turn of the driver costs what changed, not the run size:
    runs/<run>/journal.json   the head (run id, workflow, params, status, stage order), rewritten atomically
                              at run start and end. A finished run's head also holds every stage entry
                              ("stages": the format older tierflow reads), and its log is then deleted.
    runs/<run>/stages.jsonl   while running: one JSON object per line, {"stage": name, **StageEntry},
                              appended in batches; the last line of a stage wins. A torn last line (a
                              driver killed mid-append) is skipped, and a new driver starts on a fresh line.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass, field, fields
from typing import Any

from storage import ArtifactNotFoundError, ArtifactStore
from workflows.errors import ValidationError
from workflows.hooks import CACHED, DONE, PENDING, RUNNING, RunInfo, StageRecord

log = logging.getLogger(__name__)

PREFIX, NAME, LOG = "runs", "journal", "stages"
FORMAT = 2  # 1: one document with every stage, rewritten on each change


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
    placement: str = ""  # the placement decision's label, e.g. "waits for a launchable node of type worker_gpu"


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
    def from_dict(cls, raw: dict[str, Any], log_lines: bytes | None = None) -> Journal:
        """A format-1 document, a finished format-2 head (both hold "stages"), or a running head + its log."""
        raw = dict(raw)
        raw.pop("format", None)
        order = raw.pop("order", None)
        if "stages" in raw:
            stages = {n: _entry(e) for n, e in raw.pop("stages").items()}
        else:
            stages = {n: StageEntry(status=PENDING) for n in order or ()}
            stages.update(replay(log_lines or b""))
        return cls(**raw, stages=stages)


_ENTRY_FIELDS = frozenset(f.name for f in fields(StageEntry))


def _entry(raw: dict[str, Any]) -> StageEntry:
    return StageEntry(**{k: v for k, v in raw.items() if k in _ENTRY_FIELDS})  # newer writers may add fields


def replay(data: bytes) -> dict[str, StageEntry]:
    """Stage entries from an appended log: the last line of each stage wins; unparsable lines are skipped
    (a torn last line is expected after a kill; one in the middle is reported)."""
    out: dict[str, StageEntry] = {}
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            out[raw.pop("stage")] = _entry(raw)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            if i < len(lines) - 1:  # the last piece has no newline after it: torn by a kill, not corrupt
                log.warning("journal line %d is unreadable and skipped (%s)", i + 1, exc)
    return out


_ENTRY_FIELDS = tuple(f.name for f in fields(StageEntry))


def _fields(entry: StageEntry) -> dict[str, Any]:
    """Shallow `asdict`: an entry holds no nested dataclasses, and asdict's deep copy is per stage and flush."""
    return {f: getattr(entry, f) for f in _ENTRY_FIELDS}


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
        placement=record.decision.label,
    )


class Journals:
    """Read and write journals in a store's durable tier."""

    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        self._appending: set[str] = set()  # runs this process has appended to (see `append`)

    def start(self, run: RunInfo, workflow_ref: str) -> None:
        """Write the head of a running run, and the entries of stages past pending. A resumed run appends
        every entry: they supersede what its earlier driver's log says (a stage it left running is pending)."""
        head = {"format": FORMAT, **_head(run, workflow_ref), "order": list(run.records)}
        self.store.put_document((PREFIX, run.run_id, NAME), json.dumps(head).encode())
        self.append(run, [n for n, r in run.records.items() if run.resumed or r.status != PENDING])

    def append(self, run: RunInfo, names: list[str]) -> None:
        """Append the current entries of `names`: O(len(names)), whatever the size of the run."""
        if not names:
            return
        lines = [json.dumps({"stage": n, **_fields(entry_for(run.records[n]))}) for n in names]
        # A driver's first batch starts on a fresh line: an earlier driver may have left a torn one.
        first = run.run_id not in self._appending
        self._appending.add(run.run_id)
        self.store.append_log((PREFIX, run.run_id, LOG), (("\n" if first else "") + "\n".join(lines) + "\n").encode())

    def finish(self, run: RunInfo, workflow_ref: str) -> Journal:
        """Compact: the head with every stage entry (one document, as format 1 readers expect), then drop the log."""
        journal = Journal(**_head(run, workflow_ref), stages={n: entry_for(r) for n, r in run.records.items()})
        self.write_document(journal)
        self.store.delete_log((PREFIX, run.run_id, LOG))
        self._appending.discard(run.run_id)
        return journal

    def write(self, run: RunInfo, workflow_ref: str) -> Journal:
        """The whole journal in one document (format 1): O(stages); the driver uses start/append/finish."""
        return self.finish(run, workflow_ref)

    def write_document(self, journal: Journal) -> None:
        doc = {k: v for k, v in vars(journal).items() if k != "stages"}
        stages = ",\n".join(f"{json.dumps(n)}: {json.dumps(_fields(e))}" for n, e in journal.stages.items())
        self.store.put_document(
            (PREFIX, journal.run_id, NAME), f'{json.dumps(doc)[:-1]}, "stages": {{\n{stages}}}}}'.encode()
        )

    def exists(self, run_id: str) -> bool:
        try:
            self.store.get_document((PREFIX, run_id, NAME))
        except ArtifactNotFoundError:
            return False
        return True

    def read(self, run_id: str) -> Journal:
        try:
            return self._load((PREFIX, run_id, NAME))
        except ArtifactNotFoundError:
            raise RunNotFoundError(
                f"no run {run_id!r} in {self.store.durable.url}; list runs with `tierflow runs`"
            ) from None

    def list(self) -> list[Journal]:
        out = [self._load(parts) for parts in self.store.list_documents(PREFIX, NAME)]
        return sorted(out, key=lambda j: j.started_at)

    def unfinished(self, workflow: str) -> list[Journal]:
        """Runs of `workflow` still marked running whose driver is known to be gone."""
        return [j for j in self.list() if j.workflow == workflow and j.status == RUNNING and j.driver_alive() is False]

    def _load(self, parts: tuple[str, ...]) -> Journal:
        raw = self.store.get_document(parts)
        lines = None if "stages" in raw else self.store.read_log((*parts[:-1], LOG))
        return Journal.from_dict(raw, lines)


def _head(run: RunInfo, workflow_ref: str) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "workflow": run.workflow.name,
        "workflow_ref": workflow_ref,
        "params": run.params,
        "status": run.status,
        "started_at": run.started_at,
        "ended_at": run.ended_at,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "annotations": dict(run.annotations),
    }


__all__ = ["CACHED", "Journal", "Journals", "RunNotFoundError", "StageEntry"]
