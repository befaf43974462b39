"""Stage cache keys: what a stage's output depends on, and nothing else."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from workflows.model import Stage

# Bump when the on-store encoding changes: old cache entries then miss instead of misleading.
FORMAT_VERSION = "1"


def cache_key(
    stage: Stage, params: Mapping[str, Any], input_digests: Mapping[str, str], source: str | None = None
) -> str:
    """Code + version + params + input digests + format version. Not resources, not the node.

    `source`: the stage's `source()` when the caller already has it (stages of one function share it)."""
    payload = {
        "source": stage.source() if source is None else source,
        "version": stage.version,
        "params": params,
        "inputs": dict(sorted(input_digests.items())),
        "format": FORMAT_VERSION,
    }
    blob = json.dumps(payload, sort_keys=True, default=repr).encode()
    return hashlib.sha256(blob).hexdigest()
