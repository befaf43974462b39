"""Where the tiers are. One documented place, three spellings (README "Configuration"):

1. `--store` / `$TIERFLOW_STORE`: comma-separated URLs, fastest first, the last one durable, each with
   optional `#role=warm&capacity=2GiB&key=env:TIERFLOW_KEY`; or the path of a TOML file.
2. `./tierflow.toml` (`[[store.tiers]]` tables with url, role, capacity, encryption_key, storage_options).
3. Defaults: a 1 GiB `memory://` hot tier and `./.tierflow/store` (`~/.tierflow/store` in a Ray job).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from storage.errors import StorageError
from storage.tiers import DURABLE, HOT, WARM, TierSpec
from storage.units import parse_size

ENV_TIERS = "TIERFLOW_STORE"
ENV_PICKLE = "TIERFLOW_ALLOW_PICKLE"
CONFIG_FILE = "tierflow.toml"
DEFAULT_HOT_CAPACITY = 1 << 30
DEFAULT_WARM_CAPACITY = 20 << 30
# Set by Ray's job supervisor for the driver of a `ray job submit` job, whose cwd is an unpacked,
# temporary copy of the working dir: defaults there would vanish with the job.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def default_home() -> str:
    """`./.tierflow` normally; `~/.tierflow` inside a submitted Ray job."""
    if os.environ.get(RAY_JOB_ENV):
        return os.path.join(os.path.expanduser("~"), ".tierflow")
    return os.path.abspath(".tierflow")


def default_durable_url() -> str:
    return os.path.join(default_home(), "store")


def _absolute(url: str) -> str:
    # A relative local path must mean the driver's cwd, not each Ray worker's.
    return url if "://" in url else os.path.abspath(url)


@dataclass(frozen=True)
class StoreConfig:
    """Tiers fastest first; the last one is durable. Plain data so it travels to Ray actors.

    `allow_pickle` is the explicit opt-in for `storage.Pickled` values (off by default).
    """

    tiers: tuple[TierSpec, ...]
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        if not self.tiers:
            raise StorageError("a store needs at least one tier; the last one must be durable")
        roles = [t.role for t in self.tiers]
        if roles[-1] != DURABLE or roles.count(DURABLE) != 1:
            raise StorageError(f"exactly one durable tier, the last, is needed; got roles {roles}")

    @property
    def durable_url(self) -> str:
        return self.tiers[-1].url

    @classmethod
    def from_urls(cls, urls: list[str] | str, *, allow_pickle: bool | None = None) -> StoreConfig:
        """`memory://x,/data/store`: memory URLs are hot, the last URL durable, the rest warm."""
        items = [u.strip() for u in (urls.split(",") if isinstance(urls, str) else urls) if u.strip()]
        if not items:
            raise StorageError(f"no tier URLs given; expected e.g. memory://tierflow,{default_durable_url()}")
        specs = []
        for i, item in enumerate(items):
            url, _, fragment = item.partition("#")
            opts = dict(parse_qsl(fragment, keep_blank_values=True))
            default_role = DURABLE if i == len(items) - 1 else (HOT if url.startswith("memory://") else WARM)
            specs.append(_spec({"url": url, "role": opts.pop("role", default_role), **opts}, item))
        return cls(tuple(specs), _pickle_opt_in(allow_pickle))

    @classmethod
    def from_file(cls, path: str | Path) -> StoreConfig:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise StorageError(f"cannot read store config {path}: {exc}") from exc
        store = raw.get("store", {})
        tiers = store.get("tiers")
        if not isinstance(tiers, list) or not tiers:
            raise StorageError(f"{path}: expected [[store.tiers]] tables with at least url and role")
        return cls(
            tuple(_spec(t, f"{path} tier {i}") for i, t in enumerate(tiers)), _pickle_opt_in(store.get("allow_pickle"))
        )

    @classmethod
    def resolve(cls, value: str | None = None) -> StoreConfig:
        """The flag value, else `$TIERFLOW_STORE`, else `./tierflow.toml`, else the defaults."""
        text = value or os.environ.get(ENV_TIERS)
        if text:
            return cls.from_file(text) if text.strip().endswith(".toml") else cls.from_urls(text)
        if Path(CONFIG_FILE).is_file():
            return cls.from_file(CONFIG_FILE)
        return cls.from_urls([f"memory://tierflow#capacity={DEFAULT_HOT_CAPACITY}", default_durable_url()])

    default = resolve  # the common spelling: StoreConfig.default()


def _spec(raw: dict[str, Any], where: str) -> TierSpec:
    unknown = set(raw) - {"url", "role", "capacity", "key", "encryption_key", "storage_options"}
    if unknown:
        raise StorageError(
            f"{where}: unknown tier settings {sorted(unknown)}; use role, capacity, key, storage_options"
        )
    if "url" not in raw:
        raise StorageError(f"{where}: a tier needs a url")
    role = raw.get("role", DURABLE)
    capacity = raw.get("capacity")
    if capacity is None and role != DURABLE:
        capacity = DEFAULT_HOT_CAPACITY if role == HOT else DEFAULT_WARM_CAPACITY
    try:
        size = parse_size(capacity, "capacity") if capacity is not None else None
    except ValueError as exc:
        raise StorageError(f"{where}: {exc}") from None
    return TierSpec(
        url=_absolute(str(raw["url"])),
        role=role,
        capacity_bytes=size,
        encryption_key=raw.get("encryption_key") or raw.get("key") or None,
        storage_options=dict(raw.get("storage_options") or {}),
    )


def _pickle_opt_in(value: bool | None) -> bool:
    if value is not None:
        return bool(value)
    return os.environ.get(ENV_PICKLE, "") == "1"
