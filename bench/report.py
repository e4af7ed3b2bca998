"""What `baton bench` leaves behind: summary.json, raw.json, PNG plots and a table for the terminal."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: the bench runs on servers without a display
import matplotlib.pyplot as plt  # noqa: E402

from baton.bench.loadgen import RequestRecord  # noqa: E402

Results = Mapping[str, Mapping[str, dict]]  # config name -> sweep point (str) -> summary
Raw = Mapping[str, Mapping[str, list[RequestRecord]]]


def jsonable(obj: object) -> object:
    """`obj` with non-finite floats as strings ("inf": a config's all-at-once rate), which JSON cannot hold."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, Mapping):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    return obj


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")


def write_raw(path: Path, raw: Raw, walls: Mapping[str, Mapping[str, float]]) -> None:
    write_json(path, {name: {point: {"wall_s": walls[name][point], "records": [r.to_dict() for r in recs]}
                             for point, recs in points.items()} for name, points in raw.items()})


def _cdf(ax, values: list[float], label: str) -> None:
    if not values:
        return
    s = sorted(values)
    ax.step(s, [(i + 1) / len(s) for i in range(len(s))], where="post", label=label)


def plot_cdfs(path: Path, raw: Raw) -> None:
    """TTFT and TPOT CDFs of the measured requests, one line per configuration (and sweep point if several)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, points in raw.items():
        for point, recs in points.items():
            ok = [r for r in recs if not r.warmup and r.error is None]
            label = name if len(points) == 1 else f"{name} @ {point}"
            _cdf(axes[0], [r.ttft_ms for r in ok if r.ttft_ms is not None], label)
            _cdf(axes[1], [r.tpot_ms for r in ok if r.tpot_ms is not None], label)
    for ax, title in zip(axes, ("TTFT (ms)", "TPOT (ms)")):
        ax.set_xlabel(title)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(path: Path, results: Results, axis: str) -> None:
    """TTFT p99, TPOT p99 and goodput against the sweep variable (rate or concurrency), a line per config."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = (("TTFT p99 (ms)", lambda s: s["ttft_ms"]["p99"]), ("TPOT p99 (ms)", lambda s: s["tpot_ms"]["p99"]),
              ("goodput (req/s)", lambda s: s["goodput_rps"]))
    for name, points in results.items():
        xs = sorted(points, key=float)
        for ax, (_, get) in zip(axes, panels):
            ys = [get(points[x]) for x in xs]
            ax.plot([float(x) for x in xs], [math.nan if y is None else y for y in ys], marker="o", label=name)
    for ax, (title, _) in zip(axes, panels):
        ax.set_xlabel(axis)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _f(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table(results: Results, axis: str) -> str:
    """A fixed-width table: one row per configuration and sweep point."""
    head = (f"{'configuration':<22}{axis:>8}{'done':>6}{'errors':>8}{'tok/s':>9}{'req/s':>7}{'good/s':>8}"
            f"{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}{'TPOT p99':>10}{'ITL p99':>9}{'E2E p99':>9}")
    rows = [head, "-" * len(head)]
    for name, points in results.items():
        for point in sorted(points, key=float):
            s = points[point]
            errors = sum(s["errors"].values())
            rows.append(f"{name[:21]:<22}{point:>8}{s['completed']:>6}{errors:>8}{s['throughput_tok_s']:>9.1f}"
                        f"{s['throughput_rps']:>7.2f}{_f(s['goodput_rps'], 2):>8}"
                        f"{_f(s['ttft_ms']['p50']):>10}{_f(s['ttft_ms']['p99']):>10}"
                        f"{_f(s['tpot_ms']['p50']):>10}{_f(s['tpot_ms']['p99']):>10}"
                        f"{_f(s['itl_ms']['p99']):>9}{_f(s['e2e_ms']['p99'], 0):>9}")
    return "\n".join(rows)


def slo_line(slo: Mapping) -> str:
    """The SLO the run judged goodput by, and where a relative bound's milliseconds came from."""
    if slo.get("error"):
        return f"SLO: not resolved ({slo['error']}): no goodput"
    parts = []
    for metric in ("ttft", "tpot"):
        ms, multiple = slo[f"{metric}_ms"], slo[f"{metric}_multiple"]
        if ms is None:
            continue
        part = f"{metric.upper()} <= {ms:.1f} ms"
        if multiple is not None:
            base = slo["relative_to_unloaded"][f"{metric}_ms"]
            part += f" ({multiple:g}x {slo['relative_to']}'s unloaded {base:.1f} ms)"
        parts.append(part)
    return "SLO: " + (", ".join(parts) if parts else "none (every completed request counts as good)")


def comparison_table(comparison: Mapping, axis: str) -> str:
    """Each configuration's ratios to the baseline (configuration / baseline), a row per sweep point, then
    capacity at the comparison's SLO attainment."""
    if comparison.get("error"):
        return f"comparison: {comparison['error']}"
    base = comparison["baseline"]
    head = f"{'configuration':<22}{axis:>8}{'TTFT p99':>10}{'TPOT p99':>10}{'goodput':>9}"
    rows = [f"ratios to {base} (configuration / {base})", head, "-" * len(head)]
    for name, c in comparison["configurations"].items():
        for point in sorted(c["points"], key=float):
            r = c["points"][point]
            rows.append(f"{name[:21]:<22}{point:>8}{_f(r['ttft_p99'], 2):>10}{_f(r['tpot_p99'], 2):>10}"
                        f"{_f(r['goodput'], 2):>9}")
    caps = []
    for name, c in comparison["configurations"].items():
        cap = c["capacity"]
        value = "-" if cap["value"] is None else (">= " if cap["at_least"] else "") + f"{cap['value']:.2f}"
        caps.append(f"{name} {value}" + ("" if cap["ratio"] is None else f" ({cap['ratio']:.2f}x)"))
    rows.append(f"capacity ({axis} at >= {comparison['attainment']:.0%} SLO attainment): " + ", ".join(caps))
    return "\n".join(rows)
