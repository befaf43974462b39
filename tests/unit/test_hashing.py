"""Content digests: plain sha256 for small blobs, a parallel two-level sha256 tree for large ones."""

import hashlib
import os

from storage.hashing import CHUNK_BYTES, content_digest, read_file_with_digest


def test_small_blobs_are_named_by_their_plain_sha256():
    data = os.urandom(1000)
    assert content_digest(data) == hashlib.sha256(data).hexdigest()
    edge = os.urandom(CHUNK_BYTES)
    assert content_digest(edge) == hashlib.sha256(edge).hexdigest()


def test_large_blobs_use_the_tree_and_every_byte_counts(tmp_path):
    data = bytearray(os.urandom(CHUNK_BYTES * 2 + 12345))
    d = content_digest(data)
    assert d != hashlib.sha256(data).hexdigest() and len(d) == 64
    assert content_digest(memoryview(data)) == d == content_digest(bytes(data))
    path = tmp_path / "blob"
    path.write_bytes(data)
    view, streamed = read_file_with_digest(str(path))
    assert streamed == d and bytes(view) == data
    for pos in (0, CHUNK_BYTES - 1, CHUNK_BYTES, len(data) - 1):  # flip one bit anywhere
        data[pos] ^= 1
        assert content_digest(data) != d
        data[pos] ^= 1
    assert content_digest(data + b"\x00") != d  # length is part of the name
