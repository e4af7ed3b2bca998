"""Summaries of `baton bench` runs: latency percentiles, throughput, goodput, SLO attainment and errors;
and capacity, the highest rate still meeting the SLO for a given share of requests.

Warm-up records are left out. Latencies count only completed requests (a failed request has no TTFT);
`errors` counts the rest by gRPC status name, so a run that sheds load shows it instead of looking fast.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from baton.bench.loadgen import RequestRecord

LATENCIES = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
STATS = ("mean", "p50", "p90", "p99")


@dataclass(slots=True)
class SLO:
    """A request is `good` when both its TTFT and its TPOT are within these (ms); None: no bound."""
    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"slo_{name}: must be > 0, not {v}")

    def met(self, rec: RequestRecord) -> bool:
        if rec.error is not None or rec.ttft_ms is None:
            return False
        if self.ttft_ms is not None and rec.ttft_ms > self.ttft_ms:
            return False
        # A one-token request has no TPOT: nothing to miss
        return self.tpot_ms is None or rec.tpot_ms is None or rec.tpot_ms <= self.tpot_ms


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]; NaN when empty."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def stats(values: Sequence[float]) -> dict[str, float | None]:
    """mean/p50/p90/p99; None (JSON null) when there are no values, rather than NaN, which JSON lacks."""
    if not values:
        return dict.fromkeys(STATS)
    return {"mean": sum(values) / len(values), "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99)}


def summarize(records: Sequence[RequestRecord], wall_s: float, slo: SLO | None = None) -> dict:
    """The summary.json entry of one run; `wall_s` is the measured window's length."""
    slo = slo or SLO()
    measured = [r for r in records if not r.warmup]
    ok = [r for r in measured if r.error is None]
    values = {
        "ttft_ms": [r.ttft_ms for r in ok if r.ttft_ms is not None],
        "tpot_ms": [r.tpot_ms for r in ok if r.tpot_ms is not None],
        "itl_ms": [x for r in ok for x in r.itl_ms],
        "e2e_ms": [r.e2e_ms for r in ok if r.e2e_ms is not None],
    }
    per_s = 1.0 / wall_s if wall_s > 0 else 0.0
    good = sum(slo.met(r) for r in ok)
    out: dict = {name: stats(values[name]) for name in LATENCIES}
    out |= {
        "throughput_tok_s": sum(r.output_tokens for r in ok) * per_s,
        "throughput_rps": len(ok) * per_s,
        "goodput_rps": good * per_s,
        # Failed requests count against it: a cluster that sheds load must not look better for it
        "slo_attainment": good / len(measured) if measured else None,
        "errors": dict(Counter(r.error for r in measured if r.error is not None)),
        "completed": len(ok),
        "requests": len(measured),
        "wall_s": wall_s,
    }
    return out


def capacity(attainment: dict[float, float], target: float) -> float | None:
    """The highest rate at which attainment is still >= target, interpolated linearly between swept rates
    (from the last rate meeting it before the first that does not); None if the lowest rate misses it."""
    rates = sorted(attainment)
    if not rates or attainment[rates[0]] < target:
        return None
    for lo, hi in zip(rates, rates[1:]):
        if attainment[hi] < target:
            a, b = attainment[lo], attainment[hi]
            return lo + (hi - lo) * (a - target) / (a - b)
    return rates[-1]  # met at every swept rate: at least this
