"""What a person watching a streamed answer experiences: TTFT, time between tokens, fluidity, goodput.

Pure functions of timestamps (no Ray, no torch), shared by the Serve app, `tierflow serve status` and the
load benchmark.

The fluidity index is Etalon's (Agrawal et al., "Etalon: Holistic Performance Evaluation Framework for LLM
Inference Systems", arXiv 2407.07000; the definition as the project documents it in
docs/tutorials/metrics_used.rst and implements it in `etalon/metrics/metric_utils.py`,
`get_request_level_deadline_miss_rate`). Every token gets a deadline: the first `target_ttft_s` after the
request arrived, each later one `target_tbt_s` after the token before it. A token early by some amount
banks that amount as slack, which later tokens may spend. A token that arrives late has missed every
deadline that passed while the user waited for it: `1 + floor((late - slack - D) / target_tbt_s)` of them,
where `D` is the deadline it was due by; the slack is then reset to zero and the schedule restarts from
the late token (the next token is due `target_tbt_s` after it arrived), since decoding is autoregressive
and nothing could have been produced earlier. The index is `1 - missed / total` over all deadlines so
counted, in [0, 1]: 1.0 when the stream kept pace, lower the more (and the longer) it stalled.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np


class MetricsError(ValueError):
    """A deadline schedule or a token timeline that cannot be scored."""


@dataclass(frozen=True)
class Deadlines:
    """The deadline schedule: first token within `ttft_s` of arrival, then one every `tbt_s`."""

    ttft_s: float = 1.0
    tbt_s: float = 0.1

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tbt_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise MetricsError(f"deadline {name}={value!r}: must be a finite number of seconds > 0")


def fluidity_counts(gaps: Sequence[float], deadlines: Deadlines) -> tuple[int, int]:
    """(missed, total) deadlines of one stream; `gaps[0]` is the TTFT, then the times between tokens.

    Etalon's accounting (module docstring): a met deadline counts once and banks its slack; a missed one
    counts every deadline that passed while waiting, then resets the slack and the schedule."""
    missed = total = 0
    slack = 0.0
    for i, gap in enumerate(gaps):
        due = deadlines.ttft_s if i == 0 else deadlines.tbt_s
        if gap <= due + slack:
            slack += due - gap
            total += 1
            continue
        misses = 1 + math.floor((gap - slack - due) / deadlines.tbt_s)
        missed += misses
        total += misses
        slack = 0.0
    return missed, total


def fluidity_index(gaps: Sequence[float], deadlines: Deadlines) -> float:
    """1 - missed/total deadlines (1.0 for a stream with no token: nothing was owed)."""
    missed, total = fluidity_counts(gaps, deadlines)
    return 1.0 - missed / total if total else 1.0


@dataclass
class RequestTimeline:
    """One request's clock readings: when it arrived and when each token reached the client (seconds,
    any monotonic clock)."""

    arrival_s: float
    token_times_s: list[float] = field(default_factory=list)
    end_s: float | None = None

    def token(self, at_s: float) -> None:
        self.token_times_s.append(at_s)

    def gaps(self) -> list[float]:
        """TTFT followed by each time between tokens."""
        times = [self.arrival_s, *self.token_times_s]
        return [b - a for a, b in itertools.pairwise(times)]

    def summary(self, deadlines: Deadlines) -> RequestMetrics:
        gaps = self.gaps()
        last = self.token_times_s[-1] if self.token_times_s else self.arrival_s
        end = self.end_s if self.end_s is not None else last
        e2e = max(end - self.arrival_s, 0.0)
        n = len(self.token_times_s)
        decode_s = self.token_times_s[-1] - self.token_times_s[0] if n > 1 else 0.0
        missed, total = fluidity_counts(gaps, deadlines)
        return RequestMetrics(
            tokens=n,
            ttft_s=gaps[0] if gaps else None,
            tbt_s=gaps[1:],
            e2e_s=e2e,
            tokens_per_s=(n - 1) / decode_s if decode_s > 0 else None,
            fluidity=1.0 - missed / total if total else 1.0,
            missed_deadlines=missed,
            deadlines=total,
        )


@dataclass(frozen=True)
class RequestMetrics:
    """Per-request user-experience figures. `tokens_per_s` is the decode rate after the first token
    (None with fewer than two tokens); `met_deadlines` says the whole stream kept its schedule."""

    tokens: int
    ttft_s: float | None
    tbt_s: list[float]
    e2e_s: float
    tokens_per_s: float | None
    fluidity: float
    missed_deadlines: int
    deadlines: int

    @property
    def met_deadlines(self) -> bool:
        return self.missed_deadlines == 0

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON-ready, without the per-token list (what the final SSE event carries)."""
        return {
            "tokens": self.tokens,
            "ttft_s": _round(self.ttft_s),
            "tbt_s_max": _round(max(self.tbt_s)) if self.tbt_s else None,
            "e2e_s": _round(self.e2e_s),
            "tokens_per_s": _round(self.tokens_per_s),
            "fluidity": round(self.fluidity, 6),
            "missed_deadlines": self.missed_deadlines,
            "deadlines": self.deadlines,
        }


def goodput(requests: Iterable[RequestMetrics], duration_s: float) -> float:
    """Requests per second whose whole stream met every deadline (Etalon's notion of serving a request
    well), over a window of `duration_s`."""
    if not duration_s > 0:
        raise MetricsError(f"duration_s={duration_s!r}: goodput needs a window > 0 seconds")
    return sum(1 for r in requests if r.met_deadlines and r.tokens > 0) / duration_s


def aggregate(requests: Sequence[RequestMetrics], duration_s: float | None = None) -> dict[str, float | int | None]:
    """Percentiles over requests (TTFT, TBT pooled over every gap), mean fluidity, share of fluid requests."""
    ttft = [r.ttft_s for r in requests if r.ttft_s is not None]
    tbt = [g for r in requests for g in r.tbt_s]
    rates = [r.tokens_per_s for r in requests if r.tokens_per_s is not None]
    out: dict[str, float | int | None] = {
        "requests": len(requests),
        "tokens": sum(r.tokens for r in requests),
        "ttft_s_p50": _pct(ttft, 50),
        "ttft_s_p99": _pct(ttft, 99),
        "tbt_s_p50": _pct(tbt, 50),
        "tbt_s_p99": _pct(tbt, 99),
        "e2e_s_p50": _pct([r.e2e_s for r in requests], 50),
        "tokens_per_s_mean": _round(float(np.mean(rates))) if rates else None,
        "fluidity_mean": _round(float(np.mean([r.fluidity for r in requests]))) if requests else None,
        "fluid_share": _round(sum(r.met_deadlines for r in requests) / len(requests)) if requests else None,
    }
    if duration_s is not None:
        out["goodput_rps"] = _round(goodput(requests, duration_s))
    return out


def _pct(values: Sequence[float], q: float) -> float | None:
    return _round(float(np.percentile(values, q))) if values else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
