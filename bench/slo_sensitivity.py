"""Goodput of a finished `baton bench` run under other SLOs, from its raw.json: how the comparison between
configurations depends on the SLO chosen (the run's own SLO is in its summary.json).

    python bench/slo_sensitivity.py DIR [--ttft-ms 1000] [--tpot-ms 10 15 20 40]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def goodput(records: list[dict], wall_s: float, ttft_ms: float, tpot_ms: float) -> float:
    """Requests/s that completed with TTFT and TPOT within the SLO (warm-up excluded)."""
    good = [r for r in records if not r["warmup"] and r["error"] is None and r["ttft_ms"] is not None
            and r["ttft_ms"] <= ttft_ms and (r["tpot_ms"] is None or r["tpot_ms"] <= tpot_ms)]
    return len(good) / wall_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="the --output folder of a baton bench run")
    ap.add_argument("--ttft-ms", type=float, default=1000.0)
    ap.add_argument("--tpot-ms", type=float, nargs="+", default=[10.0, 15.0, 20.0, 40.0])
    args = ap.parse_args()
    raw = json.loads((args.run / "raw.json").read_text())
    print(f"goodput (req/s) at TTFT <= {args.ttft_ms:g} ms and TPOT <= each bound")
    print(f"{'configuration':32}{'rate':>6}" + "".join(f"{f'{t:g} ms':>10}" for t in args.tpot_ms))
    for name, rates in raw.items():
        for rate, run in rates.items():
            cells = [goodput(run["records"], run["wall_s"], args.ttft_ms, t) for t in args.tpot_ms]
            print(f"{name:32}{rate:>6}" + "".join(f"{c:10.2f}" for c in cells))


if __name__ == "__main__":
    main()
