"""Validation of user-supplied names before they become storage paths.

Names reach fsspec only after passing here, so `..`, absolute paths, URL schemes and control
characters can never address anything outside the store's root.
"""

from __future__ import annotations

import re

from storage.errors import InvalidKeyError

MAX_NAME_CHARS = 128
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_DIGEST = re.compile(r"[0-9a-f]{64}")


def validate_name(name: object, what: str = "name") -> str:
    """Return `name` if it is a safe single path segment, else raise `InvalidKeyError`."""
    if not isinstance(name, str):
        raise InvalidKeyError(f"{what} must be a string, got {type(name).__name__}")
    if not name:
        raise InvalidKeyError(f"{what} is empty; use letters, digits, '.', '_' or '-'")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidKeyError(f"{what} {name[:32]!r}... is {len(name)} characters; the limit is {MAX_NAME_CHARS}")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidKeyError(f"{what} {name!r} contains a control character; remove it")
    if "://" in name or name.startswith(("/", "\\")) or ".." in name:
        raise InvalidKeyError(
            f"{what} {name!r} looks like a path or URL; use a plain name of letters, digits, '.', '_' or '-'"
        )
    if not _NAME.fullmatch(name):
        raise InvalidKeyError(
            f"{what} {name!r} has characters outside [A-Za-z0-9._-] or does not start with a letter or digit"
        )
    return name


def validate_digest(digest: object) -> str:
    """Return `digest` if it is a lowercase hex sha256, else raise `InvalidKeyError`."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise InvalidKeyError(f"digest {digest!r} is not a 64-character lowercase hex sha256")
    return digest
