"""Byte sizes from config text ('512MiB', '2GB', 1024): shared by tier capacities and memory requests."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*")


def parse_size(value: int | float | str, what: str = "size") -> int:
    """Positive bytes; raise ValueError with a message that shows the accepted forms."""
    if isinstance(value, bool):
        raise ValueError(f"{what}={value!r} is a bool; give bytes or a string like '2GiB'")
    if isinstance(value, int | float):
        number, unit = float(value), ""
    elif isinstance(value, str) and (m := _SIZE.fullmatch(value)):
        number, unit = float(m.group(1)), m.group(2).lower()
    else:
        raise ValueError(f"{what}={value!r} is not a size; give bytes or a string like '2GiB'")
    if unit not in _UNITS:
        raise ValueError(f"{what}={value!r}: unknown unit {unit!r}; use one of B, KB, MB, GB, KiB, MiB, GiB")
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"{what}={value!r} must be positive")
    return size
