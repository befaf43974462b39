"""Storage tiers: tierflow `ArtifactStore` put/get through each tier vs raw pyarrow + fsspec doing the same I/O.

Both sides move the same Arrow table (16 float64 columns) encoded as an Arrow IPC stream, in one process:
  hot    store.get from a `memory://` tier  vs  `pa.ipc.open_stream(pa.py_buffer(bytes)).read_all()`
  local  store.put into a store whose only (durable) tier is a local dir  vs  `fs.open(path, "wb")` +
         `pa.ipc.new_stream`; store.get through a `[warm, durable]` pair (warm is the fastest holder)
         vs `fs.cat_file` + `open_stream`
  s3     store.put/get on an s3:// durable tier (moto server on loopback, in this process)  vs
         `fs.pipe_file(path, encoded bytes)` / `fs.cat_file` + `open_stream`
tierflow also sha256-hashes every blob on put and on non-memory reads and writes a manifest; raw does not.
Repetitions are interleaved (tierflow first on odd repetitions, raw first on even); medians are reported.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import gc
import logging
import os
import platform
import pstats
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa

from storage import ArtifactRef, ArtifactStore, StoreConfig, TierSpec
from storage.store import blob_key

BENCH_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
SECTION = "storage_tiers"
GIB = 1 << 30
COLS = 16
Fn = Callable[[], Any]


@dataclass
class Case:
    tier: str
    op: str
    nbytes: int
    tierflow: Fn
    raw: Fn
    prep: dict[str, Fn] = field(default_factory=dict)  # untimed, before each timed call of that side
    note: str = ""
    target: str = "ratio"  # "ratio": tierflow/raw >= 0.8; "hot": tierflow >= 5 GB/s
    times: dict[str, list[float]] = field(default_factory=lambda: {"tierflow": [], "raw": []})


def make_table(gib: float) -> pa.Table:
    rng = np.random.default_rng(0)
    return pa.table({f"c{i:02d}": rng.random(int(gib * GIB) // (COLS * 8)) for i in range(COLS)})


def encode(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def decode(data: Any) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def write_stream(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> None:
    with fs.open(path, "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
        writer.write_table(table)


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def rm(fs: fsspec.AbstractFileSystem, path: str) -> Fn:
    return lambda: fs.rm(path, recursive=True) if fs.exists(path) else None


def zero_copy(store: ArtifactStore, ref: ArtifactRef) -> str:
    """Do the table's buffers from a hot read point into the stored bytes, and did Arrow allocate nothing?"""
    stored = pa.py_buffer(store.tiers[0].read(blob_key(ref.digest)))
    lo, hi = stored.address, stored.address + stored.size
    before = pa.total_allocated_bytes()
    got = store.get(ref)
    grew = pa.total_allocated_bytes() - before
    bufs = [b for col in got.columns for chunk in col.chunks for b in chunk.buffers() if b is not None]
    inside = sum(lo <= b.address and b.address + b.size <= hi for b in bufs)
    ok = inside == len(bufs) and grew < (1 << 20)
    return f"zero-copy {'yes' if ok else 'NO'}: {inside}/{len(bufs)} buffers inside the stored blob, Arrow +{grew} B"


def measure(cases: list[Case], repeats: int) -> None:
    for rep in range(repeats):
        for case in cases:
            for side in ("tierflow", "raw") if rep % 2 == 0 else ("raw", "tierflow"):
                os.sync()
                case.prep.get(side, lambda: None)()
                gc.collect()
                t0 = time.perf_counter()
                result = getattr(case, side)()
                case.times[side].append(time.perf_counter() - t0)
                del result
            tf, raw = case.times["tierflow"][-1], case.times["raw"][-1]
            print(f"rep {rep + 1}/{repeats} {case.tier} {case.op}: tierflow {tf:.3f}s raw {raw:.3f}s", file=sys.stderr)


def machine() -> str:
    cpuinfo, meminfo = Path("/proc/cpuinfo").read_text(), Path("/proc/meminfo").read_text()
    model = m.group(1).strip() if (m := re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)) else platform.processor()
    kib = int(m.group(1)) if (m := re.search(r"^MemTotal:\s*(\d+) kB", meminfo, re.M)) else 0
    return f"{os.cpu_count()} cores, {kib / 2**20:.1f} GiB RAM, {model}"


