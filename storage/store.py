"""The artifact store: content-addressed blobs over ordered tiers, plus immutable manifests.

Layout on every tier (Metaflow's datastore, re-hashing on read):
    blobs/ab/abcdef...            the encoded bytes, named by the sha256 of their plaintext
    manifests/<run>/<stage>.json  what an artifact is and who made it; written once, after the blob
    records/<run>/<stage>.json    what the stage that made it measured (JSON); written just before its manifest
    cache/<key>.json              stage cache key -> manifest of a committed output
    runs/<run>/journal.json       the run journal (workflows.journal)
Blobs are written to the durable tier first (an artifact is committed only once it is durable),
then to faster tiers within their capacity. Manifests, cache entries and journals live on the
durable tier only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any

import pyarrow as pa

from storage import formats
from storage.config import StoreConfig
from storage.errors import ArtifactNotFoundError, IntegrityError, StorageError
from storage.hashing import CHUNK_BYTES, content_digest
from storage.keys import validate_digest, validate_name
from storage.tiers import BLOBS, FsspecTier, MemoryTier, Tier, open_tier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArtifactRef:
    """The manifest of one committed artifact."""

    digest: str
    format: str
    size_bytes: int
    run_id: str
    stage: str
    uri: str
    schema: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    key_ids: dict[str, str] = field(default_factory=dict)  # tier role -> encryption key id

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (shallow: `asdict` would deep-copy the schema for every stage)."""
        return {f: getattr(self, f) for f in _REF_FIELDS}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True).encode()  # compact: the C encoder (indent is Python's)

    @classmethod
    def from_json(cls, data: bytes) -> ArtifactRef:
        try:
            ref = cls(**json.loads(data))
        except (ValueError, TypeError) as exc:
            raise IntegrityError(f"a manifest does not parse: {exc}") from exc
        validate_digest(ref.digest)
        return ref


_REF_FIELDS = tuple(f.name for f in fields(ArtifactRef))


@dataclass
class Repair:
    digest: str
    tier: str
    action: str  # "repaired" or "unrecoverable"


def sha256(data: bytes | memoryview) -> str:
    """The content digest blobs are named by (plain sha256 up to 16 MiB; see storage.hashing)."""
    return content_digest(data)


def blob_key(digest: str) -> str:
    validate_digest(digest)
    return f"{BLOBS}/{digest[:2]}/{digest}"


def manifest_key(run_id: str, stage: str) -> str:
    return f"manifests/{validate_name(run_id, 'run id')}/{validate_name(stage, 'stage name')}.json"


def record_key(run_id: str, stage: str) -> str:
    return f"records/{validate_name(run_id, 'run id')}/{validate_name(stage, 'stage name')}.json"


# Builds a stage's record once its manifest is known (the record names the digest it describes).
RecordFn = Callable[[ArtifactRef], Mapping[str, Any]]


def cache_key_path(key: str) -> str:
    return f"cache/{validate_digest(key)}.json"


def _doc_key(parts: tuple[str, ...]) -> str:
    if not parts:
        raise StorageError("a document path needs at least one segment")
    return "/".join(validate_name(p, "path segment") for p in parts) + ".json"


def _log_key(parts: tuple[str, ...]) -> str:
    return _doc_key(parts).removesuffix(".json") + ".jsonl"


