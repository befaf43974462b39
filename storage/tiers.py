"""One fsspec file system per tier: dumb byte I/O under a root, with atomic publish.

A tier never decides keys or paths beyond its root; the store does (Dagster's UPathIOManager split).
"""

from __future__ import annotations

import posixpath
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec

from storage.errors import StorageError

HOT, WARM, DURABLE = "hot", "warm", "durable"
ROLES = (HOT, WARM, DURABLE)


@dataclass(frozen=True)
class TierSpec:
    """A tier by URL and role. Unknown schemes fail when opened, naming the fsspec package to install."""

    url: str
    role: str = DURABLE
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise StorageError(f"tier role {self.role!r} is not one of {', '.join(ROLES)}")
        if not self.url or "\x00" in self.url:
            raise StorageError(f"tier URL {self.url!r} is empty or contains NUL")


class Tier:
    """Byte-level access to one tier's root directory."""

    def __init__(self, spec: TierSpec) -> None:
        self.spec = spec
        try:
            self.fs, root = fsspec.core.url_to_fs(spec.url, **spec.storage_options)
        except (ImportError, ValueError) as exc:
            raise StorageError(f"cannot open tier {spec.url!r}: {exc}") from exc
        self.root = root.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self._atomic_rename = "file" in protocols or "memory" in protocols

    @property
    def url(self) -> str:
        return self.spec.url

    def path(self, key: str) -> str:
        return posixpath.join(self.root, key)

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self.path(key)))

    def read(self, key: str) -> bytes:
        with self.fs.open(self.path(key), "rb") as f:
            return f.read()

    def write(self, key: str, data: bytes) -> None:
        """Publish `data` at `key` so readers see all of it or nothing.

        File systems: write a uniquely named temp file beside the target, then rename (atomic on POSIX).
        Object stores: a PUT is atomic per object, so write directly.
        """
        final = self.path(key)
        parent = posixpath.dirname(final)
        self.fs.makedirs(parent, exist_ok=True)
        if not self._atomic_rename:
            with self.fs.open(final, "wb") as f:
                f.write(data)
            return
        tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}")
        try:
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, final)
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)

    def delete(self, key: str) -> None:
        if self.exists(key):
            self.fs.rm(self.path(key))

    def list(self, prefix: str) -> list[str]:
        base = self.path(prefix)
        if not self.fs.exists(base):
            return []
        strip = len(self.root.lstrip("/")) + 1
        return sorted(p.lstrip("/")[strip:] for p in self.fs.find(base))
