"""Explicit, pickle-free encodings for artifacts.

Tables are Arrow IPC streams, tensors are safetensors (with string metadata), metrics and other
small values are canonical JSON. Encoding is deterministic so equal values hash to equal digests.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from storage.errors import FormatError

ARROW = "arrow-ipc"
SAFETENSORS = "safetensors"
JSON = "json"
PICKLE = "pickle"  # only with StoreConfig(allow_pickle=True) / TIERFLOW_ALLOW_PICKLE=1
FORMATS = (ARROW, SAFETENSORS, JSON, PICKLE)
_PICKLE_HINT = (
    "pickle executes code when loaded, so tierflow refuses it unless the store opts in "
    "(TIERFLOW_ALLOW_PICKLE=1 or allow_pickle = true in tierflow.toml)"
)


@dataclass(frozen=True)
class Pickled:
    """An explicit request to store `value` with pickle; refused unless the store allows pickle."""

    value: Any


@dataclass(frozen=True)
class Tensors:
    """Named arrays plus string metadata: model weights, embeddings, anything tensor-shaped.

    Torch tensors are accepted and stored as numpy arrays; `metadata` carries e.g. the model config.
    """

    tensors: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)

    def numpy(self) -> dict[str, np.ndarray]:
        return {k: _to_numpy(v) for k, v in self.tensors.items()}


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value)
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        return np.ascontiguousarray(value.detach().cpu().numpy())
    raise FormatError(f"tensor values must be numpy arrays or torch tensors, got {type(value).__name__}")


def _is_tensor(value: Any) -> bool:
    return isinstance(value, np.ndarray) or hasattr(value, "detach")


def format_of(value: Any) -> str:
    """The storage format a stage output will be written in; raise `FormatError` if none fits."""
    fmt = _binary_format(value)
    if fmt is None:
        _json_or_error(value)
    return fmt or JSON


def _binary_format(value: Any) -> str | None:
    if isinstance(value, Pickled):
        return PICKLE
    if isinstance(value, pa.Table):
        return ARROW
    if isinstance(value, Tensors):
        return SAFETENSORS
    if isinstance(value, dict) and value and all(_is_tensor(v) for v in value.values()):
        return SAFETENSORS
    return None


def _json_or_error(value: Any) -> bytes:
    try:
        return _json_bytes(value)
    except (TypeError, ValueError) as exc:
        raise FormatError(
            f"cannot store a {type(value).__name__}: return a pyarrow.Table, a dict of tensors / "
            f"storage.Tensors, JSON-serialisable data, or (opt-in) storage.Pickled ({exc})"
        ) from None


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False, default=_json_default).encode()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        item = value.item()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError("NaN/inf are not valid JSON")
        return item
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def encode(value: Any, *, allow_pickle: bool = False) -> tuple[str, bytes | memoryview, dict[str, Any]]:
    """Encode `value` to (format, bytes, schema summary)."""
    fmt = _binary_format(value)
    if fmt is None:  # JSON: encoded once (format_of would encode it to check, then again here)
        return JSON, _json_or_error(value), {"type": type(value).__name__}
    if fmt == PICKLE:
        if not allow_pickle:
            raise FormatError(f"refusing to store a storage.Pickled value: {_PICKLE_HINT}")
        import pickle  # noqa: PLC0415

        return fmt, pickle.dumps(value.value, protocol=5), {"type": type(value.value).__name__}
    if fmt == ARROW:
        return fmt, _arrow_stream(value), arrow_schema(value)
    bundle = value if isinstance(value, Tensors) else Tensors(value)  # SAFETENSORS
    arrays = bundle.numpy()
    bad = {k: type(v).__name__ for k, v in bundle.metadata.items() if not isinstance(v, str)}
    if bad:
        raise FormatError(f"Tensors.metadata values must be str (JSON-encode them): {bad}")
    data = st_save(arrays, metadata=dict(bundle.metadata) or None)
    schema = {"tensors": {k: {"dtype": str(a.dtype), "shape": list(a.shape)} for k, a in arrays.items()}}
    return fmt, data, schema


def arrow_schema(table: pa.Table) -> dict[str, Any]:
    return {"columns": {f.name: str(f.type) for f in table.schema}, "num_rows": table.num_rows}


def write_arrow(table: pa.Table, sink: Any) -> None:
    """Write `table` as an IPC stream into `sink` (an Arrow stream or a Python file object): the bytes
    `encode` returns for it, produced without holding them all in memory at once."""
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _arrow_stream(table: pa.Table) -> memoryview:
    """IPC stream bytes written once into an exactly sized buffer (a growing buffer plus `to_pybytes`
    would copy a large table twice)."""
    mock = pa.MockOutputStream()
    write_arrow(table, mock)
    buf = pa.allocate_buffer(mock.size())
    write_arrow(table, pa.FixedSizeBufferWriter(buf))
    return memoryview(buf)


def decode(fmt: str, data: bytes | memoryview, *, allow_pickle: bool = False) -> Any:
    """Decode bytes written by `encode`. Only call on bytes whose digest was verified."""
    if fmt != ARROW and not isinstance(data, bytes):
        data = bytes(data)  # small formats; Arrow alone decodes zero-copy from any buffer
    if fmt == PICKLE:
        if not allow_pickle:
            raise FormatError(f"refusing to load a pickled artifact: {_PICKLE_HINT}")
        import pickle  # noqa: PLC0415

        return pickle.loads(data)  # noqa: S301  # explicit opt-in, digest verified
    try:
        if fmt == ARROW:
            return pa.ipc.open_stream(pa.py_buffer(data)).read_all()
        if fmt == SAFETENSORS:
            return Tensors(st_load(data), _safetensors_metadata(data))
        if fmt == JSON:
            return json.loads(data)
    except (pa.ArrowInvalid, ValueError, OSError) as exc:
        raise FormatError(f"stored {fmt} bytes do not decode: {exc}") from exc
    raise FormatError(f"unknown artifact format {fmt!r}; known formats: {', '.join(FORMATS)}")


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return dict(header.get("__metadata__", {}))
