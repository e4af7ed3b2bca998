"""The `comparison` section of summary.json: every configuration against the run's baseline configuration.

Ratios are configuration / baseline, per sweep point (rate or concurrency): TPOT p99 and TTFT p99 (below 1
is better) and goodput (above 1 is better); and of capacity, the highest sweep point still meeting the SLO
for `attainment` of its requests (interpolated between points, bench/metrics.py's `capacity`). A ratio
whose baseline figure is 0 or missing is None (JSON null): inf and NaN are not JSON, and a ratio to
nothing means nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from baton.bench.metrics import capacity

ATTAINMENT = 0.9  # DistServe's choice: 90% of requests within the SLO

Results = Mapping[str, Mapping[str, dict]]  # configuration -> sweep point label -> summarize()'s dict


def ratio(value: float | None, base: float | None) -> float | None:
    """value / base, or None when either is missing, the base is 0, or the result is not finite."""
    if value is None or base is None or base == 0:
        return None
    r = value / base
    return r if math.isfinite(r) else None


@dataclass(slots=True)
class PointRatios:
    """One sweep point of a configuration against the same point of the baseline."""
    tpot_p99: float | None
    ttft_p99: float | None
    goodput: float | None


@dataclass(slots=True)
class Capacity:
    """Capacity of a configuration and of the baseline; `at_least` when the SLO held at every swept point
    (the figure is then the highest point swept, a lower bound), None when even the lowest point missed."""
    value: float | None
    at_least: bool
    baseline: float | None
    baseline_at_least: bool
    ratio: float | None


def point_ratios(s: dict, base: dict) -> PointRatios:
    return PointRatios(ratio(s["tpot_ms"]["p99"], base["tpot_ms"]["p99"]),
                       ratio(s["ttft_ms"]["p99"], base["ttft_ms"]["p99"]),
                       ratio(s.get("goodput_rps"), base.get("goodput_rps")))


def capacity_of(points: Mapping[str, dict], attainment: float) -> tuple[float | None, bool]:
    """(capacity, whether it is only a lower bound) over a configuration's finite sweep points; an
    all-at-once point ("inf") has no place on a rate axis and is left out."""
    attained = {float(p): s["slo_attainment"] for p, s in points.items()
                if math.isfinite(float(p)) and s.get("slo_attainment") is not None}
    cap = capacity(attained, attainment)
    return cap, cap is not None and cap == max(attained)


def compare(results: Results, baseline: str, attainment: float = ATTAINMENT) -> dict:
    """The comparison section: {"baseline", "attainment", "configurations": {name: {"points": {label:
    ratios}, "capacity": ...}}}, the baseline included (its ratios are 1, or None where its figure is 0).
    When the baseline has no results (it failed), "error" says so and there are no ratios."""
    out: dict = {"baseline": baseline, "attainment": attainment, "configurations": {}}
    if baseline not in results:
        out["error"] = f"the baseline configuration {baseline!r} has no results"
        return out
    base = results[baseline]
    base_cap, base_at_least = capacity_of(base, attainment)
    for name, points in results.items():
        cap, at_least = capacity_of(points, attainment)
        out["configurations"][name] = {
            # Only the points both ran: a point missing on either side has nothing to compare with
            "points": {p: asdict(point_ratios(points[p], base[p])) for p in points if p in base},
            "capacity": asdict(Capacity(cap, at_least, base_cap, base_at_least, ratio(cap, base_cap))),
        }
    return out
