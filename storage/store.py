"""The artifact store: content-addressed blobs over ordered tiers, plus immutable manifests.

Layout on every tier (Metaflow's datastore, re-hashing on read):
    blobs/ab/abcdef...           the encoded bytes, named by their sha256
    manifests/<run>/<stage>.json what an artifact is and who made it; written once, after the blob
    cache/<key>.json             stage cache key -> manifest of a committed output
An artifact is committed once its blob and manifest are on the durable (last) tier.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from storage import formats
from storage.errors import ArtifactNotFoundError, IntegrityError, StorageError
from storage.keys import validate_digest, validate_name
from storage.tiers import DURABLE, HOT, Tier, TierSpec

log = logging.getLogger(__name__)

ENV_TIERS = "TIERFLOW_STORE"


@dataclass(frozen=True)
class StoreConfig:
    """Tiers fastest first; the last one is durable. Plain data so it travels to Ray actors."""

    tiers: tuple[TierSpec, ...]

    def __post_init__(self) -> None:
        if not self.tiers:
            raise StorageError("a store needs at least one tier; the last one must be durable")
        if self.tiers[-1].role != DURABLE:
            raise StorageError(f"the last tier ({self.tiers[-1].url}) must have role 'durable'")

    @classmethod
    def from_urls(cls, urls: list[str] | str) -> StoreConfig:
        """`memory://x,/data/store`: every URL but the last is hot, the last is durable."""
        items = [u.strip() for u in (urls.split(",") if isinstance(urls, str) else urls) if u.strip()]
        if not items:
            raise StorageError(f"no tier URLs given; expected e.g. memory://tierflow,{default_durable_url()}")
        items = [_absolute(u) for u in items]
        roles = [HOT] * (len(items) - 1) + [DURABLE]
        return cls(tuple(TierSpec(u, r) for u, r in zip(items, roles, strict=True)))

    @classmethod
    def default(cls) -> StoreConfig:
        """`$TIERFLOW_STORE` if set, else memory + `./.tierflow/store` under the working directory."""
        env = os.environ.get(ENV_TIERS)
        return cls.from_urls(env) if env else cls.from_urls(["memory://tierflow", default_durable_url()])

    @property
    def durable_url(self) -> str:
        return self.tiers[-1].url


# Set by Ray's job supervisor for the driver of a `ray job submit` job, whose cwd is an unpacked,
# temporary copy of the working dir: defaults there would vanish with the job.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def default_home() -> str:
    """`./.tierflow` normally; `~/.tierflow` inside a submitted Ray job."""
    if os.environ.get(RAY_JOB_ENV):
        return os.path.join(os.path.expanduser("~"), ".tierflow")
    return os.path.abspath(".tierflow")


def default_durable_url() -> str:
    return os.path.join(default_home(), "store")


def _absolute(url: str) -> str:
    # A relative local path must mean the driver's cwd, not each Ray worker's.
    return url if "://" in url else os.path.abspath(url)


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

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ArtifactRef:
        raw = json.loads(data)
        ref = cls(**raw)
        validate_digest(ref.digest)
        return ref


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob_key(digest: str) -> str:
    validate_digest(digest)
    return f"blobs/{digest[:2]}/{digest}"


def manifest_key(run_id: str, stage: str) -> str:
    return f"manifests/{validate_name(run_id, 'run id')}/{validate_name(stage, 'stage name')}.json"


def _doc_key(parts: tuple[str, ...]) -> str:
    if not parts:
        raise StorageError("a document path needs at least one segment")
    return "/".join(validate_name(p, "path segment") for p in parts) + ".json"


def cache_key_path(key: str) -> str:
    return f"cache/{validate_digest(key)}.json"


class ArtifactStore:
    """Write-through to the durable tier, read from the fastest verified copy."""

    def __init__(self, config: StoreConfig | None = None) -> None:
        self.config = config or StoreConfig.default()
        self.tiers = [Tier(spec) for spec in self.config.tiers]

    @property
    def durable(self) -> Tier:
        return self.tiers[-1]

    # -- blobs ---------------------------------------------------------------------------------
    def put_blob(self, data: bytes) -> str:
        digest = sha256(data)
        key = blob_key(digest)
        for tier in self.tiers:
            if not tier.exists(key):  # same bytes are stored once
                tier.write(key, data)
        return digest

    def get_blob(self, digest: str) -> bytes:
        """The verified bytes of `digest`; a corrupt copy is skipped and reported, never returned."""
        key = blob_key(digest)
        problems = []
        for i, tier in enumerate(self.tiers):
            if not tier.exists(key):
                continue
            data = tier.read(key)
            if sha256(data) != digest:
                problems.append(f"corrupt copy in {tier.url}")
                log.warning("blob %s in tier %s fails its sha256 check; trying the next tier", digest, tier.url)
                continue
            for faster in self.tiers[:i]:  # promote
                faster.write(key, data)
            return data
        if problems:
            raise IntegrityError(f"no intact copy of blob {digest}: {'; '.join(problems)}")
        raise ArtifactNotFoundError(f"blob {digest} is in no tier ({', '.join(t.url for t in self.tiers)})")

    def verify_blob(self, digest: str) -> bool:
        """True if the durable tier holds an intact copy."""
        key = blob_key(digest)
        return self.durable.exists(key) and sha256(self.durable.read(key)) == digest

    # -- artifacts -----------------------------------------------------------------------------
    def put(self, value: Any, *, run_id: str, stage: str) -> ArtifactRef:
        """Encode, store the blob, then publish the manifest: the artifact is committed on return."""
        fmt, data, schema = formats.encode(value)
        return self.put_encoded(fmt, data, schema, run_id=run_id, stage=stage)

    def put_encoded(self, fmt: str, data: bytes, schema: dict[str, Any], *, run_id: str, stage: str) -> ArtifactRef:
        digest = self.put_blob(data)
        ref = ArtifactRef(
            digest=digest,
            format=fmt,
            size_bytes=len(data),
            run_id=run_id,
            stage=stage,
            uri=self.durable.url.rstrip("/") + "/" + blob_key(digest),
            schema=schema,
            created_at=time.time(),
        )
        key = manifest_key(run_id, stage)
        if self.durable.exists(key):
            old = ArtifactRef.from_json(self.durable.read(key))
            if old.digest != digest:
                raise StorageError(f"manifest {key} is already committed with digest {old.digest}; runs are immutable")
            return old
        self.durable.write(key, ref.to_json())
        return ref

    def adopt(self, ref: ArtifactRef, *, run_id: str, stage: str) -> ArtifactRef:
        """Record an existing artifact (a cache hit) in another run's manifests; the producer stays."""
        key = manifest_key(run_id, stage)
        if not self.durable.exists(key):
            self.durable.write(key, ref.to_json())
        return ref

    def get(self, ref: ArtifactRef) -> Any:
        return formats.decode(ref.format, self.get_blob(ref.digest))

    def manifest(self, run_id: str, stage: str) -> ArtifactRef:
        key = manifest_key(run_id, stage)
        if not self.durable.exists(key):
            raise ArtifactNotFoundError(f"no committed artifact for stage {stage!r} of run {run_id!r}")
        return ArtifactRef.from_json(self.durable.read(key))

    def manifests(self, run_id: str) -> list[ArtifactRef]:
        prefix = f"manifests/{validate_name(run_id, 'run id')}"
        return [ArtifactRef.from_json(self.durable.read(k)) for k in self.durable.list(prefix)]

    # -- small documents (run journals) -------------------------------------------------------
    def put_document(self, parts: tuple[str, ...], doc: dict[str, Any]) -> None:
        """Atomically (re)write a JSON document on the durable tier under validated path segments."""
        self.durable.write(_doc_key(parts), json.dumps(doc, indent=1).encode())  # keep insertion order

    def get_document(self, parts: tuple[str, ...]) -> dict[str, Any]:
        key = _doc_key(parts)
        if not self.durable.exists(key):
            raise ArtifactNotFoundError(f"no document {key} in {self.durable.url}")
        return json.loads(self.durable.read(key))

    def list_documents(self, prefix: str, name: str) -> list[tuple[str, ...]]:
        """Path segments of every `<prefix>/*/<name>.json` document."""
        found = self.durable.list(validate_name(prefix, "prefix"))
        return [tuple(k.removesuffix(".json").split("/")) for k in found if k.endswith(f"/{name}.json")]

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
