"""Workflow stages that pseudonymise identifier columns (the keyed-hash primitive is `storage.privacy`).

Stages live with the workflow model; storage keeps only the primitives (keys, HMAC tokens), so the
dependency runs workflows -> storage and never back.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import pyarrow as pa

from actors.context import StageContext
from storage.privacy import (
    KEY_ENV,
    KEY_FILE_ENV,
    META_COLUMNS,
    META_KEY_ID,
    SCHEME,
    PrivacyError,
    check_columns,
    check_options,
    key_id,
    load_key,
    pseudonymise,
)
from workflows.model import Stage, stage

# Caching: both stages are `cache=False`. tierflow computes a cache key on the driver from code,
# version, parameters and input digests, before the stage runs; the key is loaded only on the worker
# (and never captured in the pickled stage function), so a cache key cannot reflect it. A cached
# entry would then survive a key rotation (old tokens mixed with new ones downstream), and for
# `pseudonymise_source` a change in the raw data the loader reads. Always running costs one HMAC per
# distinct value; downstream stages still cache, on this stage's output digest, which changes exactly
# when the tokens (key, data or options) change. `version=` still records the configuration.


def _record(ctx: StageContext | None, names: tuple[str, ...], key: bytes) -> None:
    if ctx is not None:  # MLflow tags on the stage run: which key (by id) and which columns
        ctx.set_tag(META_KEY_ID, key_id(key))
        ctx.set_tag(META_COLUMNS, json.dumps(list(names)))


def _version(kind: str, names: tuple[str, ...], prefix: str, output_length: int, **extra: str) -> str:
    config = {"columns": list(names), "prefix": prefix, "output_length": output_length, "scheme": SCHEME, **extra}
    return f"{kind}:{json.dumps(config, sort_keys=True)}"


def pseudonymise_stage(
    columns: Sequence[str],
    *,
    name: str = "pseudonymise",
    input_name: str = "raw",
    cpus: float = 1.0,
    prefix: str = "",
    output_length: int = 32,
    key_env: str = KEY_ENV,
    key_file_env: str = KEY_FILE_ENV,
) -> Stage:
    """A stage that pseudonymises the table produced by stage `input_name`.

    The upstream raw table is itself a stage output, so it is in the store already: prefer
    `pseudonymise_source`, which never lets the raw table become an output.
    """
    names = check_columns(columns)
    check_options(prefix, output_length)  # fail when the workflow is built, not on a worker

    def pseudonymise_table(table: pa.Table, ctx: StageContext | None = None) -> pa.Table:
        key = load_key(key_env, key_file_env)  # on the worker, so the key never travels with the stage
        _record(ctx, names, key)
        return pseudonymise(table, names, key, prefix=prefix, output_length=output_length)

    return stage(
        pseudonymise_table,
        name=name,
        cpus=cpus,
        inputs={"table": input_name},
        cache=False,
        version=_version("pseudonymise", names, prefix, output_length),
    )


def pseudonymise_source(
    loader: Callable[[], pa.Table],
    columns: Sequence[str],
    *,
    name: str = "pseudonymise",
    cpus: float = 1.0,
    prefix: str = "",
    output_length: int = 32,
    key_env: str = KEY_ENV,
    key_file_env: str = KEY_FILE_ENV,
) -> Stage:
    """A source stage that calls `loader()` and returns only the pseudonymised table (recommended).

    The raw table exists only in this stage's worker memory: it is never a stage output, so it never
    reaches the artifact store, Ray's object store or a cache entry. A loader exception is reported by
    type only, because error messages are stored (run journal, MLflow) and parsers quote raw rows.
    """
    if not callable(loader):
        raise PrivacyError(f"loader must be a callable returning a pyarrow.Table, got {type(loader).__name__}")
    names = check_columns(columns)
    check_options(prefix, output_length)
    loader_name = f"{getattr(loader, '__module__', '?')}.{getattr(loader, '__qualname__', type(loader).__name__)}"

    def pseudonymise_loaded(ctx: StageContext | None = None) -> pa.Table:
        key = load_key(key_env, key_file_env)
        try:
            raw = loader()
        except Exception as exc:
            raise PrivacyError(
                f"loader {loader_name} raised {type(exc).__name__}; its message is withheld because it may "
                f"quote raw identifiers; call the loader outside tierflow to see it"
            ) from None
        if not isinstance(raw, pa.Table):
            raise PrivacyError(f"loader {loader_name} returned {type(raw).__name__}, not a pyarrow.Table")
        _record(ctx, names, key)
        return pseudonymise(raw, names, key, prefix=prefix, output_length=output_length)

    return stage(
        pseudonymise_loaded,
        name=name,
        cpus=cpus,
        cache=False,
        version=_version("pseudonymise_source", names, prefix, output_length, loader=loader_name),
    )


__all__ = ["pseudonymise_source", "pseudonymise_stage"]
