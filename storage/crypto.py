"""Encryption at rest for one tier: AES-256-GCM envelopes around whole blobs.

Envelope layout (all offsets fixed, so the header is readable without the key):
    MAGIC b"TFENC1" (6) | key_id, ascii hex (16) | nonce (12) | ciphertext || GCM tag (16)
Associated data = MAGIC + key_id + caller `aad`. The store passes the sha256 hex digest of the
plaintext, so a blob copied under another address fails authentication instead of decoding.
"""

from __future__ import annotations

import hashlib
import os
import string
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from storage.errors import StorageError
from storage.secrets import SecretFileError, read_secret_file

MAGIC = b"TFENC1"
KEY_BYTES = 32  # AES-256
KEY_ID_CHARS = 16
NONCE_BYTES = 12  # GCM's native nonce size; other sizes get hashed into one
TAG_BYTES = 16
HEADER_BYTES = len(MAGIC) + KEY_ID_CHARS + NONCE_BYTES
# cryptography's AESGCM refuses data or associated data over 2**31 - 1 bytes (OverflowError; checked
# on 50.0.2: 2**31 - 1 round-trips, 2**31 does not). GCM itself would allow ~64 GiB; blobs past this
# need a chunked format, which v1 does not have.
MAX_PLAINTEXT_BYTES = 2**31 - 1

_KEY_ID_DOMAIN = b"tierflow-key-id-v1"
_HEX = frozenset(string.hexdigits)
_MAKE_KEY = 'python -c "import secrets; print(secrets.token_hex(32))"'


class CryptoError(StorageError):
    """A key cannot be loaded, or an envelope cannot be decrypted. Messages never hold key material."""


class WrongKeyError(CryptoError):
    """The blob was encrypted under a different key than the one configured."""


class MissingKeyError(CryptoError):
    """The key spec names an environment variable or file that does not exist."""


@dataclass(frozen=True, repr=False)
class TierKey:
    """A 256-bit key and its public id. Build with `TierKey.from_bytes` or `load_key`."""

    key: bytes
    key_id: str

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise CryptoError(f"a tier key must be {KEY_BYTES} bytes, got {len(self.key)}")
        # A hand-built TierKey with a stale id would make WrongKeyError point at the wrong key.
        if self.key_id != _key_id(self.key):
            raise CryptoError(f"key id {self.key_id!r} does not match the key bytes")

    @classmethod
    def from_bytes(cls, key: bytes) -> TierKey:
        return cls(bytes(key), _key_id(bytes(key)))

    def __repr__(self) -> str:  # str() and logging fall back to this: never show the key
        return f"TierKey(key_id={self.key_id!r})"


def _key_id(key: bytes) -> str:
    # Domain-separated so the id is never a plain sha256 of the key someone could match elsewhere.
    return hashlib.sha256(_KEY_ID_DOMAIN + key).hexdigest()[:KEY_ID_CHARS]


def load_key(spec: str) -> TierKey:
    """`env:VARNAME` (64 hex chars) or `file:/path` (32 raw bytes, or 64 hex chars + optional newline)."""
    kind, sep, target = spec.partition(":")
    if not sep or not target or kind not in ("env", "file"):
        raise CryptoError(f"key spec {spec!r} must be 'env:VARNAME' or 'file:/path/to/key'")
    if kind == "env":
        value = os.environ.get(target)
        if not value:
            raise MissingKeyError(
                f"key spec {spec!r}: environment variable {target} is not set or empty; create a key with "
                f"`export {target}=$({_MAKE_KEY})`"
            )
        return TierKey.from_bytes(_parse_hex(value.strip().encode("ascii", "replace"), spec))
    return TierKey.from_bytes(_read_key_file(target, spec))


