"""AES-256-GCM envelopes for encryption at rest (storage.crypto)."""

import hashlib
import os
import secrets

import pytest

from storage import crypto
from storage.crypto import (
    HEADER_BYTES,
    MAGIC,
    CryptoError,
    MissingKeyError,
    TierKey,
    WrongKeyError,
    decrypt,
    encrypt,
    envelope_key_id,
    is_encrypted,
    load_key,
)
from storage.errors import StorageError

# Recognisable and non-repeating at the AES block scale, so any leak would show as a substring.
PLAINTEXT = b"".join(f"tierflow-secret-row-{i:04d};".encode() for i in range(50))[:1024]
assert len(PLAINTEXT) == 1024
AAD = hashlib.sha256(PLAINTEXT).hexdigest().encode()


@pytest.fixture
def key() -> TierKey:
    return TierKey.from_bytes(secrets.token_bytes(32))


def write_key(path, content: bytes, mode: int) -> str:
    path.write_bytes(content)
    path.chmod(mode)
    return str(path)


def test_round_trip_and_envelope_layout(key):
    env = encrypt(PLAINTEXT, key, AAD)
    assert env.startswith(MAGIC) and is_encrypted(env)
    assert envelope_key_id(env) == key.key_id and len(key.key_id) == 16
    assert len(env) == HEADER_BYTES + len(PLAINTEXT) + 16
    assert decrypt(env, key, AAD) == PLAINTEXT
    assert decrypt(encrypt(b"", key, AAD), key, AAD) == b""


def test_key_id_is_domain_separated_sha256_prefix(key):
    assert key.key_id == hashlib.sha256(b"tierflow-key-id-v1" + key.key).hexdigest()[:16]
    with pytest.raises(CryptoError, match="does not match"):
        TierKey(key.key, "0" * 16)
    with pytest.raises(CryptoError, match="32 bytes"):
        TierKey.from_bytes(b"short")


def test_fresh_nonce_per_encryption(key):
    a, b = encrypt(PLAINTEXT, key, AAD), encrypt(PLAINTEXT, key, AAD)
    assert a != b
    assert a[22:HEADER_BYTES] != b[22:HEADER_BYTES]  # the nonces themselves
    assert decrypt(a, key, AAD) == decrypt(b, key, AAD) == PLAINTEXT


def test_plaintext_does_not_appear_in_envelope(key):
    env = encrypt(PLAINTEXT, key, AAD)
    assert PLAINTEXT not in env
    assert b"tierflow-secret-row" not in env


def test_wrong_key_names_both_key_ids(key):
    other = TierKey.from_bytes(secrets.token_bytes(32))
    env = encrypt(PLAINTEXT, key, AAD)
    with pytest.raises(WrongKeyError) as info:
        decrypt(env, other, AAD)
    msg = str(info.value)
    assert key.key_id in msg and other.key_id in msg and "configure the key" in msg
    assert isinstance(info.value, CryptoError) and isinstance(info.value, StorageError)


@pytest.mark.parametrize("offset", [HEADER_BYTES - 1, HEADER_BYTES, HEADER_BYTES + 500, -1])
def test_tampered_envelope_fails_authentication(key, offset):
    env = bytearray(encrypt(PLAINTEXT, key, AAD))
    env[offset] ^= 0x01  # nonce, first ciphertext byte, middle, tag
    with pytest.raises(CryptoError, match="corrupt or was tampered") as info:
        decrypt(bytes(env), key, AAD)
    assert not isinstance(info.value, WrongKeyError)


def test_wrong_aad_fails_so_a_blob_cannot_move_address(key):
    env = encrypt(PLAINTEXT, key, AAD)
    other_address = hashlib.sha256(b"another blob").hexdigest().encode()
    with pytest.raises(CryptoError, match="tampered"):
        decrypt(env, key, other_address)


@pytest.mark.parametrize("keep", [len(MAGIC) - 1, len(MAGIC), HEADER_BYTES, HEADER_BYTES + 15, -1])
def test_truncated_envelope_raises(key, keep):
    env = encrypt(PLAINTEXT, key, AAD)
    with pytest.raises(CryptoError):
        decrypt(env[:keep], key, AAD)


def test_plain_data_is_not_encrypted(key):
    assert not is_encrypted(PLAINTEXT) and not is_encrypted(b"")
    with pytest.raises(CryptoError, match="not an encrypted tierflow blob"):
        decrypt(PLAINTEXT, key, AAD)
    with pytest.raises(CryptoError, match="not an encrypted tierflow blob"):
        envelope_key_id(PLAINTEXT)


