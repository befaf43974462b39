"""Tiered, content-addressed artifact storage over fsspec."""

from storage.config import StoreConfig
from storage.errors import ArtifactNotFoundError, FormatError, IntegrityError, InvalidKeyError, StorageError
from storage.formats import Pickled, Tensors
from storage.keys import validate_digest, validate_name
from storage.store import ArtifactRef, ArtifactStore, sha256
from storage.tiers import TierSpec

__all__ = [
    "ArtifactNotFoundError",
    "ArtifactRef",
    "ArtifactStore",
    "FormatError",
    "IntegrityError",
    "InvalidKeyError",
    "Pickled",
    "StorageError",
    "StoreConfig",
    "Tensors",
    "TierSpec",
    "sha256",
    "validate_digest",
    "validate_name",
]
