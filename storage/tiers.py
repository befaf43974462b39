"""Tiers: dumb byte stores under a root, with atomic publish, optional encryption, capacity and pins.

A tier never decides keys or paths beyond its root; the store does (Dagster's UPathIOManager split).
`memory://name` is a process-local hot tier that hands out the stored bytes without copying;
every other URL goes through fsspec (local disk, s3://, gs://, ...).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import posixpath
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import fsspec

from storage.errors import StorageError

HOT, WARM, DURABLE = "hot", "warm", "durable"
ROLES = (HOT, WARM, DURABLE)
BLOBS = "blobs"
PINS = "pins"
TMP_PREFIX = ".tmp-"
# fsync what commits an artifact (and its stage's record). Journals and cache entries are rewritten often and
# are safe to lose (resume trusts manifests; a lost cache entry is a miss), so they skip the per-stage fsync.
_SYNCED = (f"{BLOBS}/", "manifests/", "records/")


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        import ctypes  # noqa: PLC0415

        fn = ctypes.CDLL(None, use_errno=True).syncfs  # releases the GIL while it waits
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return fn


_syncfs = _load_syncfs()


def _dirs_to_sync(parent: str) -> list[str]:
    """`parent`, and each ancestor up to the first that exists already: the directories whose entries
    change when `parent` is created and a file is renamed into it."""
    dirs = [parent]
    while not os.path.isdir(dirs[-1]) and posixpath.dirname(dirs[-1]) != dirs[-1]:
        dirs.append(posixpath.dirname(dirs[-1]))
    return dirs


def _publish(tmp: str, final: str, sync: bool, dirs: list[str] | None = None) -> None:
    """Rename `tmp` to `final`; with `sync`, fsync the directories too, so the new name (and a new
    directory's own entry) survives a machine crash, not only the bytes behind it. `dirs`: from
    `_dirs_to_sync`, when the caller created `final`'s directory itself (then it is not created here)."""
    if dirs is None:
        parent = posixpath.dirname(final)
        dirs = _dirs_to_sync(parent)
        os.makedirs(parent, exist_ok=True)
    os.replace(tmp, final)
    if sync:
        for d in dirs:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _write_file(path: str, data: bytes | memoryview, sync: bool, parent: str) -> None:
    """Create `path` with `data` (fsynced with `sync`). Plain fd calls: a stage's commit writes a few small
    files, and Python's buffered file objects cost more than the system calls here. `parent` is made only
    when missing (no stat or mkdir per write)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o666)
    except FileNotFoundError:
        os.makedirs(parent, exist_ok=True)
        fd = os.open(path, flags, 0o666)
    try:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(fd, view) :]
        if sync:  # committed must survive a machine crash, not only a killed process
            os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class TierSpec:
    """A tier by URL and role. `capacity_bytes` bounds a non-durable tier (LRU eviction);
    `encryption_key` (`env:NAME` or `file:/path`) turns on AES-256-GCM at rest for this tier."""

    url: str
    role: str = DURABLE
    capacity_bytes: int | None = None
    encryption_key: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise StorageError(f"tier role {self.role!r} is not one of {', '.join(ROLES)}")
        if not self.url or "\x00" in self.url:
            raise StorageError(f"tier URL {self.url!r} is empty or contains NUL")
        if self.role == DURABLE and self.capacity_bytes is not None:
            raise StorageError(f"tier {self.url}: the durable tier has no capacity; nothing is evicted from it")
        if self.capacity_bytes is not None and self.capacity_bytes <= 0:
            raise StorageError(f"tier {self.url}: capacity must be positive")
        if self.url.startswith("memory://") and self.role == DURABLE:
            raise StorageError(f"tier {self.url}: memory:// lives and dies with one process; it cannot be durable")

    def __repr__(self) -> str:  # storage_options may hold credentials
        return f"TierSpec({self.url!r}, role={self.role!r}, capacity_bytes={self.capacity_bytes})"


@dataclass(frozen=True)
class Entry:
    key: str
    size: int
    last_used: float


def plan_eviction(entries: list[Entry], capacity: int, pinned: set[str], incoming: int = 0) -> list[str]:
    """Least recently used first, skipping pinned keys, until `incoming` more bytes fit in `capacity`."""
    used = sum(e.size for e in entries)
    victims = []
    for e in sorted(entries, key=lambda e: e.last_used):
        if used + incoming <= capacity:
            break
        if e.key in pinned:
            continue
        victims.append(e.key)
        used -= e.size
    return victims


class Tier:
    """Common behaviour: encryption at rest and capacity enforcement over raw byte operations."""

    def __init__(self, spec: TierSpec) -> None:
        self.spec = spec
        self.key = None
        if spec.encryption_key:
            from storage.crypto import load_key  # noqa: PLC0415  # only encrypted tiers need it

            self.key = load_key(spec.encryption_key)

    url = property(lambda self: self.spec.url)
    role = property(lambda self: self.spec.role)

    @property
    def key_id(self) -> str | None:
        return self.key.key_id if self.key else None

    # -- bytes in and out (plaintext never reaches an encrypted tier) ---------------------------
    def read(self, key: str) -> bytes:
        data = self._read(key)
        if self.key is None:
            return data
        from storage.crypto import decrypt  # noqa: PLC0415

        return decrypt(data, self.key, key.encode())

    def read_with_digest(self, key: str) -> tuple[bytes | memoryview, str]:
        """The plaintext and its content digest (overridden where hashing can overlap the read)."""
        from storage.hashing import content_digest  # noqa: PLC0415

        data = self.read(key)
        return data, content_digest(data)

    def write(self, key: str, data: bytes | memoryview) -> None:
        if self.key is not None:
            from storage.crypto import encrypt  # noqa: PLC0415

            data = encrypt(data, self.key, key.encode())
        self._write(key, data)

    def append(self, key: str, data: bytes) -> None:
        """Add `data` at the end of `key` (created if missing). Here: read, then rewrite whole — for object
        stores (no append) and encrypted tiers (one authenticated blob per key). Local files override it."""
        old = self.read(key) if self.exists(key) else b""
        self.write(key, old + data)

    def barrier(self) -> None:
        """Make every write so far durable (see FsspecTier); nothing to do where writes are synchronous."""

    def used_bytes(self) -> int | None:
        """Bytes held, when known without listing the tier (None: list it)."""
        return None

    def put_cached(self, key: str, data: bytes) -> bool:
        """Write into a capacity-bounded tier, evicting LRU unpinned blobs first; False if it cannot fit."""
        cap = self.spec.capacity_bytes
        if cap is not None:
            if len(data) > cap:
                return False
            used = self.used_bytes()
            if used is not None and used + len(data) <= cap:  # fits: no O(blobs) listing per write
                self.write(key, data)
                return True
            victims = plan_eviction(self.entries(BLOBS), cap, self.pinned(), incoming=len(data))
            for victim in victims:
                self.delete(victim)
            if sum(e.size for e in self.entries(BLOBS)) + len(data) > cap:
                return False  # everything left is pinned
        self.write(key, data)
        return True

    # -- subclasses implement ---------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def _read(self, key: str) -> bytes:
        raise NotImplementedError

    def _write(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def list(self, prefix: str) -> list[str]:
        raise NotImplementedError

    def entries(self, prefix: str) -> list[Entry]:
        raise NotImplementedError

    def touch(self, key: str) -> None:
        """Record a use for LRU."""

    def pin(self, digest: str) -> str:
        raise NotImplementedError

    def unpin(self, token: str) -> None:
        raise NotImplementedError

    def pinned(self) -> set[str]:
        raise NotImplementedError


class MemoryTier(Tier):
    """Process-local hot tier: a dict of immutable bytes, so reads are zero-copy.

    Blobs here were verified when they entered, and process memory is not shared storage,
    so reads are not re-hashed.
    """

    _spaces: dict[str, OrderedDict[str, bytes]] = {}
    _pins: dict[str, dict[str, str]] = {}
    _used: dict[str, int] = {}  # space -> bytes held, kept per write and delete
    _lock = threading.RLock()
    _tokens = itertools.count()

    def __init__(self, spec: TierSpec) -> None:
        super().__init__(spec)
        name = spec.url.removeprefix("memory://").strip("/") or "default"
        with self._lock:
            self.space = self._spaces.setdefault(name, OrderedDict())
            self.pins = self._pins.setdefault(name, {})
            self._used.setdefault(name, 0)
        self.name = name

    def exists(self, key: str) -> bool:
        return key in self.space

    def read_with_digest(self, key: str) -> tuple[bytes | memoryview, str]:
        # Verified when it entered this process's memory; not shared storage, so not re-hashed.
        return self.read(key), key.rsplit("/", 1)[-1]

    def _read(self, key: str) -> bytes:
        with self._lock:
            try:
                self.space.move_to_end(key)
                return self.space[key]
            except KeyError:
                raise FileNotFoundError(key) from None

    def _write(self, key: str, data: bytes | memoryview) -> None:
        with self._lock:
            old = self.space.get(key)
            self.space[key] = data if isinstance(data, bytes | memoryview) else bytes(data)  # no copy
            self.space.move_to_end(key)
            self._used[self.name] += len(self.space[key]) - (len(old) if old is not None else 0)

    def delete(self, key: str) -> None:
        with self._lock:
            old = self.space.pop(key, None)
            if old is not None:
                self._used[self.name] -= len(old)

    def used_bytes(self) -> int | None:
        with self._lock:
            return self._used[self.name]

    def list(self, prefix: str) -> list[str]:
        with self._lock:
            return sorted(k for k in self.space if k.startswith(prefix.rstrip("/") + "/"))

    def entries(self, prefix: str) -> list[Entry]:
        with self._lock:  # OrderedDict order is the LRU order: use the position as the clock
            return [Entry(k, len(v), i) for i, (k, v) in enumerate(self.space.items()) if k.startswith(prefix)]

    def touch(self, key: str) -> None:
        with self._lock:
            if key in self.space:
                self.space.move_to_end(key)

    def pin(self, digest: str) -> str:
        token = str(next(self._tokens))  # process-local, like the tier: a counter is unique enough
        with self._lock:
            self.pins[token] = digest
        return token

    def unpin(self, token: str) -> None:
        with self._lock:
            self.pins.pop(token, None)

    def pinned(self) -> set[str]:
        with self._lock:
            return {f"{BLOBS}/{d[:2]}/{d}" for d in self.pins.values()}


class FsspecTier(Tier):
    """Any fsspec file system. Pins are marker files, so processes sharing a disk respect each other's."""

    def __init__(self, spec: TierSpec) -> None:
        super().__init__(spec)
        try:
            self.fs, root = fsspec.core.url_to_fs(spec.url, **spec.storage_options)
        except ImportError as exc:
            raise StorageError(f"cannot open tier {spec.url!r}: {exc} (install the fsspec back-end it names)") from exc
        except ValueError as exc:
            raise StorageError(f"cannot open tier {spec.url!r}: {exc}") from exc
        self.root = root.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.local = "file" in protocols or "local" in protocols
        # Group commit: writes skip their per-file fsyncs and `barrier()` later makes them all durable at once.
        self.defer_sync = False

    def barrier(self) -> None:
        """Make every write so far durable: one syncfs of the file system (data, inodes and directory entries)
        instead of ~6 fsyncs per committed stage. Object stores: a finished PUT is durable already."""
        if not self.local:
            return
        os.makedirs(self.root, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _syncfs is None or _syncfs(fd) != 0:
                os.sync()  # no syncfs (not Linux): every file system
        finally:
            os.close(fd)

    def path(self, key: str) -> str:
        return posixpath.join(self.root, key)

    def exists(self, key: str) -> bool:
        if self.local:  # one stat; fsspec's would add its path normalisation to every stage's commit
            return os.path.exists(self.path(key))
        return bool(self.fs.exists(self.path(key)))

    def _read(self, key: str) -> bytes:
        return self.fs.cat_file(self.path(key))

    def read_with_digest(self, key: str) -> tuple[bytes | memoryview, str]:
        if self.local and self.key is None:
            from storage.hashing import read_file_with_digest  # noqa: PLC0415

            return read_file_with_digest(self.path(key))
        return super().read_with_digest(key)

    def _write(self, key: str, data: bytes) -> None:
        """All or nothing: temp file + rename on file systems; a single PUT (atomic per object) elsewhere."""
        final = self.path(key)
        parent = posixpath.dirname(final)
        if not self.local:
            self.fs.pipe_file(final, bytes(data))  # botocore wants bytes
            return
        sync = self.role == DURABLE and key.startswith(_SYNCED) and not self.defer_sync
        dirs = _dirs_to_sync(parent) if sync else []  # before they are made: the new ones need an fsync
        tmp = posixpath.join(parent, f"{TMP_PREFIX}{os.urandom(8).hex()}")
        published = False
        try:
            _write_file(tmp, data, sync, parent)
            _publish(tmp, final, sync, dirs)
            published = True
        finally:
            if not published:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(key))

    def append(self, key: str, data: bytes) -> None:
        """A real append on local, unencrypted tiers: O(len(data)), not O(file). Not fsynced: appended logs
        (run journals) are safe to lose, and a torn last line is skipped by their readers."""
        if not self.local or self.key is not None:
            super().append(key, data)
            return
        final = self.path(key)
        os.makedirs(posixpath.dirname(final), exist_ok=True)
        with open(final, "ab") as f:
            f.write(data)

    def write_content_addressed(
        self, key_of: Callable[[str], str], produce: Callable[[BinaryIO], Any]
    ) -> tuple[str, int]:
        """Write what `produce(sink)` writes into `sink` under the key named by its digest; return (digest, size).

        Local, unencrypted tiers only. The bytes go to a temp file while the pool hashes them chunk by
        chunk, then the file is fsynced (durable tier) and renamed into place, or dropped if that
        content is already there.
        """
        from storage.hashing import HashingWriter  # noqa: PLC0415

        tmp_dir = self.path(f"{BLOBS}/incoming")
        os.makedirs(tmp_dir, exist_ok=True)
        tmp = posixpath.join(tmp_dir, f"{TMP_PREFIX}{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                sink = HashingWriter(f)
                produce(sink)
                if self.role == DURABLE:
                    f.flush()
                    os.fsync(f.fileno())
            digest = sink.digest.hexdigest()
            final = self.path(key_of(digest))
            if not os.path.exists(final):
                _publish(tmp, final, self.role == DURABLE)
            return digest, sink.digest.total
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def mapped(self, key: str) -> memoryview:
        """A local blob's bytes, memory-mapped and unverified: for copying what this process just wrote."""
        from storage.hashing import map_file  # noqa: PLC0415

        return map_file(self.path(key))

    def list(self, prefix: str) -> list[str]:
        base = self.path(prefix)
        self.fs.invalidate_cache(base)  # object stores cache listings; other processes write too
        if not self.fs.exists(base):
            return []
        strip = len(self.root.lstrip("/")) + 1
        return sorted(p.lstrip("/")[strip:] for p in self.fs.find(base))

    def entries(self, prefix: str) -> list[Entry]:
        base = self.path(prefix)
        self.fs.invalidate_cache(base)
        if not self.fs.exists(base):
            return []
        strip = len(self.root.lstrip("/")) + 1
        out = []
        for p, info in self.fs.find(base, detail=True).items():
            mtime = info.get("mtime") or info.get("LastModified") or 0
            out.append(Entry(p.lstrip("/")[strip:], int(info.get("size") or 0), _timestamp(mtime)))
        return out

    def touch(self, key: str) -> None:
        if self.local:  # the mtime is the LRU clock shared by every process using this disk
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.path(key))

    def pin(self, digest: str) -> str:
        token = f"{PINS}/{digest}/{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._write(token, b"")
        return token

    def unpin(self, token: str) -> None:
        self.delete(token)

    def pinned(self) -> set[str]:
        out = set()
        for marker in self.list(PINS):
            _, digest, owner = marker.split("/", 2)
            if _owner_alive(owner):
                out.add(f"{BLOBS}/{digest[:2]}/{digest}")
            else:
                self.delete(marker)  # its process died without unpinning
        return out


def _timestamp(value: Any) -> float:
    if isinstance(value, int | float):
        return float(value)
    return value.timestamp() if hasattr(value, "timestamp") else time.time()


def _owner_alive(owner: str) -> bool:
    parts = owner.rsplit("-", 2)  # host-pid-nonce; host names may contain '-'
    if len(parts) != 3 or parts[0] != socket.gethostname():
        return True  # another host's pin: we cannot tell, so respect it
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def open_tier(spec: TierSpec) -> Tier:
    return MemoryTier(spec) if spec.url.startswith("memory://") else FsspecTier(spec)