def test_oversize_plaintext_is_refused_clearly(key, monkeypatch):
    # The real cap is cryptography's 2**31 - 1; shrink it rather than allocate 2 GiB in a unit test.
    monkeypatch.setattr(crypto, "MAX_PLAINTEXT_BYTES", 1000)
    with pytest.raises(CryptoError, match="too large to encrypt"):
        encrypt(PLAINTEXT, key, AAD)


def test_load_key_from_env(monkeypatch):
    raw = secrets.token_bytes(32)
    monkeypatch.setenv("TF_TEST_KEY", raw.hex() + "\n")
    loaded = load_key("env:TF_TEST_KEY")
    assert loaded.key == raw and loaded == TierKey.from_bytes(raw)
    monkeypatch.setenv("TF_TEST_KEY", raw.hex().upper())
    assert load_key("env:TF_TEST_KEY").key == raw


@pytest.mark.parametrize("value", ["abcd", "zz" * 32, "ab" * 33, "é" * 64])
def test_load_key_from_env_rejects_bad_values_without_echoing_them(monkeypatch, value):
    monkeypatch.setenv("TF_TEST_KEY", value)
    with pytest.raises(CryptoError, match="64 hex characters") as info:
        load_key("env:TF_TEST_KEY")
    assert value not in str(info.value) and not isinstance(info.value, MissingKeyError)


def test_load_key_from_file_hex_and_raw(tmp_path):
    raw = secrets.token_bytes(32)
    assert load_key("file:" + write_key(tmp_path / "hex", raw.hex().encode() + b"\n", 0o600)).key == raw
    assert load_key("file:" + write_key(tmp_path / "hex-nonl", raw.hex().encode(), 0o600)).key == raw
    assert load_key("file:" + write_key(tmp_path / "crlf", raw.hex().encode() + b"\r\n", 0o400)).key == raw
    assert load_key("file:" + write_key(tmp_path / "raw", raw, 0o600)).key == raw


def test_load_key_file_readable_by_others_is_refused(tmp_path):
    path = write_key(tmp_path / "key", secrets.token_bytes(32).hex().encode(), 0o644)
    with pytest.raises(CryptoError, match="chmod 600") as info:
        load_key("file:" + path)
    assert "0644" in str(info.value)
    os.chmod(path, 0o640)
    with pytest.raises(CryptoError, match="chmod 600"):
        load_key("file:" + path)


@pytest.mark.parametrize(
    "content",
    [b"00" * 31, b"00" * 33 + b"\n", b"xy" * 32, secrets.token_hex(16).encode()],
    ids=["short-hex", "long-hex", "not-hex", "128-bit-hex"],
)
def test_load_key_file_rejects_bad_contents(tmp_path, content):
    path = write_key(tmp_path / "key", content, 0o600)
    with pytest.raises(CryptoError) as info:
        load_key("file:" + path)
    assert content.strip().decode() not in str(info.value) and not isinstance(info.value, MissingKeyError)


def test_load_key_file_that_is_a_directory(tmp_path):
    with pytest.raises(CryptoError):
        load_key(f"file:{tmp_path}")


def test_missing_env_and_file_explain_how_to_create_a_key(tmp_path, monkeypatch):
    secret = secrets.token_hex(32)
    monkeypatch.setenv("TF_OTHER_KEY", secret)  # key material elsewhere must not leak in
    monkeypatch.delenv("TF_ABSENT_KEY", raising=False)
    with pytest.raises(MissingKeyError) as env_info:
        load_key("env:TF_ABSENT_KEY")
    missing = tmp_path / "nope.key"
    with pytest.raises(MissingKeyError) as file_info:
        load_key(f"file:{missing}")
    for info, spec in ((env_info, "env:TF_ABSENT_KEY"), (file_info, f"file:{missing}")):
        msg = str(info.value)
        assert spec in msg and "secrets.token_hex(32)" in msg and secret not in msg


@pytest.mark.parametrize("spec", ["", "env:", "file:", "TF_KEY", "vault:TF_KEY"])
def test_bad_spec(spec):
    with pytest.raises(CryptoError, match="must be 'env:VARNAME' or 'file:"):
        load_key(spec)


def test_repr_never_shows_key(key):
    for text in (repr(key), str(key), f"{key}", repr([key])):
        assert key.key.hex() not in text and key.key.hex()[:8] not in text and str(key.key) not in text
        assert key.key_id in text


def test_64_mib_round_trip(key):
    data = os.urandom(64 * 1024 * 1024)
    aad = hashlib.sha256(data).hexdigest().encode()
    env = encrypt(data, key, aad)
    assert len(env) == len(data) + HEADER_BYTES + 16
    assert decrypt(env, key, aad) == data
    assert decrypt(memoryview(env), key, aad) == data  # buffers work as well as bytes
