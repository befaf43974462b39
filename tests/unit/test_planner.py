"""The planner's simulation on small DAGs whose makespans are computed by hand, properties over random
DAGs (hypothesis), and the search: Pareto front and the choice under a deadline. No Ray."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.streaming import Stream
from workflows.errors import UnsatisfiableResourcesError, ValidationError
from workflows.model import Workflow, stage
from workflows.plan_cli import (
    NodeType,
    choose,
    load_calibration,
    node_types_from_cluster_yaml,
    parse_duration_s,
    parse_node_flag,
    search,
    stage_profiles,
)
from workflows.planner import NodeSpec, SimConfig, StageProfile, simulate
from workflows.profile import StageRun

EXACT = SimConfig(actor_start_s=0.5, first_call_s=0.0, dispatch_s=0.0, run_overhead_s=0.0)


def prof(seconds: float, cpu_s: float = 0.0) -> StageProfile:
    return StageProfile(cpu_duration_s=seconds, cpu_s=cpu_s)


def node(cpus: float, gpus: float = 0, cores: float | None = None, name: str = "n0", usd: float = 0.0) -> NodeSpec:
    res = {"CPU": float(cpus)} | ({"GPU": float(gpus)} if gpus else {})
    return NodeSpec(name, res, "t", usd, cores)


@stage
def a() -> int:
    return 1


@stage
def b(a: int) -> int:
    return a


@stage
def c(b: int) -> int:
    return b


def test_a_chain_runs_on_one_warm_actor():
    wf = Workflow("chain", [a, b, c])
    p = simulate(wf, {"a": prof(1), "b": prof(2), "c": prof(3)}, [node(4)], sim=EXACT)
    assert p.makespan_s == pytest.approx(0.5 + 1 + 2 + 3)  # one actor start, then back to back
    assert p.stages["c"].start_s == pytest.approx(3.5)


def _fan(width: int) -> Workflow:
    @stage
    def src() -> int:
        return 0

    def leaf(src: int) -> int:
        return src

    leaves = [stage(leaf, name=f"w{i}") for i in range(width)]

    def join(**kw: int) -> int:
        return 0

    import inspect

    params = [inspect.Parameter(f"w{i}", inspect.Parameter.KEYWORD_ONLY) for i in range(width)]
    join.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return Workflow("fan", [src, *leaves, stage(join, name="sink")])


def test_a_fan_out_is_bounded_by_pool_capacity():
    """src 1s; three 1s leaves on 2 CPUs (capacity 2 actors of cpus=1); sink 1s.

    t=0 actor A starts; src 0.5-1.5. Leaves ready at 1.5: A takes w0 (1.5-2.5), a second actor starts
    (ready 2.0) and takes w1 (2.0-3.0); w2 on A 2.5-3.5; sink 3.5-4.5.
    """
    wf = _fan(3)
    profiles = {n: prof(1) for n in wf.order}
    p = simulate(wf, profiles, [node(2)], sim=EXACT)
    assert p.makespan_s == pytest.approx(4.5)
    assert p.stages["w1"].start_s == pytest.approx(2.0)
    one_cpu = simulate(wf, profiles, [node(1)], sim=EXACT)  # one actor: everything in series
    assert one_cpu.makespan_s == pytest.approx(0.5 + 5)


def test_cores_are_shared_when_stages_want_more_than_the_node_has():
    wf = _fan(2)
    profiles = {n: prof(1, cpu_s=1.0) for n in wf.order}  # each keeps one core busy
    zero = SimConfig(actor_start_s=0, first_call_s=0, dispatch_s=0, run_overhead_s=0, core_share=1.0)
    roomy = simulate(wf, profiles, [node(2, cores=2)], sim=zero)
    tight = simulate(wf, profiles, [node(2, cores=1)], sim=zero)
    assert roomy.makespan_s == pytest.approx(3.0)
    assert tight.makespan_s == pytest.approx(4.0)  # the two leaves share one core: 2 s instead of 1
    # Stages get 80% of the 2 cores when they want them all: the two leaves take 1 / 0.8 s; alone, src and sink
    # want one core of the 1.6 left and run at full speed.
    shared = SimConfig(**{**zero.__dict__, "core_share": 0.8})
    assert simulate(wf, profiles, [node(2, cores=2)], sim=shared).makespan_s == pytest.approx(1 + 1.25 + 1)
    with pytest.raises(ValueError, match="core_share"):
        SimConfig(core_share=0)


@stage(cpus=1, gpus=1, fallback="cpu")
def train(a: int) -> int:
    return a


@stage(cpus=1, gpus=1)
def gpu_only(a: int) -> int:
    return a


def test_gpu_vs_cpu_fallback_uses_the_engines_decision_and_the_declared_factor():
    wf = Workflow("t", [a, train])
    profiles = {"a": prof(1), "train": StageProfile(cpu_duration_s=8.0)}
    sim = SimConfig(actor_start_s=0, first_call_s=0, dispatch_s=0, run_overhead_s=0, gpu_speedup=4.0)
    cpu = simulate(wf, profiles, [node(4)], sim=sim)
    gpu = simulate(wf, profiles, [node(4, gpus=1)], sim=sim)
    assert cpu.stages["train"].fallback and cpu.stages["train"].device == "cpu"
    assert cpu.makespan_s == pytest.approx(9.0)
    assert not gpu.stages["train"].fallback and gpu.stages["train"].device == "gpu"
    assert gpu.makespan_s == pytest.approx(3.0)  # 1 + 8 / 4
    measured = {"a": prof(1), "train": StageProfile(cpu_duration_s=8.0, gpu_duration_s=0.5)}
    assert simulate(wf, measured, [node(4, gpus=1)], sim=sim).makespan_s == pytest.approx(1.5)


def test_a_stage_no_node_can_hold_is_refused_as_the_engine_refuses_it():
    with pytest.raises(UnsatisfiableResourcesError, match="gpu_only"):
        simulate(Workflow("g", [a, gpu_only]), {}, [node(4)])


def test_energy_and_cost_follow_the_estimate_accounting():
    wf = Workflow("chain", [a, b, c])
    from actors.energy import EnergyConfig

    p = simulate(
        wf,
        {"a": prof(1, 1.0), "b": prof(1, 2.0), "c": prof(1, 0.5)},
        [node(4, usd=3.6)],
        sim=EXACT,
        energy=EnergyConfig(cpu_watts_per_core=10),
    )
    assert p.energy_j == pytest.approx(35.0)
    assert p.cost_usd == pytest.approx(3.6 * p.makespan_s / 3600)


@st.composite
def dags(draw):
    n = draw(st.integers(1, 7))
    edges = {j: sorted(draw(st.sets(st.integers(0, j - 1), max_size=3))) if j else [] for j in range(n)}
    durations = [draw(st.floats(0.1, 5.0)) for _ in range(n)]
    cpus = draw(st.integers(1, 4))
    return n, edges, durations, cpus


def _build(n: int, edges: dict[int, list[int]]) -> Workflow:
    import inspect

    stages = []
    for j in range(n):

        def fn(**kw: int) -> int:
            return 0

        fn.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter(f"s{i}", inspect.Parameter.KEYWORD_ONLY) for i in edges[j]]
        )
        stages.append(stage(fn, name=f"s{j}"))
    return Workflow("rand", stages)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(dags())
def test_makespan_is_between_the_critical_path_and_the_serial_sum(case):
    n, edges, durations, cpus = case
    wf = _build(n, edges)
    profiles = {f"s{j}": prof(durations[j]) for j in range(n)}
    sim = SimConfig(actor_start_s=0.3, first_call_s=0.2, dispatch_s=0.0, run_overhead_s=0.0)
    p = simulate(wf, profiles, [node(cpus)], sim=sim)
    finish: dict[int, float] = {}
    for j in range(n):
        finish[j] = max((finish[i] for i in edges[j]), default=0.0) + durations[j]
    critical = max(finish.values())
    fresh = sim.actor_start_s + sim.first_call_s  # the first stage always waits for an actor and its first call
    assert p.makespan_s >= critical + fresh - 1e-6
    assert p.makespan_s <= sum(durations) + fresh * min(n, cpus) + 1e-6
    for j in range(n):  # never before its upstream ended
        for i in edges[j]:
            assert p.stages[f"s{j}"].start_s >= p.stages[f"s{i}"].end_s - 1e-9


def test_search_finds_the_pareto_front_and_the_cheapest_that_meets_the_deadline():
    wf = _fan(4)
    profiles = {n: prof(10) for n in wf.order}
    types = [NodeType("small", {"CPU": 1.0}, usd_per_h=1.0, min_count=0, max_count=4)]
    cands = search(wf, profiles, types, max_nodes=4, sim=EXACT)
    by_count = {c.counts["small"]: c for c in cands}
    assert by_count[1].prediction.makespan_s > by_count[2].prediction.makespan_s > by_count[4].prediction.makespan_s
    assert by_count[1].pareto and by_count[4].pareto
    # src 10, four leaves, sink 10: 1 node runs them in series (60 s); 2 nodes in two waves (~40.5 s)
    pick = choose(cands, deadline_s=45, objective="cost")
    assert pick is not None and pick.counts["small"] == 2
    assert choose(cands, deadline_s=1, objective="cost") is None
    assert choose(cands, deadline_s=None, objective="time").counts["small"] == 4


def test_cluster_yaml_types_and_node_flags(tmp_path):
    from pathlib import Path

    import yaml

    cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "cluster.yaml").read_text())
    from workflows.costs import CostConfig

    types = {t.name: t for t in node_types_from_cluster_yaml(cfg, CostConfig())}
    assert (types["head_cpu"].min_count, types["head_cpu"].max_count) == (1, 1)
    assert types["worker_gpu"].max_count == 2 and types["worker_gpu"].usd_per_h == pytest.approx(1.006)
    t = parse_node_flag("gpu:CPU=4,GPU=1,accelerator_type:A10G=1,usd_per_h=1.2,max=3", CostConfig())
    assert t.resources == {"CPU": 4.0, "GPU": 1.0, "accelerator_type:A10G": 1.0}
    assert (t.usd_per_h, t.max_count) == (1.2, 3)
    with pytest.raises(ValidationError, match="KEY=NUMBER"):
        parse_node_flag("gpu:CPU=four", CostConfig())
    assert parse_duration_s("10m") == 600 and parse_duration_s("90") == 90
    with pytest.raises(ValidationError, match="10m"):
        parse_duration_s("soon")


def test_a_wider_fan_out_borrows_its_siblings_profile():
    narrow, wide = _fan(2), _fan(4)
    runs = {
        name: [StageRun("r1", name, 0.0, {}, {"duration_s": 2.0, "cpu_s": 1.0, "device": "cpu"}, {})]
        for name in narrow.order
    }
    profiles = stage_profiles(wide, runs)
    assert profiles["w3"].cpu_duration_s == 2.0 and profiles["w3"].source == "sibling"
    assert profiles["w0"].source == "measured"


@stage(cpus=1, stream=Stream(shards="shards"))
def feat(shard: int, shards: int = 4) -> int:
    return shard


@stage(cpus=1)
def fit(feat: int) -> int:
    return feat


def test_a_fused_stream_overlaps_its_consumer_and_barrier_mode_does_not():
    """Node of 3 CPUs; the consumer's actor holds 1, so the pool gets 2 workers (pool_bounds on what is free).

    fit: 5 s measured = 1 s set-up (fixed) + 1 s waiting for batches + 3 s of per-batch work (scales).
    feat: 4 shards of 1 s; its pool starts in 1 s, so the first batch is there 2 s after the stream starts.
    Streaming, 4 shards: actor ready 0.5; first batch at max(set-up 1, 1 + 1) = 2; then the slower of the
    consumer's 3 s and the producers' last wave (1 s) plus one batch (0.75 s): 3 s -> 0.5 + 2 + 3 = 5.5.
    8 shards: the batches take 6 s, the producers 3 waves + 1.5 s: 0.5 + 2 + 6 = 8.5.
    Barrier: coordinator ready 0.5, then 1 s start-up + 2 waves of 1 s = 3.5; the consumer's actor 0.5 s,
    then its set-up and batches (no waiting): 4.0 + 1 + 3 = 8.0.
    """
    wf = Workflow("s", [feat, fit])
    profiles = {
        "feat": StageProfile(cpu_duration_s=3.0, cpu_s=4.0, shards=4, busy_s=4.0),
        "fit": StageProfile(cpu_duration_s=5.0, cpu_s=0.0, wait_s=1.0, setup_s=1.0),
    }
    sim = SimConfig(actor_start_s=0.5, first_call_s=0.0, dispatch_s=0.0, run_overhead_s=0.0, stream_pool_start_s=1.0)
    three = [node(3)]
    assert simulate(wf, profiles, three, params={"feat": {"shards": 4}}, sim=sim).makespan_s == pytest.approx(5.5)
    assert simulate(wf, profiles, three, params={"feat": {"shards": 8}}, sim=sim).makespan_s == pytest.approx(8.5)
    barrier = SimConfig(**{**sim.__dict__, "streaming": False})
    p = simulate(wf, profiles, three, params={"feat": {"shards": 4}}, sim=barrier)
    assert p.makespan_s == pytest.approx(8.0)
    assert p.stages["feat"].end_s == pytest.approx(3.5) and p.stages["fit"].start_s == pytest.approx(4.0)


def test_a_consumer_faster_than_its_producers_waits_for_them():
    """fit's per-batch work is 0.5 s for 4 batches (5 s = 1 s set-up + 3.5 s waiting + 0.5 s); one worker
    (2 CPUs, the consumer holds 1): first batch at 1 + 1 = 2, then 3 more waves of 1 s + the last batch's
    0.125 s: 0.5 + 2 + 3.125. Twice the shards: 0.5 + 2 + 7 + 0.125."""
    wf = Workflow("s", [feat, fit])
    profiles = {
        "feat": StageProfile(cpu_duration_s=3.0, cpu_s=4.0, shards=4, busy_s=4.0),
        "fit": StageProfile(cpu_duration_s=5.0, cpu_s=0.0, wait_s=3.5, setup_s=1.0),
    }
    sim = SimConfig(actor_start_s=0.5, first_call_s=0.0, dispatch_s=0.0, run_overhead_s=0.0, stream_pool_start_s=1.0)
    assert simulate(wf, profiles, [node(2)], params={"feat": {"shards": 4}}, sim=sim).makespan_s == pytest.approx(5.625)
    assert simulate(wf, profiles, [node(2)], params={"feat": {"shards": 8}}, sim=sim).makespan_s == pytest.approx(9.625)


def test_profiles_take_out_the_time_a_stage_waited_for_a_cpu():
    wf = Workflow("chain", [a, b, c])
    run = StageRun("r1", "a", 0.0, {}, {"duration_s": 2.0, "cpu_s": 0.5, "runqueue_wait_s": 1.5, "device": "cpu"}, {})
    assert stage_profiles(wf, {"a": [run]})["a"].cpu_duration_s == pytest.approx(0.5)
    assert stage_profiles(wf, {"a": [run]}, solo=False)["a"].cpu_duration_s == pytest.approx(2.0)


def test_a_streams_pool_start_up_is_measured_from_its_first_batch():
    wf = Workflow("s", [feat, fit])
    run = StageRun("r1", "feat", 0.0, {"shards": 4}, {"duration_s": 5.0, "cpu_s": 4.0}, {"first_batch_s": 3.0})
    prof = stage_profiles(wf, {"feat": [run]})["feat"]
    assert (prof.shards, prof.busy_s, prof.pool_start_s) == (4, 4.0, pytest.approx(2.0))  # 3 s - one 1 s shard
    profiles = {"feat": prof, "fit": StageProfile(cpu_duration_s=0.5)}
    sim = SimConfig(actor_start_s=0.0, first_call_s=0.0, dispatch_s=0.0, run_overhead_s=0.0, stream_pool_start_s=99.0)
    # 3 CPUs, the consumer holds 1: 2 workers; first batch at 2 s start-up + 1 s, then a second wave of 1 s
    # and the consumer's last batch (0.5 s / 4)
    assert simulate(wf, profiles, [node(3)], params={"feat": {"shards": 4}}, sim=sim).makespan_s == pytest.approx(4.125)


def test_profiles_tell_a_fused_stream_a_consumers_set_up_and_first_calls_apart():
    """Run r1 streamed (feat's record in fit's process 7), run r2 ran the stream alone (process 8)."""
    wf = Workflow("s", [feat, fit])
    feat_runs = [
        StageRun("r1", "feat", 10.0, {"shards": 4}, {"duration_s": 5.0, "cpu_s": 4.0}, {"first_batch_s": 3.0}, 7),
        StageRun("r2", "feat", 10.0, {"shards": 4}, {"duration_s": 4.0, "cpu_s": 4.0}, {"first_batch_s": 2.0}, 8),
    ]
    fit_metrics = {"feat.wait_s": 0.5, "feat.setup_s": 2.0, "feat.setup_runqueue_s": 0.5}
    fit_runs = [StageRun(r, "fit", 10.1, {}, {"duration_s": 5.0, "cpu_s": 1.0}, fit_metrics, 7) for r in ("r1", "r2")]
    profiles = stage_profiles(wf, {"feat": feat_runs[:1], "fit": fit_runs})
    assert profiles["feat"].pool_start_fused
    assert not stage_profiles(wf, {"feat": feat_runs[1:], "fit": fit_runs})["feat"].pool_start_fused
    assert profiles["fit"].setup_s == pytest.approx(1.5)  # 2 s minus the 0.5 s it waited for a CPU meanwhile
    assert profiles["fit"].cold_share == 1.0  # the first call in process 7, though the stream it read started first
    later = StageRun("r1", "a", 20.0, {}, {"duration_s": 1.0}, {}, 7)
    assert stage_profiles(Workflow("s", [a]), {"a": [later], "fit": fit_runs[:1]})["a"].cold_share == 0.0


def test_the_first_call_on_a_fresh_actor_is_charged_once_per_actor():
    """Profiles measured on fresh actors (cold_share 1) lose first_call_s; the simulation adds it back
    once per actor. Chain on one actor: 0.5 start + (1 - 0.25 + 0.25) + (2 - 0.25) = 3.5 + 0.25 first call."""
    wf = Workflow("chain", [a, b])
    sim = SimConfig(actor_start_s=0.5, first_call_s=0.25, dispatch_s=0.0, run_overhead_s=0.0, core_share=1.0)
    cold = {"a": StageProfile(cpu_duration_s=1.0, cold_share=1.0), "b": StageProfile(cpu_duration_s=2.0)}
    assert simulate(wf, cold, [node(1)], sim=sim).makespan_s == pytest.approx(0.5 + 1.0 + 2.0)
    cold["b"] = StageProfile(cpu_duration_s=2.0, cold_share=1.0)  # b too ran first on its actor when profiled
    assert simulate(wf, cold, [node(1)], sim=sim).makespan_s == pytest.approx(0.5 + 1.0 + 1.75)
    # A first call dearer than the profiled stage itself leaves no warm work, and the stage still runs at its
    # profiled utilisation (0.26 CPU-s over 0.26 s), not at 0.26 CPU-s over the 0.01 s left.
    tiny = {"a": StageProfile(cpu_duration_s=0.26, cpu_s=0.26, cold_share=1.0), "b": StageProfile(cpu_duration_s=2.0)}
    assert simulate(wf, tiny, [node(1)], sim=sim).makespan_s == pytest.approx(0.5 + 0.26 + 2.0)


@stage(cpus=0.5)
def half(a: int) -> int:
    return a


def test_a_new_shape_on_a_full_node_waits_for_idle_actors_to_be_ended():
    """1 CPU: a's actor (1 CPU) is idle when half (0.5 CPU) is ready, and must be ended first (reclaim_s)."""
    wf = Workflow("shapes", [a, half])
    sim = SimConfig(actor_start_s=0.5, first_call_s=0.0, reclaim_s=1.0, dispatch_s=0.0, run_overhead_s=0.0)
    profiles = {"a": prof(1), "half": prof(1)}
    assert simulate(wf, profiles, [node(1)], sim=sim).makespan_s == pytest.approx(0.5 + 1 + 1.0 + 0.5 + 1)
    assert simulate(wf, profiles, [node(2)], sim=sim).makespan_s == pytest.approx(0.5 + 1 + 0.5 + 1)  # room: no kill


