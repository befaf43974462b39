"""Scale: fan-out/fan-in workflows of N tiny stages; does the per-stage overhead stay flat as N grows?

For each N: one source -> N parallel no-op stages (each reads the source, returns its index) -> one sink whose
N parameters are named after the N stages (built with an explicit `__signature__`). Every stage asks for
`cpus=1`, so a run holds as many warm actors as the cluster has CPUs and the N stages queue on them.
Peers, each timed as a whole run (call until the sink's output is committed / on the driver):
  tierflow   `run_workflow`, cache off, no hooks, memory + local-dir store
  tierflow+MLflow  the same with the MLflow hook (sqlite in the temp dir; above 500 stages the summary mode)
  raw Ray    the same DAG by hand: create one `@ray.remote(num_cpus=1)` actor per CPU, source call, N calls
             round-robin passing the source's ObjectRef, one sink call taking all N refs, `ray.get`, kill
Repetitions are interleaved; with `--profile` one N (default: the largest up to 10,000) is run once more under
cProfile, in a fresh Ray whose stage actors profile themselves too (`TIERFLOW_ACTOR_PROFILE`).
N >= 100,000 is the slow case: one repetition, no warm-up, no MLflow peer.
The driver's peak RSS during each tierflow run is sampled (every 20 ms, /proc/self/status) above its RSS
just before the run. The CPU time of every process of the run is sampled too (/proc/<pid>/stat of this process
and its descendants, every 0.1 s; the local Ray's processes are all descendants): this process (the driver),
the stage actors (raw Ray: its workers), and Ray's own processes (raylet, GCS, idle workers). On a shared
machine wall times move with the load; CPU time per stage moves much less, and says who does the work.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import inspect
import io
import os
import platform
import pstats
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ["RAY_AUTH_MODE"] = "token"  # as `ray start` on 2.60; set before Ray is imported

import ray
from benchlib import machine, publish, settle
from stage_overhead import loadavg, revision

from actors.pool import shared_pools
from storage import ArtifactStore, StoreConfig
from workflows import Stage, Workflow, stage
from workflows.engine import run_workflow

SECTION = "scale"
SLOW = 100_000  # sizes from here: one repetition, no warm-up, no MLflow peer
PEERS = ("raw", "tierflow", "tierflow+mlflow")


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """The driver's peak RSS while a run lasts, above its RSS when the run started."""

    def __init__(self, every_s: float = 0.02) -> None:
        self.every_s, self.base, self.peak = every_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, rss_bytes())


_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds) of a process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def _role(pid: int) -> str:
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "ray"
    return "actors" if title.startswith(("ray::StageActor", "ray::Worker")) else "ray"


class CpuShare:
    """CPU seconds the run cost, per role: `driver` (this process), `actors` (stage actors; raw Ray's workers)
    and `ray` (every other descendant: raylet, GCS, idle workers). Descendants (and their roles: a worker's
    title changes when it becomes an actor) are found once a second and read every 0.1 s, so an actor killed
    at the end loses at most its last 0.1 s."""

    def __init__(self) -> None:
        self.seconds = {"driver": 0.0, "actors": 0.0, "ray": 0.0}
        self._role: dict[int, str] = {}
        self._base: dict[int, float] = {}
        self._cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _find(self) -> None:
        parent: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (st := _stat(int(entry))) is not None:
                parent[int(entry)] = st[0]
        mine, new = {os.getpid()}, {os.getpid()}
        while new:
            new = {p for p, pp in parent.items() if pp in new and p not in mine}
            mine |= new
        for pid in mine:
            self._role[pid] = "driver" if pid == os.getpid() else _role(pid)

    def _read(self) -> None:
        for pid, role in list(self._role.items()):
            if (st := _stat(pid)) is not None:
                self._cpu[pid] = st[1]
                if role == "ray":  # an idle worker Ray prestarted becomes an actor: its title says so
                    self._role[pid] = _role(pid)

    def __enter__(self) -> CpuShare:
        self._find()
        self._read()
        self._base = dict(self._cpu)
        self._thread.start()
        return self

    def _sample(self) -> None:
        found_at = time.monotonic()
        while not self._stop.wait(0.1):
            if time.monotonic() - found_at >= 1.0:
                self._find()
                found_at = time.monotonic()
            self._read()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._read()
        for pid, cpu in self._cpu.items():
            self.seconds[self._role[pid]] += cpu - self._base.get(pid, 0.0)