def _read_key_file(path: str, spec: str) -> bytes:
    try:
        data = read_secret_file(path, 4 * KEY_BYTES)
    except FileNotFoundError:
        raise MissingKeyError(
            f"key spec {spec!r}: {path} does not exist; create a key with `{_MAKE_KEY} > {path} && chmod 600 {path}`"
        ) from None
    except SecretFileError as exc:
        raise CryptoError(f"key spec {spec!r}: {exc}") from None
    except OSError as exc:
        raise CryptoError(f"key spec {spec!r}: cannot open {path}: {exc.strerror}") from None
    if len(data) == KEY_BYTES:
        # 32 printable hex chars is a 128-bit hex key (token_hex(16)), not a raw key; a random raw
        # key is all-hex with probability ~1e-34, so refusing it never rejects a real raw key.
        if all(chr(b) in _HEX for b in data):
            raise CryptoError(
                f"key spec {spec!r}: {path} holds 32 hex characters (a 128-bit key); "
                f"AES-256 needs 64, create one with `{_MAKE_KEY}`"
            )
        return data
    return _parse_hex(data.removesuffix(b"\n").removesuffix(b"\r"), spec)


def _parse_hex(text: bytes, spec: str) -> bytes:
    # Never echo the value: even a malformed one (a typo, a stray quote) is mostly key.
    if len(text) != 2 * KEY_BYTES:
        problem = f"got {len(text)} characters"
    elif not all(chr(b) in _HEX for b in text):
        problem = "found a non-hex character"
    else:
        return bytes.fromhex(text.decode("ascii"))
    raise CryptoError(
        f"key spec {spec!r}: expected {2 * KEY_BYTES} hex characters (or {KEY_BYTES} raw bytes in a key file), "
        f"{problem}; create a key with `{_MAKE_KEY}`"
    )


def is_encrypted(data: bytes) -> bool:
    return bytes(data[: len(MAGIC)]) == MAGIC


def envelope_key_id(data: bytes) -> str:
    """The id of the key a blob was encrypted with; readable without any key."""
    if not is_encrypted(data):
        raise CryptoError(f"not an encrypted tierflow blob (no {MAGIC.decode()} header)")
    if len(data) < HEADER_BYTES + TAG_BYTES:
        raise CryptoError(f"encrypted blob is truncated: {len(data)} bytes, the minimum is {HEADER_BYTES + TAG_BYTES}")
    raw = bytes(data[len(MAGIC) : len(MAGIC) + KEY_ID_CHARS])
    if not all(chr(b) in _HEX for b in raw):
        raise CryptoError("encrypted blob has a corrupt header: its key id is not hex")
    return raw.decode("ascii")


def encrypt(plaintext: bytes | memoryview, key: TierKey, aad: bytes) -> bytes:
    """Seal one blob under `key`, bound to `aad` (the plaintext's address)."""
    if not isinstance(plaintext, bytes):
        plaintext = memoryview(plaintext).cast("B")  # e.g. an Arrow buffer's view, which may be typed
    if len(plaintext) > MAX_PLAINTEXT_BYTES:
        raise CryptoError(
            f"blob of {len(plaintext)} bytes is too large to encrypt: AES-GCM here takes at most "
            f"{MAX_PLAINTEXT_BYTES} bytes (2 GiB - 1) per blob"
        )
    # A fresh random 96-bit nonce per blob: safe for up to 2**32 blobs per key (NIST SP 800-38D).
    nonce = os.urandom(NONCE_BYTES)
    key_id = key.key_id.encode("ascii")
    sealed = AESGCM(key.key).encrypt(nonce, plaintext, MAGIC + key_id + aad)
    return MAGIC + key_id + nonce + sealed


def decrypt(envelope: bytes, key: TierKey, aad: bytes) -> bytes:
    """Open one blob; raises instead of ever returning unauthenticated bytes."""
    blob_key_id = envelope_key_id(envelope)
    if blob_key_id != key.key_id:
        raise WrongKeyError(
            f"blob was encrypted with key id {blob_key_id} but the configured key has id {key.key_id}; "
            f"configure the key with id {blob_key_id} to read it"
        )
    view = memoryview(envelope)  # slices without copying a multi-GiB ciphertext
    nonce = view[len(MAGIC) + KEY_ID_CHARS : HEADER_BYTES]
    try:
        return AESGCM(key.key).decrypt(nonce, view[HEADER_BYTES:], MAGIC + blob_key_id.encode("ascii") + aad)
    except InvalidTag:
        raise CryptoError(
            f"encrypted blob failed authentication (key id {blob_key_id}): it is corrupt or was tampered "
            "with, or it is stored under an address that is not its own"
        ) from None
    except OverflowError:
        raise CryptoError(f"encrypted blob of {len(envelope)} bytes is larger than this format allows") from None
