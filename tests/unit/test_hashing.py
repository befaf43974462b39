"""Content digests: plain sha256 for small blobs, a parallel two-level sha256 tree for large ones."""

import hashlib
import os

from storage.hashing import CHUNK_BYTES, HashingWriter, content_digest, read_file_with_digest


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


def test_hashing_writer_names_pieces_of_any_size_like_content_digest(tmp_path):
    data = os.urandom(CHUNK_BYTES * 2 + 777)
    for size in (0, 5, CHUNK_BYTES, CHUNK_BYTES + 1, len(data)):
        path = tmp_path / f"out-{size}"
        with open(path, "wb") as f:
            sink = HashingWriter(f)
            for cut in range(0, size, 5_000_011):  # pieces that straddle chunk boundaries
                sink.write(memoryview(data)[cut : min(cut + 5_000_011, size)])
        assert sink.digest.hexdigest() == content_digest(data[:size]) and sink.tell() == size
        assert path.read_bytes() == data[:size]
    assert content_digest(b"") == hashlib.sha256(b"").hexdigest()


def test_a_mapped_read_notices_one_flipped_bit_in_any_chunk(tmp_path):
    data = bytearray(os.urandom(CHUNK_BYTES * 3 + 99))
    good = content_digest(data)
    path = tmp_path / "blob"
    for pos in (1, CHUNK_BYTES + 12345, len(data) - 1):
        data[pos] ^= 0x10
        path.write_bytes(data)
        assert read_file_with_digest(str(path))[1] != good
        data[pos] ^= 0x10
    path.write_bytes(data)
    assert read_file_with_digest(str(path))[1] == good