def source() -> dict:
    return {"v": 0}


def leaf(src: dict, i: int = 0) -> dict:
    return {"i": i + src["v"]}


def sink(**inputs: dict) -> dict:
    return {"n": len(inputs), "sum": sum(v["i"] for v in inputs.values())}


def name(i: int) -> str:
    return f"f{i:04d}"


def fan(n: int) -> tuple[Workflow, dict[str, int]]:
    """src -> f0000 .. f{n-1} -> sink, and the run-time parameters that give each leaf its index."""
    stages: list[Stage] = [stage(name="src", cpus=1)(source)]
    stages += [stage(name=name(i), cpus=1)(leaf) for i in range(n)]

    def gather(**inputs: dict) -> dict:
        return sink(**inputs)

    # The workflow model reads edges from named parameters: give the sink one per leaf.
    kw = inspect.Parameter.KEYWORD_ONLY
    gather.__signature__ = inspect.Signature([inspect.Parameter(name(i), kw, annotation=dict) for i in range(n)])
    stages.append(stage(name="sink", cpus=1)(gather))
    return Workflow(f"fan{n}", stages), {f"{name(i)}.i": i for i in range(n)}


@ray.remote(num_cpus=1)
class Worker:
    def source(self) -> dict:
        return source()

    def leaf(self, src: dict, i: int) -> dict:
        return leaf(src, i)

    def sink(self, *values: dict) -> dict:
        return sink(**{name(i): v for i, v in enumerate(values)})


def run_raw(n: int, width: int) -> dict:
    actors = [Worker.remote() for _ in range(width)]
    try:
        src = actors[0].source.remote()
        leaves = [actors[i % width].leaf.remote(src, i) for i in range(n)]
        return ray.get(actors[n % width].sink.remote(*leaves))
    finally:
        for a in actors:
            ray.kill(a)


SPLIT: dict[tuple[int, str], dict[str, list[float]]] = {}
CPU: dict[tuple[int, str], list[dict[str, float]]] = {}  # (N, peer) -> CPU seconds per role, per repetition


def run_tierflow(wf: Workflow, params: dict[str, int], store: StoreConfig, n: int, mlflow_uri: str = "") -> dict:
    from workflows.lineage import MLflowHook  # noqa: PLC0415  # else every actor that imports this module loads mlflow

    hooks = [MLflowHook(mlflow_uri)] if mlflow_uri else []
    with PeakRSS() as rss:
        run = run_workflow(wf, params=params, store_config=store, use_cache=False, hooks=hooks)
    shared_pools.release_all()  # parked warm actors would hold the CPUs the next peer needs
    recs = [run.records[s] for s in wf.order]
    assert {r.status for r in recs} == {"succeeded"}, {r.status for r in recs}
    leaves = sorted(run.records[name(i)].result.started_at for i in range(n))  # type: ignore[union-attr]
    sink_rec = run.records["sink"]
    key = (n, "mlflow" if mlflow_uri else "plain")
    split = SPLIT.setdefault(key, {"startup": [], "leaf_gap": [], "tail": [], "actors": [], "rss": [], "rss_peak": []})
    split["rss"].append(rss.peak - rss.base)
    split["rss_peak"].append(rss.peak)
    split["startup"].append(run.records["src"].result.started_at - run.started_at)  # type: ignore[union-attr]
    split["leaf_gap"].append((leaves[-1] - leaves[0]) / max(1, n - 1))
    split["tail"].append((run.ended_at or time.time()) - sink_rec.result.started_at)  # type: ignore[union-attr]
    split["actors"].append(len({r.result.pid for r in recs if r.result}))
    return ArtifactStore(store).get(sink_rec.artifact)  # type: ignore[arg-type]


