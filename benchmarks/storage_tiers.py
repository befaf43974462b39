"""Storage tiers: tierflow `ArtifactStore` put/get through each tier vs raw pyarrow + fsspec doing the same I/O.

One Arrow table (16 float64 columns) as an Arrow IPC stream, both sides in one process: hot = get from `memory://`
vs `open_stream(py_buffer(bytes))`; local = put into a local-dir durable tier vs `fs.open` + `new_stream`, get via
`[warm, durable]` vs `fs.cat_file` + `open_stream`; s3 (moto on loopback) = put/get vs `pipe_file` / `cat_file`.
tierflow also sha256-hashes blobs (put; reads from non-memory tiers) and writes manifests; raw does not.
Reference rows (no target) pit the same tierflow reads against a raw `mmap` read that faults every page in.
Repetitions interleave the two sides (tierflow first on odd repetitions); medians are reported.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import gc
import logging
import mmap
import os
import platform
import pstats
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
from benchlib import machine, publish

from storage import ArtifactRef, ArtifactStore, StoreConfig, TierSpec
from storage.store import blob_key

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
    hot: bool = False  # target: tierflow >= 5 GB/s (else tierflow/raw >= 0.8x)
    reference: bool = False  # no target: a different raw peer, shown for context
    times: dict[str, list[float]] = field(default_factory=lambda: {"tierflow": [], "raw": []})


def write_stream(sink: Any, table: pa.Table) -> Any:
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink


def encode(table: pa.Table) -> pa.Buffer:
    return write_stream(pa.BufferOutputStream(), table).getvalue()


def decode(data: Any) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def write_file(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> None:
    with fs.open(path, "wb") as f:
        write_stream(f, table)
        if fs.protocol in ("file", ("file", "local")):  # the same durability tierflow's durable tier pays
            f.flush()
            os.fsync(f.fileno())


def map_read(path: str) -> pa.Table:
    """Raw read without a copy: map the file, every page faulted in up front (the same disk reads)."""
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
    return decode(mapped)


def cache_in(path: str) -> Fn:
    """Read a file once, untimed, so a 'cached' case really starts from the page cache: without it, the
    previous case's cache drop for the other side evicted this side's file on alternate repetitions."""

    def run() -> None:
        buf = bytearray(16 << 20)
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass

    return run


def drop_caches() -> bool:
    os.sync()
    with contextlib.suppress(OSError):
        return Path("/proc/sys/vm/drop_caches").write_text("3\n") > 0
    return False


def rm(fs: fsspec.AbstractFileSystem, path: str) -> Fn:
    return lambda: fs.rm(path, recursive=True) if fs.exists(path) else None


def zero_copy(store: ArtifactStore, ref: ArtifactRef) -> str:
    """Do a hot read's buffers point into the stored bytes, with no Arrow allocation?"""
    stored, before = pa.py_buffer(store.tiers[0].read(blob_key(ref.digest))), pa.total_allocated_bytes()
    got, lo, hi = store.get(ref), stored.address, stored.address + stored.size
    grew = pa.total_allocated_bytes() - before
    bufs = [b for col in got.columns for chunk in col.chunks for b in chunk.buffers() if b is not None]
    inside = sum(lo <= b.address and b.address + b.size <= hi for b in bufs)
    ok = inside == len(bufs) and grew < (1 << 20)
    return f"zero-copy {'yes' if ok else 'NO'}: {inside}/{len(bufs)} buffers inside the stored blob, Arrow +{grew} B"


def measure(cases: list[Case], repeats: int) -> None:
    for rep in range(repeats):
        for case in cases:
            for side in ("tierflow", "raw") if rep % 2 == 0 else ("raw", "tierflow"):
                case.prep.get(side, lambda: None)()
                os.sync()  # no write-back of an earlier case inside this timing
                gc.collect()
                t0 = time.perf_counter()
                result = getattr(case, side)()
                case.times[side].append(time.perf_counter() - t0)
                del result
            tf, raw = case.times["tierflow"][-1], case.times["raw"][-1]
            print(f"rep {rep + 1}/{repeats} {case.tier} {case.op}: tierflow {tf:.4f}s raw {raw:.4f}s", file=sys.stderr)


def cell(nbytes: int, times: list[float]) -> str:
    med, lo, hi = statistics.median(times), min(times), max(times)
    unit, k = ("ms", 1e3) if hi < 0.1 else ("s", 1)
    return f"{nbytes / med / 1e9:,.2f} ({med * k:.3g} {unit}; {lo * k:.3g}-{hi * k:.3g})"


