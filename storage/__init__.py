"""Tiered, content-addressed artifact storage over fsspec."""

from storage.errors import ArtifactNotFoundError, FormatError, IntegrityError, InvalidKeyError, StorageError
from storage.formats import Tensors
from storage.keys import validate_digest, validate_name
from storage.store import ArtifactRef, ArtifactStore, StoreConfig, sha256
from storage.tiers import TierSpec

__all__ = [
    "ArtifactNotFoundError",
    "ArtifactRef",
    "ArtifactStore",
    "FormatError",
    "IntegrityError",
    "InvalidKeyError",
    "StorageError",
    "StoreConfig",
    "Tensors",
    "TierSpec",
    "sha256",
    "validate_digest",
    "validate_name",
]