class ArtifactStore:
    """Write-through to the durable tier, read from the fastest verified copy, repair what is corrupt."""

    def __init__(self, config: StoreConfig | None = None) -> None:
        self.config = config or StoreConfig.default()
        self.tiers: list[Tier] = [open_tier(spec) for spec in self.config.tiers]
        self.repairs: list[Repair] = []  # what reads found and fixed, for `verify` and tests

    @property
    def durable(self) -> Tier:
        return self.tiers[-1]

    @property
    def caches(self) -> list[Tier]:
        return self.tiers[:-1]

    # -- blobs ---------------------------------------------------------------------------------
    def _streams_blobs(self) -> bool:
        """Can blobs go to the durable tier as a stream, hashed while written (local, unencrypted)?"""
        durable = self.durable
        return isinstance(durable, FsspecTier) and durable.local and durable.key is None

    def put_blob(self, data: bytes | memoryview) -> str:
        if self._streams_blobs() and len(data) > CHUNK_BYTES:
            digest, _ = self.durable.write_content_addressed(blob_key, lambda sink: sink.write(data))
        else:
            digest = sha256(data)
            if not self.durable.exists(blob_key(digest)):  # same bytes are stored once
                self.durable.write(blob_key(digest), data)
        self._fill_caches(digest, data)
        return digest

    def _fill_caches(self, digest: str, data: bytes | memoryview | None) -> None:
        """Copy a blob just made durable into the cache tiers (from the durable file if `data` is None)."""
        key = blob_key(digest)
        for tier in reversed(self.caches):
            if not tier.exists(key):
                if data is None:
                    data = self.durable.mapped(key)  # just written, so in the page cache
                tier.put_cached(key, data)

    def get_blob(self, digest: str) -> bytes:
        """The verified bytes of `digest` from the fastest intact copy; corrupt copies are repaired.

        Bad bytes are never returned (so never decoded). Hot (in-process) copies were verified on entry.
        """
        from storage.crypto import CryptoError, WrongKeyError  # noqa: PLC0415

        key = blob_key(digest)
        corrupt: list[Tier] = []
        for i, tier in enumerate(self.tiers):
            if not tier.exists(key):
                continue
            try:
                data, found = tier.read_with_digest(key)
            except WrongKeyError:
                raise
            except (CryptoError, OSError) as exc:
                log.warning("blob %s in tier %s is unreadable (%s)", digest, tier.url, exc)
                corrupt.append(tier)
                continue
            if found != digest:
                log.warning("blob %s in tier %s fails its sha256 check; trying the next tier", digest, tier.url)
                corrupt.append(tier)
                continue
            for bad in corrupt:  # repair from this good copy
                bad.write(key, data)
                self.repairs.append(Repair(digest, bad.url, "repaired"))
                log.warning("repaired blob %s in tier %s", digest, bad.url)
            for faster in self.tiers[:i]:  # promote
                if faster not in corrupt and not faster.exists(key):
                    faster.put_cached(key, data)
            tier.touch(key)
            return data
        if corrupt:
            for bad in corrupt:
                self.repairs.append(Repair(digest, bad.url, "unrecoverable"))
            where = ", ".join(t.url for t in corrupt)
            raise IntegrityError(f"no intact copy of blob {digest}: corrupt in {where}; re-run the stage that made it")
        raise ArtifactNotFoundError(f"blob {digest} is in no tier ({', '.join(t.url for t in self.tiers)})")

    def verify_blob(self, digest: str) -> bool:
        """True if the durable tier holds an intact copy."""
        from storage.crypto import CryptoError  # noqa: PLC0415

        key = blob_key(digest)
        try:
            return self.durable.exists(key) and self.durable.read_with_digest(key)[1] == digest
        except CryptoError:
            return False

    @contextlib.contextmanager
    def pinned(self, digests: Iterable[str]) -> Iterator[None]:
        """Keep these blobs from being evicted from any cache tier (e.g. a running stage's inputs)."""
        tokens = [(tier, tier.pin(validate_digest(d))) for d in digests for tier in self.caches]
        try:
            yield
        finally:
            for tier, token in tokens:
                tier.unpin(token)

    # -- artifacts -----------------------------------------------------------------------------
    def put(self, value: Any, *, run_id: str, stage: str) -> ArtifactRef:
        """Encode, store the blob, then publish the manifest: the artifact is committed on return."""
        if (
            isinstance(value, pa.Table)
            and self._streams_blobs()
            and not any(isinstance(t, MemoryTier) for t in self.caches)
        ):
            # Arrow writes the IPC stream straight into the durable temp file while the pool hashes it:
            # no encoded copy of the table in memory. A hot tier needs that in-memory copy, so it encodes.
            key = manifest_key(run_id, stage)
            digest, size = self.durable.write_content_addressed(blob_key, partial(formats.write_arrow, value))
            self._fill_caches(digest, None)
            return self._publish(key, formats.ARROW, digest, size, formats.arrow_schema(value), run_id, stage, None)
        fmt, data, schema = formats.encode(value, allow_pickle=self.config.allow_pickle)
        return self.put_encoded(fmt, data, schema, run_id=run_id, stage=stage)

    def put_encoded(
        self,
        fmt: str,
        data: bytes | memoryview,
        schema: dict[str, Any],
        *,
        run_id: str,
        stage: str,
        record: RecordFn | None = None,
    ) -> ArtifactRef:
        """Store the blob, then `record(ref)` as the stage's record (if given), then the manifest."""
        key = manifest_key(run_id, stage)  # validate names before any byte is written
        digest = self.put_blob(data)
        return self._publish(key, fmt, digest, len(data), schema, run_id, stage, record)

    def _publish(
        self,
        key: str,
        fmt: str,
        digest: str,
        size: int,
        schema: dict[str, Any],
        run_id: str,
        stage: str,
        record: RecordFn | None,
    ) -> ArtifactRef:
        ref = ArtifactRef(
            digest=digest,
            format=fmt,
            size_bytes=size,
            run_id=run_id,
            stage=stage,
            uri=self.durable.url.rstrip("/") + "/" + blob_key(digest),
            schema=schema,
            created_at=time.time(),
            key_ids={t.role: t.key_id for t in self.tiers if t.key_id},
        )
        if self.durable.exists(key):
            old = ArtifactRef.from_json(self.durable.read(key))
            if old.digest != digest:
                raise StorageError(f"manifest {key} is already committed with digest {old.digest}; runs are immutable")
            return old  # committed together with its record (if any) by an earlier attempt
        if record is not None:
            # Before the manifest, so a committed artifact always has its record; a record without a
            # manifest (a kill in between) is overwritten by the next attempt and never read alone.
            doc = dict(record(ref))
            self.durable.write(record_key(run_id, stage), json.dumps(doc, sort_keys=True).encode())
        self.durable.write(key, ref.to_json())
        return ref

    def adopt(self, ref: ArtifactRef, *, run_id: str, stage: str) -> ArtifactRef:
        """Record an existing artifact (a cache hit) in another run's manifests; the producer stays."""
        key = manifest_key(run_id, stage)
        if not self.durable.exists(key):
            self.durable.write(key, ref.to_json())
        return ref

    def get(self, ref: ArtifactRef) -> Any:
        return formats.decode(ref.format, self.get_blob(ref.digest), allow_pickle=self.config.allow_pickle)

    def manifest(self, run_id: str, stage: str) -> ArtifactRef:
        key = manifest_key(run_id, stage)
        if not self.durable.exists(key):
            raise ArtifactNotFoundError(f"no committed artifact for stage {stage!r} of run {run_id!r}")
        return ArtifactRef.from_json(self.durable.read(key))

    def forget(self, run_id: str, stage: str) -> None:
        """Remove a stage's manifest (e.g. a superseded training checkpoint). Its blob stays until `store gc`
        finds nothing else referring to it."""
        self.durable.delete(manifest_key(run_id, stage))
        self.durable.delete(record_key(run_id, stage))

    def record(self, run_id: str, stage: str) -> dict[str, Any] | None:
        """The record committed with a stage's manifest in this run; None for a cache hit (adopted) or a
        manifest written before records existed."""
        key = record_key(run_id, stage)
        if not self.durable.exists(key):
            return None
        try:
            doc = json.loads(self.durable.read(key))
        except ValueError as exc:
            raise IntegrityError(f"record {key} does not parse: {exc}") from exc
        if not isinstance(doc, dict):
            raise IntegrityError(f"record {key} is not a JSON object")
        return doc

    def manifests(self, run_id: str | None = None) -> list[ArtifactRef]:
        prefix = f"manifests/{validate_name(run_id, 'run id')}" if run_id else "manifests"
        return [ArtifactRef.from_json(self.durable.read(k)) for k in self.durable.list(prefix) if k.endswith(".json")]

    # -- small documents (run journals) -------------------------------------------------------
    def put_document(self, parts: tuple[str, ...], doc: dict[str, Any] | bytes) -> None:
        """Atomically (re)write a JSON document (a dict, or JSON bytes) on the durable tier under validated
        path segments."""
        data = doc if isinstance(doc, bytes) else json.dumps(doc, indent=1).encode()  # keep insertion order
        self.durable.write(_doc_key(parts), data)

    def get_document(self, parts: tuple[str, ...]) -> dict[str, Any]:
        key = _doc_key(parts)
        if not self.durable.exists(key):
            raise ArtifactNotFoundError(f"no document {key} in {self.durable.url}")
        return json.loads(self.durable.read(key))

    def append_log(self, parts: tuple[str, ...], data: bytes) -> None:
        """Append to a line log (`<parts>.jsonl`) on the durable tier: a journal grows by what changed."""
        self.durable.append(_log_key(parts), data)

    def read_log(self, parts: tuple[str, ...]) -> bytes | None:
        key = _log_key(parts)
        return self.durable.read(key) if self.durable.exists(key) else None

    def delete_log(self, parts: tuple[str, ...]) -> None:
        self.durable.delete(_log_key(parts))

    def list_documents(self, prefix: str, name: str) -> list[tuple[str, ...]]:
        """Path segments of every `<prefix>/*/<name>.json` document."""
        found = self.durable.list(validate_name(prefix, "prefix"))
        return [tuple(k.removesuffix(".json").split("/")) for k in found if k.endswith(f"/{name}.json")]

    # -- group commit --------------------------------------------------------------------------
    @property
    def group_commits(self) -> bool:
        """Can commits skip per-file fsyncs and be made durable by one `barrier()` (a local durable tier)?"""
        durable = self.durable
        return isinstance(durable, FsspecTier) and durable.local

    @contextlib.contextmanager
    def deferred_sync(self) -> Iterator[None]:
        """Write blobs, records and manifests without fsync; they are committed once `barrier()` returns.
        Until then they survive a killed process (page cache) but not a machine crash; a reader that finds a
        torn one re-runs the stage (blobs are re-hashed, manifests parsed)."""
        durable = self.durable
        if not isinstance(durable, FsspecTier):
            yield
            return
        durable.defer_sync = True
        try:
            yield
        finally:
            durable.defer_sync = False

    def barrier(self) -> None:
        """Make every write so far durable (one syncfs for a batch of stages)."""
        self.durable.barrier()

    # -- stage cache ---------------------------------------------------------------------------
    def record_cache(self, key: str, ref: ArtifactRef) -> None:
        self.durable.write(cache_key_path(key), ref.to_json())

    def lookup_cache(self, key: str) -> ArtifactRef | None:
        """The committed output for a cache key, only if its blob is present and verifies."""
        path = cache_key_path(key)
        if not self.durable.exists(path):
            return None
        ref = ArtifactRef.from_json(self.durable.read(path))
        if not self.verify_blob(ref.digest):
            log.warning("cache entry %s points at missing or corrupt blob %s; re-running", key, ref.digest)
            return None
        return ref