def report(cases: list[Case], repeats: int, head: list[str], extra: list[str]) -> str:
    rows, misses = [], []
    for c in cases:
        tf, raw = (statistics.median(c.times[s]) for s in ("tierflow", "raw"))
        met = c.nbytes / tf / 1e9 >= 5 if c.hot else raw / tf >= 0.8
        misses += [] if met or c.reference else [f"{c.tier} {c.op}"]
        target = "none (reference)" if c.reference else f"{'>= 5 GB/s' if c.hot else '>= 0.8x'}: "
        target += "" if c.reference else ("met" if met else "**missed**")
        rows.append(
            f"| {c.tier} | {c.op} | {c.nbytes / 2**20:,.0f} | {cell(c.nbytes, c.times['tierflow'])} | "
            f"{cell(c.nbytes, c.times['raw'])} | {raw / tf:.2f}x | {target} | {c.note} |"
        )
    return "\n".join(
        [
            *head,
            f"- GB/s = Arrow IPC stream bytes / wall time (1 GB = 1e9 B), median of {repeats} repetition(s) (median "
            "time; min-max), tierflow and raw interleaved; ratio = tierflow GB/s / raw GB/s. Reads include decoding "
            "to a `pa.Table`, puts include encoding; tierflow also sha256-hashes (on put and on reads from "
            "non-memory tiers) and writes a manifest.",
            *extra,
            "",
            "| tier | op | MiB | tierflow GB/s (time) | raw GB/s (time) | ratio | target | notes |",
            "|---|---|---:|---:|---:|---:|---|---|",
            *rows,
            "",
            f"- Below target: {', '.join(misses)}." if misses else "- Every target met.",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--gib", type=float, default=1.0, help="table size for the hot and local tiers (default 1.0)")
    parser.add_argument("--s3-gib", type=float, default=0.25, help="table size for the S3 tier (default 0.25)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per case (default 3)")
    parser.add_argument("--profile", type=int, metavar="N", default=0, help="then cProfile each tierflow op, top N")
    parser.add_argument("--write", action="store_true", help=f"update the section in {'BENCHMARKS.md'}")
    args = parser.parse_args()
    if args.gib <= 0 or args.s3_gib <= 0 or args.repeats < 1:
        parser.error("need --gib > 0, --s3-gib > 0, --repeats >= 1")
    command = shlex.join(["cd", "/work/main"]) + " && " + shlex.join([".venv/bin/python", *sys.argv])
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from moto.server import ThreadedMotoServer  # noqa: PLC0415  # slow import, only needed here

    load_before = Path("/proc/loadavg").read_text().split()[:3]
    rng = np.random.default_rng(0)
    table = pa.table({f"c{i:02d}": rng.random(int(args.gib * GIB) // (COLS * 8)) for i in range(COLS)})
    s3_table = table.slice(0, int(args.s3_gib * GIB) // (COLS * 8))
    raw_bytes = encode(table).to_pybytes()
    size, s3_size = len(raw_bytes), encode(s3_table).size
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    tmp = tempfile.mkdtemp(prefix="tierflow-bench-tiers-")
    try:
        host, port = server.get_host_and_port()
        opts = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing", "use_listings_cache": 0}
        s3, local = fsspec.filesystem("s3", **opts), fsspec.filesystem("file")
        s3.mkdir("bench")
        durable = TierSpec(f"{tmp}/durable", "durable")
        hot = ArtifactStore(StoreConfig((TierSpec("memory://bench-tiers", "hot", capacity_bytes=4 * GIB), durable)))
        hot_ref = hot.put(table, run_id="bench", stage="hot")
        assert hot.get(hot_ref).equals(table)
        warm = ArtifactStore(StoreConfig((TierSpec(f"{tmp}/warm", "warm", capacity_bytes=4 * GIB), durable)))
        warm_ref = warm.put(table, run_id="bench", stage="warm")  # blob already durable: only the warm copy is new
        put_store = ArtifactStore(StoreConfig((TierSpec(f"{tmp}/put", "durable"),)))
        s3_store = ArtifactStore(StoreConfig((TierSpec("s3://bench/tf", "durable", storage_options=opts),)))
        s3_read = ArtifactStore(StoreConfig((TierSpec("s3://bench/tf-read", "durable", storage_options=opts),)))
        s3_ref = s3_read.put(s3_table, run_id="bench", stage="read")
        raw_path = f"{tmp}/raw.arrows"
        write_file(local, raw_path, table)
        assert decode(local.cat_file(raw_path)).equals(table)
        s3.pipe_file("bench/raw-read.arrows", encode(s3_table).to_pybytes())
        dropped = drop_caches()
        cache_prep = {"tierflow": drop_caches, "raw": drop_caches} if dropped else {}
        cache_note = "page cache dropped before each read" if dropped else "from the page cache (could not drop it)"
        warm_prep = {"tierflow": cache_in(f"{tmp}/warm/{blob_key(warm_ref.digest)}"), "raw": cache_in(raw_path)}
        cases = [
            Case("hot (`memory://`)", "read", size, lambda: hot.get(hot_ref), lambda: decode(raw_bytes),
                 note="zero-copy on both sides: time is per-call overhead, independent of size", hot=True),
            Case("durable (local dir)", "put", size, lambda: put_store.put(table, run_id="bench", stage="put"),
                 lambda: write_file(local, raw_path + ".w", table),
                 {"tierflow": rm(local, f"{tmp}/put"), "raw": rm(local, raw_path + ".w")},
                 "fsync before it counts, on both sides; tierflow hashes while Arrow writes"),
            Case("warm (local dir)", "read", size, lambda: warm.get(warm_ref), lambda: decode(local.cat_file(raw_path)),
                 cache_prep, cache_note),
            Case("warm (local dir)", "read, cached", size, lambda: warm.get(warm_ref),
                 lambda: decode(local.cat_file(raw_path)), warm_prep,
                 "each side's file read into the page cache (untimed) just before"),
            Case("warm (local dir)", "read vs raw mmap", size, lambda: warm.get(warm_ref), lambda: map_read(raw_path),
                 cache_prep, f"{cache_note}; raw = `mmap` + `MAP_POPULATE`, no copy, no hash", reference=True),
            Case("warm (local dir)", "read, cached, vs raw mmap", size, lambda: warm.get(warm_ref),
                 lambda: map_read(raw_path), warm_prep, "as above, from the page cache", reference=True),
            Case("cold (S3, moto)", "put", s3_size, lambda: s3_store.put(s3_table, run_id="bench", stage="put"),
                 lambda: s3.pipe_file("bench/raw.arrows", encode(s3_table).to_pybytes()),
                 {"tierflow": rm(s3, "bench/tf"), "raw": rm(s3, "bench/raw.arrows")},
                 "multipart PUT, 50 MiB parts; raw also copies to `bytes` (botocore takes no memoryview)"),
            Case("cold (S3, moto)", "read", s3_size, lambda: s3_read.get(s3_ref),
                 lambda: decode(s3.cat_file("bench/raw-read.arrows")), note="one GET; tierflow also HEADs"),
        ]  # fmt: skip
        extra = [
            f"- Hot tier: {zero_copy(hot, hot_ref)} (checked once, outside the timings).",
            f"- Local tiers: files under {tempfile.gettempdir()} on the root disk; cold reads: {cache_note}. Put "
            "times swing on both sides with the virtual disk (fsync of newly allocated blocks is slower).",
            "- S3: a moto `ThreadedMotoServer` on 127.0.0.1 inside this process (it shares the GIL and the cores with "
            "the client) keeps objects in `SpooledTemporaryFile`s (RAM up to 5 MiB, then anonymous temp files), so "
            "this measures HTTP + botocore + moto, not a network or real S3.",
        ]
        measure(cases, args.repeats)
        for case in cases if args.profile else []:  # where tierflow's time goes, after the timed runs
            case.prep.get("tierflow", lambda: None)()
            (prof := cProfile.Profile()).runcall(case.tierflow)
            print(f"\n== cProfile: tierflow {case.tier} {case.op}, top {args.profile} by tottime", file=sys.stderr)
            pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(args.profile)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        server.stop()
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    head = [
        f"## Storage tiers: tierflow put/get vs raw pyarrow + fsspec ({args.gib:g} GiB table, S3 {args.s3_gib:g} GiB)",
        "",
        f"- Date: {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"- Machine: {machine()}; load average (1/5/15 min) {' '.join(load_before)} before, "
        f"{' '.join(load_after)} after",
        f"- Python {platform.python_version()}, pyarrow {pa.__version__}, fsspec {fsspec.__version__}",
        f"- Command: `{command}`",
    ]
    body = report(cases, args.repeats, head, extra)
    publish(SECTION, body, args.write)


if __name__ == "__main__":
    main()