def write_section(body: str) -> None:
    """Replace this script's block in BENCHMARKS.md (or append it); other sections are kept."""
    begin, end = f"<!-- BEGIN {SECTION} -->", f"<!-- END {SECTION} -->"
    block = f"{begin}\n{body}\n{end}"
    text = BENCH_MD.read_text()
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    BENCH_MD.write_text(text)


def profile(cases: list[Case], top: int) -> None:
    for case in cases:
        case.prep.get("tierflow", lambda: None)()
        prof = cProfile.Profile()
        prof.runcall(case.tierflow)
        print(f"\n== cProfile: tierflow {case.tier} {case.op} (top {top} by tottime)", file=sys.stderr)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(top)


def report(cases: list[Case], repeats: int, command: str, gib: float, s3_gib: float, extra: list[str]) -> str:
    rows, misses = [], []
    for c in cases:
        tf, raw = (statistics.median(c.times[s]) for s in ("tierflow", "raw"))
        tf_gbs, raw_gbs, ratio = c.nbytes / tf / 1e9, c.nbytes / raw / 1e9, raw / tf
        met = tf_gbs >= 5 if c.target == "hot" else ratio >= 0.8
        goal = ">= 5 GB/s" if c.target == "hot" else ">= 0.8x"
        misses += [] if met else [f"{c.tier} {c.op}"]
        rows.append(
            f"| {c.tier} | {c.op} | {c.nbytes / 2**20:,.0f} | {tf_gbs:.2f} ({tf:.3f} s) | {raw_gbs:.2f} ({raw:.3f} s)"
            f" | {ratio:.2f}x | {goal}: {'met' if met else '**missed**'} | {c.note} |"
        )
    return "\n".join(
        [
            f"## Storage tiers: tierflow put/get vs raw pyarrow + fsspec ({gib:g} GiB table; S3 {s3_gib:g} GiB)",
            "",
            f"- Date: {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
            f"- Machine: {machine()}",
            f"- Python {platform.python_version()}, pyarrow {pa.__version__}, fsspec {fsspec.__version__}",
            f"- Command: `{command}`",
            f"- Table: {COLS} float64 columns of random values, written as one Arrow IPC stream (size column, MiB). "
            f"GB/s = stream bytes / wall time (1 GB = 1e9 B); median of {repeats} repetitions, tierflow and raw "
            "interleaved; ratio = tierflow GB/s / raw GB/s. Reads include decoding to a `pa.Table`, puts include "
            "encoding; tierflow also sha256-hashes (put, and reads from non-memory tiers) and writes a manifest.",
            *extra,
            "",
            "| tier | op | MiB | tierflow GB/s (median) | raw GB/s (median) | ratio | target | notes |",
            "|---|---|---:|---:|---:|---:|---|---|",
            *rows,
            "",
            f"- Below target: {', '.join(misses)}" if misses else "- Every target met.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--gib", type=float, default=1.0, help="table size for hot and local tiers (default 1.0)")
    parser.add_argument("--s3-gib", type=float, default=0.25, help="table size for the S3 tier (default 0.25)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per case (default 3)")
    parser.add_argument("--profile", type=int, metavar="N", default=0, help="then cProfile each tierflow op, top N")
    parser.add_argument("--write", action="store_true", help="update the section in BENCHMARKS.md")
    args = parser.parse_args()
    if args.gib <= 0 or args.s3_gib <= 0 or args.repeats < 1:
        parser.error("need --gib > 0, --s3-gib > 0, --repeats >= 1")
    command = shlex.join(["cd", "/work/main"]) + " && " + shlex.join([".venv/bin/python", *sys.argv])
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from moto.server import ThreadedMotoServer  # noqa: PLC0415  # slow import, only here

    table = make_table(args.gib)
    s3_table = table.slice(0, int(args.s3_gib * GIB) // (COLS * 8))
    raw_bytes = encode(table).to_pybytes()
    size, s3_size = len(raw_bytes), encode(s3_table).size
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    tmp = tempfile.mkdtemp(prefix="tierflow-bench-tiers-")
    try:
        host, port = server.get_host_and_port()
        opts = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
        opts["use_listings_cache"] = False
        s3, local = fsspec.filesystem("s3", **opts), fsspec.filesystem("file")
        s3.mkdir("bench")
        durable = TierSpec(f"{tmp}/durable", "durable")
        hot = ArtifactStore(StoreConfig((TierSpec("memory://bench-tiers", "hot", capacity_bytes=4 * GIB), durable)))
        hot_ref = hot.put(table, run_id="bench", stage="hot")
        assert hot.get(hot_ref).equals(table)
        warm = ArtifactStore(StoreConfig((TierSpec(f"{tmp}/warm", "warm", capacity_bytes=4 * GIB), durable)))
        warm_ref = warm.put(table, run_id="bench", stage="warm")  # blob already durable: only the warm copy is new
        put_store = ArtifactStore(StoreConfig((TierSpec(f"{tmp}/put", "durable"),)))
        s3_spec = TierSpec("s3://bench/tf", "durable", storage_options=opts)
        s3_store = ArtifactStore(StoreConfig((s3_spec,)))
        s3_read = ArtifactStore(StoreConfig((TierSpec("s3://bench/tf-read", "durable", storage_options=opts),)))
        s3_ref = s3_read.put(s3_table, run_id="bench", stage="read")
        raw_path = f"{tmp}/raw.arrows"
        write_stream(local, raw_path, table)
        assert decode(local.cat_file(raw_path)).equals(table)
        s3.pipe_file("bench/raw-read.arrows", encode(s3_table).to_pybytes())
        dropped = drop_caches()
        cache_prep = {"tierflow": drop_caches, "raw": drop_caches} if dropped else {}
        cache_note = "page cache dropped before each read" if dropped else "from the page cache (could not drop it)"
        cases = [
            Case("hot (`memory://`)", "read", size, lambda: hot.get(hot_ref), lambda: decode(raw_bytes),
                 note="no hashing on hot reads; both sides zero-copy", target="hot"),
            Case("durable (local dir)", "put", size, lambda: put_store.put(table, run_id="bench", stage="put"),
                 lambda: write_stream(local, raw_path + ".w", table),
                 {"tierflow": rm(local, f"{tmp}/put"), "raw": rm(local, raw_path + ".w")},
                 "into the page cache, no fsync on either side"),
            Case("warm (local dir)", "read", size, lambda: warm.get(warm_ref), lambda: decode(local.cat_file(raw_path)),
                 cache_prep, cache_note),
            Case("warm (local dir)", "read, cached", size, lambda: warm.get(warm_ref),
                 lambda: decode(local.cat_file(raw_path)), note="file already in the page cache on both sides"),
            Case("cold (S3, moto)", "put", s3_size, lambda: s3_store.put(s3_table, run_id="bench", stage="put"),
                 lambda: s3.pipe_file("bench/raw.arrows", encode(s3_table).to_pybytes()),
                 {"tierflow": rm(s3, "bench/tf"), "raw": rm(s3, "bench/raw.arrows")},
                 "multipart PUT (50 MiB parts); raw also copies to `bytes` (botocore needs bytes)"),
            Case("cold (S3, moto)", "read", s3_size, lambda: s3_read.get(s3_ref),
                 lambda: decode(s3.cat_file("bench/raw-read.arrows")), note="GET; tierflow also HEADs"),
        ]  # fmt: skip
        extra = [
            f"- Hot tier: {zero_copy(hot, hot_ref)} (checked once after the put).",
            f"- Local tiers: files under {tempfile.gettempdir()} on the root disk; reads {cache_note}.",
            "- S3: a moto `ThreadedMotoServer` on 127.0.0.1 in this process (shares the GIL and the 2 cores with the "
            "client); it keeps objects in `SpooledTemporaryFile`s (RAM up to 5 MiB, then anonymous temp files), so "
            "this measures HTTP + botocore + moto overhead, not a network or real S3.",
        ]
        measure(cases, args.repeats)
        if args.profile:
            profile(cases, args.profile)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        server.stop()
    body = report(cases, args.repeats, command, args.gib, args.s3_gib, extra)
    print(body)
    if args.write:
        write_section(body)
        print(f"\nwrote section {SECTION!r} to BENCHMARKS.md", file=sys.stderr)


if __name__ == "__main__":
    main()
