"""Goodput of a finished `baton bench` run under other SLOs, from its raw.json: how the comparison between
configurations depends on the SLO chosen (the run's own SLO is in its summary.json).

For each configuration, rate and TPOT bound: goodput (requests/s meeting TTFT and TPOT) and SLO attainment
(the share of requests meeting them). Then, for a rate sweep, each configuration's capacity: the highest
arrival rate whose attainment stays at or above `--attainment` (interpolated between the swept rates) —
DistServe's (OSDI'24) definition of goodput, which does not depend on which rates were swept.

    python bench/slo_sensitivity.py DIR [--ttft-ms MS] [--tpot-ms 10 12 20 40] [--attainment 0.9]

`--ttft-ms` defaults to the TTFT bound the run itself used (summary.json's `slo.ttft_ms`: for a relative
SLO, the milliseconds it resolved to on that machine), else 1000.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from baton.bench.loadgen import RequestRecord
from baton.bench.metrics import SLO, capacity  # capacity: also `from baton.bench.slo_sensitivity`


def met(records: list[RequestRecord], slo: SLO) -> tuple[int, int]:
    """(requests that completed within the SLO, requests measured), warm-up excluded."""
    measured = [r for r in records if not r.warmup]
    return sum(slo.met(r) for r in measured), len(measured)


def run_ttft_ms(run: Path, default: float = 1000.0) -> float:
    """The TTFT bound a run judged goodput by, from its summary.json (older runs: the config's slo_ttft_ms)."""
    path = run / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    ms = (summary.get("slo") or {}).get("ttft_ms") or summary.get("config", {}).get("slo_ttft_ms")
    return float(ms) if ms else default


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="the --output folder of a baton bench run")
    ap.add_argument("--ttft-ms", type=float, default=None, help="default: the run's own TTFT bound, else 1000")
    ap.add_argument("--tpot-ms", type=float, nargs="+", default=[10.0, 12.0, 20.0, 40.0])
    ap.add_argument("--attainment", type=float, default=0.9)
    args = ap.parse_args()
    if args.ttft_ms is None:
        args.ttft_ms = run_ttft_ms(args.run)
    raw = json.loads((args.run / "raw.json").read_text())
    print(f"goodput (req/s) and SLO attainment at TTFT <= {args.ttft_ms:g} ms and TPOT <= each bound")
    print(f"{'configuration':32}{'rate':>6}" + "".join(f"{f'{t:g} ms':>16}" for t in args.tpot_ms))
    attained: dict[str, dict[float, dict[float, float]]] = {}
    for name, rates in raw.items():
        for rate, run in sorted(rates.items(), key=lambda kv: float(kv[0])):
            records = [RequestRecord.from_dict(r) for r in run["records"]]
            cells = []
            for t in args.tpot_ms:
                good, n = met(records, SLO(args.ttft_ms, t))
                attained.setdefault(name, {}).setdefault(t, {})[float(rate)] = good / n if n else 0.0
                cells.append(f"{good / run['wall_s']:8.2f} ({good / n if n else 0:4.0%})")
            print(f"{name:32}{rate:>6}" + "".join(f"{c:>16}" for c in cells))
    print(f"\ncapacity (req/s) at >= {args.attainment:.0%} attainment:")
    print(f"{'configuration':32}" + "".join(f"{f'{t:g} ms':>10}" for t in args.tpot_ms))
    for name, by_bound in attained.items():
        caps = [capacity(by_bound[t], args.attainment) for t in args.tpot_ms]
        top = max(by_bound[args.tpot_ms[0]])
        print(f"{name:32}" + "".join(f"{'-' if c is None else (f'>={c:g}' if c == top else f'{c:.2f}'):>10}"
                                      for c in caps))


if __name__ == "__main__":
    main()
