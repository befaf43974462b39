"""`tierflow store ls | info ARTIFACT | verify | gc [--dry-run]`."""

from __future__ import annotations

import argparse
import json
import time

from rich.console import Console
from rich.table import Table

from storage import ArtifactStore, StoreConfig
from storage import maintenance as m


def add_parser(sub: argparse._SubParsersAction) -> None:
    store = sub.add_parser("store", help="inspect and maintain the artifact store")
    ops = store.add_subparsers(dest="store_command", required=True)
    ops.add_parser("ls", help="list committed artifacts")
    info = ops.add_parser("info", help="one artifact: manifest and which tiers hold an intact copy")
    info.add_argument("artifact", help="RUN_ID/STAGE, a digest, or a digest prefix (8+ hex)")
    ops.add_parser("verify", help="re-hash every blob in every tier; repair from intact copies")
    gc = ops.add_parser("gc", help="delete blobs no manifest or cache entry references")
    gc.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    gc.add_argument(
        "--min-age-s",
        type=float,
        default=m.DEFAULT_GC_MIN_AGE_S,
        help="keep unreferenced blobs younger than this (a writer may be mid-commit)",
    )
    for p in (store, *ops.choices.values()):
        p.add_argument("--store", dest="store_urls", help="tier URLs or a .toml file (default: see README)")


def run(args: argparse.Namespace, console: Console) -> int:
    store = ArtifactStore(StoreConfig.resolve(args.store_urls))
    cmd = args.store_command
    if cmd == "ls":
        table = Table(title=f"artifacts in {store.durable.url}")
        for col in ("run", "stage", "format", "size", "digest", "created"):
            table.add_column(col, no_wrap=col == "digest")
        for ref in sorted(store.manifests(), key=lambda r: (r.created_at, r.run_id)):
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ref.created_at))
            table.add_row(ref.run_id, ref.stage, ref.format, _size(ref.size_bytes), ref.digest[:16], created)
        console.print(table)
        return 0
    if cmd == "info":
        for ref in m.find(store, args.artifact):
            console.print_json(ref.to_json().decode())
            for tier, state in m.holders(store, ref.digest).items():
                console.print(f"  {state:<8} {tier}")
        return 0
    if cmd == "verify":
        report = m.verify(store)
        for r in report.repairs:
            console.print(f"{r.action}: blob {r.digest} in {r.tier}")
        for miss in report.missing:
            console.print(f"missing: {miss}")
        console.print(
            f"checked {report.checked} copies: {len(report.repairs)} bad, {len(report.missing)} missing; "
            f"{'OK' if report.ok else 'NOT OK'}"
        )
        return 0 if report.ok else 1
    found = m.gc(store, dry_run=args.dry_run, min_age_s=args.min_age_s)
    verb = "would delete" if args.dry_run else "deleted"
    for g in found:
        console.print(f"{verb} {g.tier}/{g.key} ({_size(g.size)})")
    console.print(json.dumps({"action": verb, "count": len(found), "bytes": sum(g.size for g in found)}))
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n}"
