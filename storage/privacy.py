"""Keyed pseudonymisation of identifier columns, so raw identifiers never reach the artifact store.

`pseudonymise` replaces each named column of a `pyarrow.Table` by hex HMAC-SHA256(key, value): the
same value under the same key always gives the same token, so joins and group-bys still work, while
nobody without the key can compute a token from an identifier or recover one from a token.

Limits, stated plainly:

* Pseudonymisation is not anonymisation. Tokens are stable, so every record of one person stays
  linkable across rows, tables and runs; in GDPR terms the output is still personal data.
* Other columns can re-identify people: quasi-identifiers (birth date, postcode, rare job titles,
  timestamps, free text) are left untouched. Decide separately what to drop, coarsen or aggregate.
* Anyone who holds the key can test guesses: for low-entropy identifiers (phone numbers, national ids,
  small integer ids) they can pseudonymise every candidate and compare. Guard the key like the data.
* Rotating the key changes every token: new artifacts no longer join with artifacts made with the
  old key. `tierflow.pseudonym_key_id` in the schema metadata says which key made a table.
* Only the named columns are protected; the raw table itself must never become a stage output.
  Every stage output is committed to the store (and sent through Ray's object store), and a stage
  with `cache=False` is committed all the same. So the raw data has to be read *and* pseudonymised in
  the same stage: `pseudonymise_source(loader, columns)` is the recommended form.
  `pseudonymise_stage(columns)` takes an upstream table and is only for data that is already in the
  store anyway (or for tests).

A token is the MAC of a type tag and the value's canonical bytes (see `_canonical`): `1` (int) and
`"1"` (str) get different tokens; int width, string/large_string, dictionary encoding, chunking and
timestamp unit do not change a token; float width does (float32 0.1 is not float64 0.1).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from storage.errors import StorageError
from storage.secrets import SecretFileError, read_secret_file

KEY_ENV = "TIERFLOW_PSEUDONYM_KEY"
KEY_FILE_ENV = "TIERFLOW_PSEUDONYM_KEY_FILE"
MIN_KEY_BYTES = 32
# Recorded in the schema metadata; bump it if canonical forms change, since every token changes with them.
SCHEME = "hmac-sha256-v1"
META_COLUMNS = "tierflow.pseudonymised"
META_KEY_ID = "tierflow.pseudonym_key_id"
META_SCHEME = "tierflow.pseudonym_scheme"

_GENERATE = 'generate a key with: python -c "import secrets; print(secrets.token_hex(32))"'
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")
_MAX_KEY_FILE_BYTES = 64 * 1024  # a bigger "key file" is almost certainly the wrong path
_NS_PER_UNIT = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}


class PrivacyError(StorageError):
    """A key or a pseudonymisation request is unusable. Messages never contain key material or values."""


# -- keys ---------------------------------------------------------------------------------------


def load_key(env: str = KEY_ENV, file_env: str = KEY_FILE_ENV) -> bytes:
    """The pseudonymisation key: hex in `$env`, or raw bytes in the file named by `$file_env`.

    The file's bytes are the key as they are (one trailing newline dropped), so a file holding hex
    text is a different key from the same text in `$env`. Compare `key_id()` values when moving a key.
    """
    hex_value = os.environ.get(env, "").strip()
    path = os.environ.get(file_env, "").strip()
    if hex_value and path:
        # Two sources could hold two different keys; guessing would silently change every token.
        raise PrivacyError(f"both {env} and {file_env} are set; set only one of them")
    if hex_value:
        return _key_from_hex(hex_value, env)
    if path:
        return _key_from_file(path, file_env)
    raise PrivacyError(
        f"no pseudonymisation key: set {env} to at least {2 * MIN_KEY_BYTES} hex characters "
        f"({MIN_KEY_BYTES} bytes), or {file_env} to a file of at least {MIN_KEY_BYTES} bytes with mode 600; "
        f"{_GENERATE}"
    )


def _key_from_hex(value: str, env: str) -> bytes:
    if not _HEX.fullmatch(value):
        raise PrivacyError(f"{env} is not a hex string (an even number of 0-9a-f characters); {_GENERATE}")
    if len(value) < 2 * MIN_KEY_BYTES:
        raise PrivacyError(
            f"{env} holds {len(value) // 2} bytes; at least {MIN_KEY_BYTES} bytes "
            f"({2 * MIN_KEY_BYTES} hex characters) are required; {_GENERATE}"
        )
    return bytes.fromhex(value)


def _key_from_file(path: str, file_env: str) -> bytes:
    try:
        data = read_secret_file(path, _MAX_KEY_FILE_BYTES)
    except SecretFileError as exc:
        raise PrivacyError(f"key file named by {file_env}: {exc}") from None
    except OSError as exc:
        raise PrivacyError(f"{file_env} names {path!r}, which cannot be opened: {exc.strerror}") from None
    if data.endswith(b"\n"):  # one trailing newline, as `echo` or an editor leaves it
        data = data[:-2] if data.endswith(b"\r\n") else data[:-1]
    if len(data) < MIN_KEY_BYTES:
        raise PrivacyError(
            f"key file {path!r} ({file_env}) holds {len(data)} bytes; at least {MIN_KEY_BYTES} are required; "
            f"{_GENERATE} > {path}"
        )
    return data


def key_id(key: bytes) -> str:
    """A public name for a key (16 hex chars of a domain-separated sha256); says which key, reveals nothing."""
    return hashlib.sha256(b"tierflow-key-id" + bytes(key)).hexdigest()[:16]


# -- canonical forms ------------------------------------------------------------------------------


def _unwrap(col: pa.ChunkedArray) -> tuple[pa.ChunkedArray, str, str]:
    """Plain values, their family (how to canonicalise) and the type tag mixed into the MAC."""
    t = col.type
    if pa.types.is_dictionary(t):
        # Dictionary encoding is a storage detail: it must not change tokens.
        return _unwrap(col.cast(t.value_type))
    if isinstance(t, pa.BaseExtensionType):
        inner, family, tag = _unwrap(pa.chunked_array([c.storage for c in col.chunks], t.storage_type))
        return inner, family, f"ext:{t.extension_name}:{tag}"
    family = _family(t)
    return col, family, family


def _family(t: pa.DataType) -> str:
    if pa.types.is_null(t):
        return "null"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "str"
    if (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_fixed_size_binary(t)
        or pa.types.is_binary_view(t)
    ):
        return "bytes"
    if pa.types.is_integer(t):
        return "int"  # int32 1 and int64 1 are the same identifier
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_decimal(t):
        return "decimal"
    if pa.types.is_date(t):
        return "date"
    if pa.types.is_timestamp(t):
        # With a time zone Arrow stores UTC instants: the zone name is display, not value.
        return "timestamp-utc" if t.tz else "timestamp"
    if pa.types.is_time(t):
        return "time"
    if pa.types.is_duration(t):
        return "duration"
    return f"json:{t}"  # nested and anything newer: canonical JSON, tagged with the full type


_STRING_AS_BINARY = {pa.string(): pa.binary(), pa.large_string(): pa.large_binary(), pa.string_view(): pa.binary_view()}


def _canonical(arr: pa.Array, family: str) -> list[bytes | None]:
    """Deterministic bytes per value (None for null), independent of chunking and encoding."""
    if family == "str":
        # Arrow strings are UTF-8 already: read the bytes, skip a decode/encode round trip.
        return arr.view(_STRING_AS_BINARY[arr.type]).to_pylist()
    if family == "bytes":
        return arr.to_pylist()
    if family in ("timestamp", "timestamp-utc", "time", "duration"):
        # Exact integer nanoseconds: no float rounding, no dependence on pandas being installed.
        scale = _NS_PER_UNIT[arr.type.unit]
        ints = arr.view(pa.int32() if arr.type.bit_width == 32 else pa.int64()).to_pylist()
        return [None if v is None else str(v * scale).encode() for v in ints]
    values = arr.to_pylist()
    if family == "date":
        return [None if v is None else v.isoformat().encode() for v in values]
    if family.startswith("json:"):
        return [None if v is None else _json(v) for v in values]
    # int, float (repr round-trips exactly), bool, decimal
    return [None if v is None else str(v).encode() for v in values]


def _json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default).encode()


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dt.date | dt.time):  # datetime (and pandas' Timestamp) is a date
        return value.isoformat()
    return str(value)  # Decimal, timedelta


# -- pseudonymisation -----------------------------------------------------------------------------


class _Tokeniser:
    def __init__(self, key: bytes, family: str, tag: str, prefix: str, length: int) -> None:
        self.key, self.family, self.prefix, self.length = key, family, prefix, length
        # NUL-terminated tag: tags contain no NUL, so (tag, value) pairs cannot collide.
        self.head = tag.encode() + b"\x00"

    def tokens(self, arr: pa.Array) -> pa.Array:
        memo: dict[bytes, str] = {}
        out: list[str | None] = []
        for value in _canonical(arr, self.family):
            if value is None:
                out.append(None)
            elif (token := memo.get(value)) is None:
                mac = hmac.digest(self.key, self.head + value, "sha256").hex()[: self.length]
                token = memo[value] = self.prefix + mac
                out.append(token)
            else:
                out.append(token)
        return pa.array(out, pa.string())


def _pseudonymise_column(col: pa.ChunkedArray, key: bytes, prefix: str, length: int) -> pa.ChunkedArray:
    col, family, tag = _unwrap(col)
    if family == "null":
        return pa.chunked_array([pa.nulls(len(c), pa.string()) for c in col.chunks], pa.string())
    tok = _Tokeniser(key, family, tag, prefix, length)
    try:
        # MAC each distinct value once, then gather: identifiers repeat, and take() is vectorised.
        # unique/index_in keep NaN as one value and -0.0 apart from 0.0, matching the canonical forms.
        uniques = pc.unique(col)
        indices = pc.index_in(col, value_set=uniques)
    except pa.ArrowNotImplementedError:  # nested and extension types have no hash kernel
        return pa.chunked_array([tok.tokens(c) for c in col.chunks], pa.string())
    return pc.take(tok.tokens(uniques), indices)


def check_columns(columns: Sequence[str]) -> tuple[str, ...]:
    if isinstance(columns, str | bytes):
        raise PrivacyError(f"columns must be a list of column names, not one string: use [{columns!r}]")
    names = tuple(dict.fromkeys(columns))  # dedupe, keep order
    if not names:
        raise PrivacyError("no columns to pseudonymise; name at least one identifier column")
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise PrivacyError(f"column names must be non-empty strings, got {bad!r}")
    return names


def check_options(prefix: str, output_length: int) -> None:
    if not isinstance(prefix, str):
        raise PrivacyError(f"prefix must be a str, got {type(prefix).__name__}")
    if isinstance(output_length, bool) or not isinstance(output_length, int) or not 16 <= output_length <= 64:
        # < 16 hex chars (64 bits) makes collisions between distinct identifiers plausible at scale.
        raise PrivacyError(f"output_length must be an int from 16 to 64 hex characters, got {output_length!r}")


def pseudonymise(
    table: pa.Table,
    columns: Sequence[str],
    key: bytes,
    *,
    prefix: str = "",
    output_length: int = 32,
) -> pa.Table:
    """Replace each named column by `prefix` + hex HMAC-SHA256(key, canonical value)[:output_length].

    Nulls stay null; replaced columns become `string` columns (their field metadata, which described
    the raw values, is dropped); column order and every other column are untouched. Schema metadata
    gains `tierflow.pseudonymised` (JSON list of names), `tierflow.pseudonym_key_id` and
    `tierflow.pseudonym_scheme`.
    """
    names = check_columns(columns)
    check_options(prefix, output_length)
    if not isinstance(key, bytes | bytearray) or len(key) < MIN_KEY_BYTES:
        raise PrivacyError(f"key must be at least {MIN_KEY_BYTES} bytes; load it with load_key()")
    key = bytes(key)
    missing = [n for n in names if n not in table.schema.names]
    if missing:
        raise PrivacyError(f"no column {missing!r} to pseudonymise; the table's columns are {table.schema.names}")

    meta = dict(table.schema.metadata or {})
    kid = key_id(key)
    done = json.loads(meta.get(META_COLUMNS.encode(), b"[]"))
    old_kid = meta.get(META_KEY_ID.encode(), b"").decode()
    if done and old_kid and old_kid != kid:
        # The metadata can name one key per table; a second key would make it lie.
        raise PrivacyError(f"table was pseudonymised with key id {old_kid}, not {kid}; use one key per table")

    for name in names:
        # Arrow allows duplicate names: replace every column of that name, never leave one raw.
        for i in table.schema.get_all_field_indices(name):
            field = table.schema.field(i)
            tokens = _pseudonymise_column(table.column(i), key, prefix, output_length)
            table = table.set_column(i, pa.field(name, pa.string(), nullable=field.nullable), tokens)

    meta[META_COLUMNS.encode()] = json.dumps(list(dict.fromkeys([*done, *names]))).encode()
    meta[META_KEY_ID.encode()] = kid.encode()
    meta[META_SCHEME.encode()] = SCHEME.encode()
    return table.replace_schema_metadata(meta)
