"""Exceptions raised by the artifact store. `StorageError` is the one base."""

from __future__ import annotations


class StorageError(Exception):
    """Base of every error raised by `storage`."""


class InvalidKeyError(StorageError, ValueError):
    """A user-supplied name cannot be used as a storage key."""


class FormatError(StorageError, TypeError):
    """A value has no explicit storage format, or stored bytes do not decode."""


class IntegrityError(StorageError):
    """Stored bytes do not match their content digest."""


class ArtifactNotFoundError(StorageError, KeyError):
    """No tier holds the requested artifact or manifest."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "artifact not found"