def test_a_calibration_file_sets_the_machine_constants_and_bad_ones_are_named(tmp_path):
    good = tmp_path / "calibration.json"
    good.write_text('{"actor_start_s": 0.7, "first_call_s": 0.2, "core_share": 0.9}')
    sim = SimConfig(**load_calibration(good))
    assert (sim.actor_start_s, sim.first_call_s, sim.core_share) == (0.7, 0.2, 0.9)
    for text, problem in (
        ('{"actor_start": 1}', "unknown keys \\['actor_start'\\]"),
        ('{"reclaim_s": "1s"}', "must be numbers"),
        ("[1, 2]", "JSON object"),
        ("{", "not a readable JSON file"),
    ):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ValidationError, match=problem):
            load_calibration(bad)


def test_the_front_is_plotted_to_a_png_and_an_unwritable_path_is_named(tmp_path):
    from workflows.plan_plot import plot_front

    wf = _fan(4)
    profiles = {n: prof(1, cpu_s=1.0) for n in wf.order}
    types = [NodeType("small", {"CPU": 2.0}, 0.1, 1, 3), NodeType("big", {"CPU": 8.0}, 0.5, 0, 1)]
    cands = search(wf, profiles, types, max_nodes=3)
    chosen = choose(cands, 10.0, "cost")
    out = tmp_path / "front.png"
    plot_front(cands, chosen, out, 10.0)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    with pytest.raises(ValidationError, match="cannot write it"):
        plot_front(cands, chosen, tmp_path / "no-such-dir" / "front.png", None)
