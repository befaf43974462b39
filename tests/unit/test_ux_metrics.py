"""The user-experience metrics: fluidity index (Etalon), per-request figures, goodput.

Times are multiples of 1/1024 s so that sums are exact in binary floating point: the properties compare
schedules at their boundaries, where a rounding error would decide a deadline.
"""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.ux_metrics import (
    Deadlines,
    MetricsError,
    RequestTimeline,
    aggregate,
    fluidity_counts,
    fluidity_index,
    goodput,
)

TICK = 1 / 1024
SEEDED = settings(derandomize=True, max_examples=120, deadline=None)
ticks = st.integers(min_value=0, max_value=4096)
gaps_st = st.lists(ticks, min_size=1, max_size=40).map(lambda ks: [k * TICK for k in ks])
deadline_st = st.builds(lambda a, b: Deadlines(a * TICK, b * TICK), st.integers(1, 2048), st.integers(1, 512))


def absolute_schedule(gaps: list[float], d: Deadlines) -> tuple[int, int]:
    """An independent reading of the definition on the absolute clock: token i is due at `due`; a met
    deadline moves the next one `tbt` later (slack carried); a late token misses every deadline
    `due, due + tbt, ...` that passed before it arrived and restarts the schedule at its own arrival."""
    t, due, missed, total = 0.0, d.ttft_s, 0, 0
    for gap in gaps:
        t += gap
        if t <= due:
            total += 1
            due += d.tbt_s
            continue
        passed = 0
        while due + passed * d.tbt_s < t:  # every deadline strictly before the arrival
            passed += 1
        missed += passed
        total += passed
        due = t + d.tbt_s
    return missed, total


@SEEDED
@given(gaps_st, deadline_st)
def test_counts_agree_with_the_absolute_clock_reading(gaps, d):
    # the slack formulation and the absolute schedule differ only when a token lands exactly on a passed
    # deadline d + k*tbt (k >= 1): Etalon's floor counts it missed too; exclude that measure-zero case
    t, due, exact = 0.0, d.ttft_s, False
    for gap in gaps:
        t += gap
        if t > due and ((t - due) / d.tbt_s).is_integer():
            exact = True
            break
        due = due + d.tbt_s if t <= due else t + d.tbt_s
    if not exact:
        assert fluidity_counts(gaps, d) == absolute_schedule(gaps, d)


@SEEDED
@given(gaps_st, deadline_st)
def test_bounds_and_every_token_owes_at_least_one_deadline(gaps, d):
    missed, total = fluidity_counts(gaps, d)
    assert total >= len(gaps) and 0 <= missed <= total
    assert 0.0 <= fluidity_index(gaps, d) <= 1.0


@SEEDED
@given(st.integers(1, 2048), st.integers(1, 512), st.integers(1, 60), st.data())
def test_a_paced_stream_scores_one(ttft, tbt, n, data):
    d = Deadlines(ttft * TICK, tbt * TICK)
    gaps = [data.draw(st.integers(0, ttft)) * TICK] + [data.draw(st.integers(0, tbt)) * TICK for _ in range(n)]
    assert fluidity_index(gaps, d) == 1.0


@SEEDED
@given(st.integers(1, 512), st.integers(2, 40), st.integers(1, 20), st.data())
def test_a_stall_lowers_it_by_the_deadlines_it_spans(tbt, n, k, data):
    """A stream exactly on pace (no slack banked) with one gap stretched past k more deadlines misses
    k + 1: its own deadline and the k that passed before it arrived."""
    d = Deadlines(tbt * TICK, tbt * TICK)
    paced = [d.tbt_s] * n
    at = data.draw(st.integers(0, n - 1))
    stalled = list(paced)
    stalled[at] = d.tbt_s * (k + 1) + TICK / 2  # k deadlines after its own, plus a little
    missed, total = fluidity_counts(stalled, d)
    assert missed == k + 1 and total == n + k
    assert fluidity_index(stalled, d) < fluidity_index(paced, d) == 1.0


@SEEDED
@given(gaps_st, deadline_st, st.integers(0, 1024), st.integers(0, 256))
def test_monotone_in_both_targets(gaps, d, more_ttft, more_tbt):
    looser = Deadlines(d.ttft_s + more_ttft * TICK, d.tbt_s + more_tbt * TICK)
    assert fluidity_index(gaps, looser) >= fluidity_index(gaps, d)
    assert fluidity_counts(gaps, looser)[0] <= fluidity_counts(gaps, d)[0]


@SEEDED
@given(gaps_st, deadline_st, st.sampled_from([0.25, 0.5, 2.0, 8.0]))
def test_only_relative_timing_matters(gaps, d, scale):
    scaled = Deadlines(d.ttft_s * scale, d.tbt_s * scale)
    assert fluidity_index([g * scale for g in gaps], scaled) == fluidity_index(gaps, d)


def test_early_tokens_bank_slack_that_absorbs_a_later_stall():
    d = Deadlines(ttft_s=1.0, tbt_s=0.125)
    # first token 0.5 s early, then a 0.625 s gap: the banked 0.5 s plus its own 0.125 s cover it exactly
    assert fluidity_counts([0.5, 0.625, 0.125], d) == (0, 3)
    # a longer stall with no slack banked: the deadlines at 0.125, 0.25, ..., 0.625 s passed while waiting
    assert fluidity_counts([1.0, 0.6875, 0.125], d) == (5, 7)


def test_a_missed_deadline_resets_the_slack():
    d = Deadlines(ttft_s=0.5, tbt_s=0.25)
    # slack 0.5 banked by an instant first token is spent and exceeded by a 1.0 s gap: slack resets to 0,
    # so the next 0.375 s gap (which the old slack would have covered) misses again
    missed, total = fluidity_counts([0.0, 1.0, 0.375], d)
    assert missed == 2 + 1
    assert total == 1 + 2 + 1


def test_timeline_summary():
    tl = RequestTimeline(arrival_s=10.0)
    for t in (10.25, 10.375, 10.5, 11.5):
        tl.token(t)
    tl.end_s = 11.75
    m = tl.summary(Deadlines(ttft_s=0.5, tbt_s=0.25))
    assert m.tokens == 4 and m.ttft_s == 0.25 and m.tbt_s == [0.125, 0.125, 1.0]
    assert m.e2e_s == 1.75 and m.tokens_per_s == pytest.approx(3 / 1.25)
    assert not m.met_deadlines and 0 < m.fluidity < 1
    assert RequestTimeline(arrival_s=0.0).summary(Deadlines()).fluidity == 1.0  # no token, nothing owed


def test_goodput_counts_only_fluid_complete_streams():
    d = Deadlines(ttft_s=0.5, tbt_s=0.25)
    fluid = RequestTimeline(0.0, [0.25, 0.5]).summary(d)
    stalled = RequestTimeline(0.0, [0.25, 2.0]).summary(d)
    empty = RequestTimeline(0.0, []).summary(d)
    assert goodput([fluid, fluid, stalled, empty], duration_s=4.0) == 0.5
    with pytest.raises(MetricsError, match="duration_s"):
        goodput([fluid], 0.0)
    agg = aggregate([fluid, stalled], duration_s=2.0)
    assert agg["requests"] == 2 and agg["goodput_rps"] == 0.5 and agg["fluid_share"] == 0.5
    assert agg["ttft_s_p50"] == 0.25 and agg["tbt_s_p99"] == pytest.approx(0.25 + 0.99 * 1.5)


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan, "1"])
def test_deadlines_refuse_nonsense(bad):
    with pytest.raises(MetricsError, match="must be a finite number of seconds > 0"):
        Deadlines(ttft_s=bad)
