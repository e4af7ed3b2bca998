"""SLOs of `baton bench` that hold on any machine: bounds in milliseconds, or multiples of unloaded latency.

An absolute bound (`ttft_ms: 1000`) means the same thing everywhere, so on a slower machine every request
can miss it and every configuration's goodput reads 0: the comparison is lost. A relative bound
(`tpot: 2x`) is resolved against the unloaded TTFT and TPOT measured in the same run (a few requests sent
one at a time before any load, medians), so it scales with the machine.

Config forms (the `slo:` mapping; the older top-level `slo_ttft_ms`/`slo_tpot_ms` still work):

    slo: {ttft: 20x, tpot: 2x}           multiples of the unloaded figures
    slo: {ttft_ms: 1000, tpot_ms: 12}    milliseconds
    slo: {ttft_ms: 1000, tpot: 2x}       mixed

A multiple is written with an `x` ("2x", "1.5x") so that it can never be mistaken for milliseconds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from baton.bench.loadgen import RequestRecord
from baton.bench.metrics import SLO

METRICS = ("ttft", "tpot")


@dataclass(frozen=True, slots=True)
class Bound:
    """One latency bound: `ms` (absolute) or `multiple` (of the unloaded figure); exactly one is set."""
    ms: float | None = None
    multiple: float | None = None

    def __post_init__(self) -> None:
        if (self.ms is None) == (self.multiple is None):
            raise ValueError("a bound is either in milliseconds or a multiple")

    @property
    def relative(self) -> bool:
        return self.multiple is not None


@dataclass(frozen=True, slots=True)
class Unloaded:
    """A configuration's latency with nothing else running: medians over requests sent one at a time."""
    ttft_ms: float | None
    tpot_ms: float | None
    ttft_samples_ms: tuple[float, ...] = ()
    tpot_samples_ms: tuple[float, ...] = ()
    requests: int = 0  # sent, failed ones included

    @classmethod
    def from_records(cls, records: Sequence[RequestRecord]) -> Unloaded:
        """Medians, not means: the first request on a fresh cluster pays one-off costs (gRPC channels, the
        KV pair group) that must not move the baseline. A one-token request has no TPOT and adds none."""
        ok = [r for r in records if r.error is None]
        ttft = tuple(r.ttft_ms for r in ok if r.ttft_ms is not None)
        tpot = tuple(r.tpot_ms for r in ok if r.tpot_ms is not None)
        return cls(statistics.median(ttft) if ttft else None, statistics.median(tpot) if tpot else None,
                   ttft, tpot, len(records))

    def get(self, metric: str) -> float | None:
        return self.ttft_ms if metric == "ttft" else self.tpot_ms

    def to_dict(self) -> dict:
        return {"ttft_ms": self.ttft_ms, "tpot_ms": self.tpot_ms, "requests": self.requests,
                "ttft_samples_ms": list(self.ttft_samples_ms), "tpot_samples_ms": list(self.tpot_samples_ms)}


@dataclass(frozen=True, slots=True)
class SLOSpec:
    """The SLO as the config states it; `resolve` turns it into the milliseconds goodput is judged by."""
    ttft: Bound | None = None
    tpot: Bound | None = None

    @property
    def relative(self) -> bool:
        return any(b is not None and b.relative for b in (self.ttft, self.tpot))

    def resolve(self, unloaded: Unloaded | None) -> SLO:
        """Milliseconds for every bound; a relative one is its multiple of `unloaded` (the baseline
        configuration's figures). Raises ValueError naming the key when the figure it needs is missing."""
        ms: dict[str, float | None] = {}
        for metric in METRICS:
            bound: Bound | None = getattr(self, metric)
            if bound is None or not bound.relative:
                ms[metric] = None if bound is None else bound.ms
                continue
            base = unloaded.get(metric) if unloaded is not None else None
            if base is None or not base > 0:
                raise ValueError(f"slo.{metric}: a multiple needs the baseline's unloaded {metric.upper()}, "
                                 f"which was not measured (no calibration request completed with one)")
            ms[metric] = bound.multiple * base
        return SLO(ms["ttft"], ms["tpot"])

    def describe(self) -> dict:
        """The configured multiples (null for a bound in milliseconds or no bound), for summary.json."""
        bounds = {m: getattr(self, m) for m in METRICS}
        return {f"{m}_multiple": None if b is None else b.multiple for m, b in bounds.items()}


def parse_multiple(value: Any, key: str) -> float:
    """ "2x" -> 2.0. A bare number is refused: `ttft: 4` could be read as 4 ms or 4x."""
    text = value.strip() if isinstance(value, str) else ""
    if text[-1:] not in ("x", "X"):
        raise ValueError(f"{key}: must be a multiple of the unloaded figure such as \"2x\" "
                         f"(or give {key}_ms in milliseconds), not {value!r}")
    try:
        multiple = float(text[:-1])
    except ValueError:
        raise ValueError(f"{key}: must be a number followed by x, such as \"2x\", not {value!r}") from None
    if not (math.isfinite(multiple) and multiple > 0):
        raise ValueError(f"{key}: the multiple must be > 0, not {value!r}")
    return multiple


def parse_ms(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key}: must be a number of milliseconds, not {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{key}: must be > 0, not {value!r}")
    return float(value)


def _bound(obj: Mapping[str, Any], metric: str, where: str) -> Bound | None:
    relative, absolute = metric, f"{metric}_ms"
    if relative in obj and absolute in obj:
        raise ValueError(f"{where}{relative}: give {relative} (a multiple) or {absolute}, not both")
    if relative in obj:
        return Bound(multiple=parse_multiple(obj[relative], f"{where}{relative}"))
    if absolute in obj and obj[absolute] is not None:
        return Bound(ms=parse_ms(obj[absolute], f"{where}{absolute}"))
    return None


def parse_slo(config: Mapping[str, Any]) -> SLOSpec:
    """The SLO of a bench config: its `slo:` mapping, or the older top-level `slo_ttft_ms`/`slo_tpot_ms`
    (not both: two places to read one bound from would be a trap). Errors name the key."""
    legacy = [k for k in ("slo_ttft_ms", "slo_tpot_ms") if k in config]
    if "slo" not in config:
        flat = {f"{m}_ms": config[f"slo_{m}_ms"] for m in METRICS if f"slo_{m}_ms" in config}
        return SLOSpec(*(_bound(flat, m, "slo_") for m in METRICS))
    if legacy:
        raise ValueError(f"{legacy[0]}: give the SLO either in `slo` or in slo_ttft_ms/slo_tpot_ms, not both")
    obj = config["slo"]
    if obj is None:
        return SLOSpec()
    if not isinstance(obj, Mapping):
        raise ValueError(f"slo: must be a mapping such as {{ttft: 20x, tpot: 2x}}, not {obj!r}")
    unknown = set(obj) - {k for m in METRICS for k in (m, f"{m}_ms")}
    if unknown:
        raise ValueError(f"slo.{sorted(unknown)[0]}: unknown key (ttft, tpot, ttft_ms or tpot_ms)")
    return SLOSpec(*(_bound(obj, m, "slo.") for m in METRICS))