def measure(sizes: list[int], repeats: int, warmup: int, root: Path, mlflow: bool) -> dict[int, dict[str, list[float]]]:
    width = int(ray.cluster_resources()["CPU"])
    times: dict[int, dict[str, list[float]]] = {}
    for n in sizes:
        wf, params = fan(n)
        expect = {"n": n, "sum": n * (n - 1) // 2}
        slow = n >= SLOW
        peers = [p for p in PEERS if p != "tierflow+mlflow" or (mlflow and not slow)]
        times[n] = {p: [] for p in peers}
        n_warm, n_rep = (0, 1) if slow else (warmup, repeats)
        for rep in range(n_warm + n_rep):
            line = []
            for peer in peers:
                store = StoreConfig.from_urls(
                    [f"memory://scale-{n}-{rep}-{peer}", str(root / f"store-{n}-{rep}-{peer}")]
                )
                uri = f"sqlite:///{root / f'mlflow-{n}-{rep}.db'}" if peer == "tierflow+mlflow" else ""
                settle(120)
                with CpuShare() as cpu:
                    t0 = time.perf_counter()
                    out = run_raw(n, width) if peer == "raw" else run_tierflow(wf, params, store, n, uri)
                    elapsed = time.perf_counter() - t0
                assert out == expect, f"{peer} N={n}: {out} != {expect}"
                line.append(f"{peer}={elapsed:.2f}s")
                if rep >= n_warm:
                    times[n][peer].append(elapsed)
                    CPU.setdefault((n, peer), []).append(cpu.seconds)
            tag = "warm-up" if rep < n_warm else f"rep {rep - n_warm + 1}/{n_rep}"
            print(f"N={n} {tag}: {', '.join(line)} (load {loadavg()})", file=sys.stderr, flush=True)
    return times


HOT = (  # (file, function) pairs worth naming in the report: the driver's per-event work
    ("journal.py", "write"),
    ("journal.py", "append"),
    ("journal.py", "finish"),
    ("dataclasses.py", "asdict"),
    ("store.py", "put_document"),
    ("store.py", "record_cache"),
    ("__init__.py", "dumps"),
    ("driver.py", "_launch_ready"),
    ("driver.py", "_ready"),
    ("driver.py", "_launch"),
    ("driver.py", "_collect"),
    ("cache.py", "cache_key"),
    ("worker.py", "wait"),
    ("worker.py", "get"),
)


ACTOR_HOT = (  # what a stage actor does per stage
    ("runner.py", "_commit"),
    ("store.py", "put_encoded"),
    ("tiers.py", "write"),
    ("runner.py", "_meter"),
    ("stage_profile.py", "build_profile"),
    ("runner.py", "to_record"),
    ("formats.py", "encode"),
)


def profile(n: int, root: Path, top: int) -> tuple[str, str]:
    """One more tierflow run of N stages under cProfile, in a fresh Ray whose stage actors profile themselves.

    Returns the full listings (printed to stderr) and a summary of the top entries for the report.
    """
    from actors.runner import PROFILE_ENV  # noqa: PLC0415  # here: the rest of the script also measures older code

    wf, params = fan(n)
    store = StoreConfig.from_urls([f"memory://scale-prof-{n}", str(root / f"store-prof-{n}")])
    actor_dir = root / "actor-profiles"
    actor_dir.mkdir()
    os.environ[PROFILE_ENV] = str(actor_dir)  # inherited by the fresh Ray's raylet, so by its stage actors
    ray.init("local", num_cpus=2, include_dashboard=False)
    try:
        settle(120)
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.runcall(run_workflow, wf, params=params, store_config=store, use_cache=False)
        elapsed = time.perf_counter() - t0
        shared_pools.release_all()
    finally:
        ray.shutdown()
        del os.environ[PROFILE_ENV]
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out).strip_dirs()
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    raw = stats.stats  # type: ignore[attr-defined]
    cum = {(f, fn): (nc, ct) for (f, _, fn), (_, nc, _, ct, _) in raw.items()}
    parts = [
        f"`{fn}` ({f}) {cum[f, fn][1]:.1f} s / {cum[f, fn][0]:,} calls = {cum[f, fn][1] / elapsed:.0%}"
        for f, fn in HOT
        if (f, fn) in cum
    ]
    own = sorted(raw.items(), key=lambda kv: -kv[1][2])[:8]  # by time spent in the function itself
    tops = [f"`{fn}` ({f}:{line}) {tt:.2f} s" for (f, line, fn), (_, _, tt, _, _) in own]
    summary = (
        f"- Driver profile (cProfile, one more tierflow run at N={n:,}: {elapsed:.1f} s wall under the profiler). "
        f"Cumulative: {'; '.join(parts)}. Top own time: {'; '.join(tops)}"
    )
    actor_text, actor_summary = _actor_profile(actor_dir, top)
    return (
        f"cProfile of one tierflow run, N={n}: {elapsed:.2f}s wall (profiled)\n{out.getvalue()}\n{actor_text}",
        f"{summary}\n{actor_summary}",
    )


