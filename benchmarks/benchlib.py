"""What every benchmark script shares: the machine line and writing its section of BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import re
import sys
from pathlib import Path

BENCH_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = """# Benchmarks

Figures here come from the scripts under `benchmarks/`; each section is written by its script with
`--write` and records the date, the machine (cores, RAM, CPU model), the Python and Ray versions and
the exact command that produced it. Re-run the command to refresh a section; other sections are kept.
"""


def machine() -> str:
    cpuinfo, meminfo = Path("/proc/cpuinfo").read_text(), Path("/proc/meminfo").read_text()
    model = m.group(1).strip() if (m := re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)) else platform.processor()
    kib = int(m.group(1)) if (m := re.search(r"^MemTotal:\s*(\d+) kB", meminfo, re.M)) else 0
    return f"{os.cpu_count()} cores, {kib / 2**20:.1f} GiB RAM, {model}"


def publish(section: str, body: str, write: bool) -> None:
    """Print the report; with `write`, replace (or append) this script's block in BENCHMARKS.md."""
    print(body)
    if not write:
        return
    begin, end = f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"
    block = f"{begin}\n{body}\n{end}"
    text = BENCH_MD.read_text() if BENCH_MD.exists() else HEADER
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    BENCH_MD.write_text(text)
    print(f"\nwrote section {section!r} to {BENCH_MD}", file=sys.stderr)


def settle(timeout_s: float = 30.0) -> None:
    """Wait until every CPU is free again: `ray.kill` returns before the actor's resources do."""
    import time  # noqa: PLC0415

    import ray  # noqa: PLC0415  # only the Ray benchmarks need it

    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0) - 1e-6:
        if time.monotonic() > deadline:
            raise RuntimeError(f"CPUs still held after {timeout_s}s: {ray.available_resources()}")
        time.sleep(0.02)
