"""Content digests: sha256, computed in parallel for large blobs.

A blob up to `CHUNK_BYTES` is named by its plain sha256. A larger one is named by the sha256 of its
length and of the sha256s of its 16 MiB chunks (a two-level hash tree, as BLAKE3 and S3 checksums do):
the chunks hash on every core at once, and while a file is still being read. One sha256 stream runs
at ~1 GB/s here, slower than the page cache, so verifying reads would otherwise halve their speed.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

CHUNK_BYTES = 16 << 20
_TREE_TAG = b"tierflow-sha256-tree-v1\x00"
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool  # noqa: PLW0603  # one shared pool per process; hashlib releases the GIL
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="tierflow-hash")
        return _pool


def _leaf(chunk: memoryview) -> bytes:
    return hashlib.sha256(chunk).digest()


def _combine(total: int, leaves: Iterable[bytes]) -> str:
    return hashlib.sha256(_TREE_TAG + total.to_bytes(8, "big") + b"".join(leaves)).hexdigest()


def content_digest(data: bytes | bytearray | memoryview) -> str:
    view = memoryview(data).cast("B")
    if len(view) <= CHUNK_BYTES:
        return hashlib.sha256(view).hexdigest()
    chunks = [view[i : i + CHUNK_BYTES] for i in range(0, len(view), CHUNK_BYTES)]
    return _combine(len(view), _executor().map(_leaf, chunks))


def digest_in_background(data: bytes | memoryview) -> Future[str]:
    """Start `content_digest` on its own thread (it fans out to the pool), so I/O can run meanwhile."""
    future: Future[str] = Future()

    def work() -> None:
        try:
            future.set_result(content_digest(data))
        except BaseException as exc:  # handed to the caller through the future
            future.set_exception(exc)

    threading.Thread(target=work, name="tierflow-digest", daemon=True).start()
    return future


def read_file_with_digest(path: str) -> tuple[bytes | memoryview, str]:
    """Read a local file and compute its content digest.

    Large files are memory-mapped: the page cache is hashed in parallel without a copy, and Arrow
    decodes straight from the mapping. Blob files are only ever replaced by rename, never rewritten in
    place, so a mapping stays valid while anything still uses it.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size <= CHUNK_BYTES:
            data = f.read()
            return data, hashlib.sha256(data).hexdigest()
        # MAP_POPULATE maps the whole file up front: no page fault per 4 KiB while the hash threads run.
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mapped = mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ)
    view = memoryview(mapped)
    return view, content_digest(view)
