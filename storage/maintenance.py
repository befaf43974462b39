"""Store upkeep behind `tierflow store ls | info | verify | gc`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from storage.errors import ArtifactNotFoundError, InvalidKeyError
from storage.keys import validate_name
from storage.store import ArtifactRef, ArtifactStore, Repair, blob_key
from storage.tiers import BLOBS, TMP_PREFIX, MemoryTier, Tier

DEFAULT_GC_MIN_AGE_S = 3600.0  # a blob written moments ago may be waiting for its manifest


@dataclass
class VerifyReport:
    checked: int = 0
    repairs: list[Repair] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # manifests whose blob is in no tier

    @property
    def ok(self) -> bool:
        return not self.missing and all(r.action == "repaired" for r in self.repairs)


def _read_ok(tier: Tier, key: str, digest: str) -> bytes | memoryview | None:
    from storage.crypto import WrongKeyError  # noqa: PLC0415

    try:
        data, found = tier.read_with_digest(key)
    except WrongKeyError:
        raise
    except Exception:  # unreadable = corrupt, for verification purposes
        return None
    return data if found == digest else None


def verify(store: ArtifactStore) -> VerifyReport:
    """Re-hash every blob in every tier; rewrite a corrupt copy from an intact one in another tier."""
    report = VerifyReport()
    digests: dict[str, list[Tier]] = {}
    for tier in store.tiers:
        if isinstance(tier, MemoryTier):
            continue  # process-local; nothing of another process's to check
        for key in tier.list(BLOBS):
            if key.rsplit("/", 1)[-1].startswith(TMP_PREFIX):
                continue  # a write in progress (or a dead writer's leftover, for gc)
            digests.setdefault(key.rsplit("/", 1)[-1], []).append(tier)
    for digest, holders in sorted(digests.items()):
        key = blob_key(digest)
        good: bytes | memoryview | None = None
        bad: list[Tier] = []
        for tier in holders:
            report.checked += 1
            data = _read_ok(tier, key, digest)
            if data is None:
                bad.append(tier)
            elif good is None:
                good = data
        for tier in bad:
            if good is not None:
                tier.write(key, good)
            report.repairs.append(Repair(digest, tier.url, "repaired" if good is not None else "unrecoverable"))
        if good is not None and store.durable not in holders:  # a durable copy was lost: restore it
            store.durable.write(key, good)
            report.repairs.append(Repair(digest, store.durable.url, "repaired"))
    for ref in store.manifests():
        if ref.digest not in digests:
            report.missing.append(f"{ref.run_id}/{ref.stage} -> {ref.digest}")
    return report


def referenced(store: ArtifactStore) -> set[str]:
    refs = {m.digest for m in store.manifests()}
    for key in store.durable.list("cache"):
        refs.add(ArtifactRef.from_json(store.durable.read(key)).digest)
    return refs


@dataclass(frozen=True)
class Garbage:
    tier: str
    key: str
    size: int


def gc(store: ArtifactStore, *, dry_run: bool = False, min_age_s: float = DEFAULT_GC_MIN_AGE_S) -> list[Garbage]:
    """Delete blobs no manifest or cache entry references, and stale temp files, older than `min_age_s`."""
    keep = referenced(store)
    cutoff = time.time() - min_age_s
    found = []
    for tier in store.tiers:
        if isinstance(tier, MemoryTier):
            continue
        for e in tier.entries(BLOBS):
            name = e.key.rsplit("/", 1)[-1]
            stale_tmp = name.startswith(TMP_PREFIX)
            if (stale_tmp or name not in keep) and e.last_used < cutoff:
                found.append(Garbage(tier.url, e.key, e.size))
                if not dry_run:
                    tier.delete(e.key)
    return found


def find(store: ArtifactStore, artifact: str) -> list[ArtifactRef]:
    """Manifests matching `RUN/STAGE`, a full digest, or a digest prefix of at least 8 characters."""
    if "/" in artifact:
        run_id, _, stage = artifact.partition("/")
        return [store.manifest(validate_name(run_id, "run id"), validate_name(stage, "stage name"))]
    prefix = artifact.lower()
    if len(prefix) < 8 or any(c not in "0123456789abcdef" for c in prefix):
        raise InvalidKeyError(f"{artifact!r} is neither RUN/STAGE nor a digest prefix of 8+ hex characters")
    hits = [m for m in store.manifests() if m.digest.startswith(prefix)]
    if not hits:
        raise ArtifactNotFoundError(f"no artifact matches {artifact!r}; list them with `tierflow store ls`")
    return hits


def holders(store: ArtifactStore, digest: str) -> dict[str, str]:
    """Per tier: 'ok', 'corrupt' or 'absent'."""
    key = blob_key(digest)
    out = {}
    for tier in store.tiers:
        if not tier.exists(key):
            out[tier.url] = "absent"
        else:
            out[tier.url] = "ok" if _read_ok(tier, key, digest) is not None else "corrupt"
    return out