def _actor_profile(directory: Path, top: int) -> tuple[str, str]:
    """The stage actors' own profiles (each dumped at most every 2 s: the last seconds of a run are missing)."""
    files = sorted(str(p) for p in directory.glob("actor-*.prof"))
    if not files:
        return "", "- Stage actor profile: none written"
    out = io.StringIO()
    stats = pstats.Stats(files[0], stream=out)
    for f in files[1:]:
        stats.add(f)
    stats.strip_dirs()
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    raw = stats.stats  # type: ignore[attr-defined]
    cum = {(f, fn): (nc, ct) for (f, _, fn), (_, nc, _, ct, _) in raw.items()}
    # The profiler runs inside each stage's call (StageActor._run_one): `_run` is one stage's whole work.
    stages, total = cum.get(("runner.py", "_run"), (1, 1.0))
    parts = [
        f"`{fn}` ({f}) {cum[f, fn][1] / stages * 1e3:.3f} ms/stage = {cum[f, fn][1] / total:.0%}"
        for f, fn in ACTOR_HOT
        if (f, fn) in cum
    ]
    own = sorted(raw.items(), key=lambda kv: -kv[1][2])[:8]
    tops = [f"`{fn}` ({f}:{line}) {tt / stages * 1e3:.3f} ms/stage" for (f, line, fn), (_, _, tt, _, _) in own]
    summary = (
        f"- Stage actor profile (cProfile inside {len(files)} actors, {stages:,} stages profiled, "
        f"{total / stages * 1e3:.3f} ms/stage in a stage's own call under the profiler). Cumulative, share of "
        f"that: {'; '.join(parts)}. Top own time: {'; '.join(tops)}"
    )
    return f"cProfile of the stage actors ({len(files)} files)\n{out.getvalue()}", summary


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def report(
    times: dict[int, dict[str, list[float]]], repeats: int, warmup: int, command: str, load: str, hot: str
) -> str:
    rows = []
    for n, t in times.items():
        stages = n + 2
        raw = _med(t["raw"])
        for peer in [p for p in PEERS if p in t and p != "raw"]:
            tf = _med(t[peer])
            over = (tf - raw) / stages * 1e3
            sp = {k: _med(v) for k, v in SPLIT[n, "mlflow" if "mlflow" in peer else "plain"].items()}
            slow = " (slow case, 1 run)" if n >= SLOW else ""
            rows.append(
                f"| {n:,}{slow} | {peer} | {tf:.2f} ({min(t[peer]):.2f}-{max(t[peer]):.2f}) | {raw:.2f} | "
                f"{tf / stages * 1e3:.2f} | {raw / stages * 1e3:.2f} | **{over:.2f}** | "
                f"{sp['startup'] * 1e3:.0f} | {sp['leaf_gap'] * 1e3:.2f} | {sp['tail'] * 1e3:.0f} | "
                f"{sp['rss'] / 2**20:.0f} ({sp['rss_peak'] / 2**20:.0f}) | {sp['rss'] / stages / 1024:.2f} | "
                f"{sp['actors']:.0f} |"
            )
    cpu_rows = []
    for (n, peer), reps in CPU.items():
        med = {role: _med([r[role] for r in reps]) * 1e3 / (n + 2) for role in ("driver", "actors", "ray")}
        cpu_rows.append(
            f"| {n:,} | {peer} | {med['driver']:.3f} | {med['actors']:.3f} | {med['ray']:.3f} | "
            f"{sum(med.values()):.3f} | {_med(times[n][peer]) * 1e3 / (n + 2):.3f} |"
        )
    sizes = list(times)
    flat = []
    small = next((x for x in sizes if x >= 1000), None)
    for big in [x for x in sizes if small is not None and x > small]:
        for mode in ("plain", "mlflow"):
            if (small, mode) in SPLIT and (big, mode) in SPLIT:
                ga, gb = (_med(SPLIT[x, mode]["leaf_gap"]) * 1e3 for x in (small, big))
                verdict = "flat (target <= 1.2x: met)" if gb / ga <= 1.2 else "target <= 1.2x: **missed**"
                flat.append(
                    f"- Linearity ({'with MLflow' if mode == 'mlflow' else 'no hooks'}): a leaf starts every "
                    f"{ga:.2f} ms at N={small:,} and every {gb:.2f} ms at N={big:,}: **{gb / ga:.2f}x**, {verdict}"
                )
    return "\n".join(
        [
            "## Scale: fan-out/fan-in of N tiny stages (source -> N no-op stages -> sink)",
            "",
            f"- Date: {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
            f"- Machine: {machine()}; load average (1/5/15 min) {load}",
            f"- Python {platform.python_version()}, Ray {ray.__version__}; local Ray started in-process with "
            f"`num_cpus=2`; code: {revision()}",
            f"- Command: `{command}`",
            f"- Wall time of each whole run, median of {repeats} repetition(s) after {warmup} warm-up (N >= "
            f"{SLOW:,}: one run), peers interleaved. Every stage asks `cpus=1`; tierflow: cache off, journal "
            "written, memory + local-dir store, no hooks or the MLflow hook (sqlite; summary mode above 500 "
            "stages); raw Ray: one actor per CPU, calls round-robin, no storage.",
            "",
            "| N | peer | tierflow s (min-max) | raw Ray s | tierflow ms / stage | raw ms / stage | "
            "overhead ms / stage | first stage starts (ms) | a leaf starts every (ms) | "
            "sink start to run end (ms) | driver RSS growth MiB (peak) | RSS KiB / stage | actors |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            "- overhead / stage = (tierflow - raw Ray) / (N + 2), medians; raw Ray measured in the same repetition.",
            "- driver RSS growth: the driver process's peak RSS during the run minus its RSS when the run started "
            "(the absolute peak in brackets, which includes Ray's core worker and earlier runs' leftovers).",
            *flat,
            "",
            "CPU time of the run per stage, by process (medians; see the script's docstring for how it is read):",
            "",
            "| N | peer | driver ms | stage actors ms (raw: workers) | Ray's processes ms | all ms | wall ms |",
            "|---:|---|---:|---:|---:|---:|---:|",
            *cpu_rows,
            *(["", hot] if hot else []),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000], help="fan-out widths N")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per N and peer (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (default 1)")
    parser.add_argument("--profile", action="store_true", help="cProfile one more tierflow run (see --profile-size)")
    parser.add_argument("--profile-size", type=int, help="N to profile (default: the largest N up to 10,000)")
    parser.add_argument("--mlflow", action="store_true", help="also run tierflow with the MLflow hook (N < 100,000)")
    parser.add_argument("--top", type=int, default=25, help="functions shown per cProfile listing")
    parser.add_argument("--write", action="store_true", help="update the section in BENCHMARKS.md")
    args = parser.parse_args()
    if args.repeats < 1 or args.warmup < 0 or min(args.sizes) < 1:
        parser.error("need --repeats >= 1, --warmup >= 0, sizes >= 1")
    sizes = sorted(set(args.sizes))
    command = shlex.join([".venv/bin/python", *sys.argv])
    load_before = loadavg()
    with tempfile.TemporaryDirectory(prefix="tierflow-scale-") as tmp:
        ray.init("local", num_cpus=2, include_dashboard=False)
        try:
            times = measure(sizes, args.repeats, args.warmup, Path(tmp), args.mlflow)
        finally:
            ray.shutdown()
        target = args.profile_size or max([x for x in sizes if x <= 10_000] or sizes)
        prof, hot = profile(target, Path(tmp), args.top) if args.profile else ("", "")
    if prof:
        print(prof, file=sys.stderr)
    body = report(times, args.repeats, args.warmup, command, f"{load_before} before, {loadavg()} after", hot)
    publish(SECTION, body, args.write)


if __name__ == "__main__":
    main()
