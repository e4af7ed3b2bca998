"""A router process's start-up time and resident memory, for one or more installs of Baton side by side.

Each `--baton` is a `baton` executable (a virtualenv's `bin/baton`: this tree's, and another checkout's as the
baseline). For each, in turns (so that the machine's noise falls on all alike), `baton router` starts against
one private etcd (no nodes: what is timed is the router alone), and the bench reads the time from the process's
start to its "router listening" line, then its resident memory (VmRSS, /proc) and whether it mapped torch's
library. It prints the medians per install and each one's ratio to the first.

    python bench/router_start.py --baton BASELINE/.venv/bin/baton --baton .venv/bin/baton [--runs 7] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from baton.bench.engine_throughput import machine
from baton.cluster.etcd_server import EtcdServer, free_port

READY = "router listening on"


def start_once(baton: str, etcd: str, cluster: str) -> dict:
    """One router start: seconds to ready, VmRSS in MiB once ready, whether it loaded torch."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([baton, "router", "--etcd", etcd, "--cluster", cluster, "--port", str(free_port())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if READY in line:
                break
        else:
            raise RuntimeError(f"{baton} router ended before it was ready (exit {proc.wait()})")
        ready_s = time.perf_counter() - t0
        status = Path(f"/proc/{proc.pid}/status").read_text()
        rss_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        torch = "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()
        return {"ready_s": ready_s, "rss_mib": rss_kib / 1024, "torch": torch}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baton", action="append", required=True, help="a `baton` executable (repeatable)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", default="", metavar="PATH")
    args = parser.parse_args()
    samples: dict[str, list[dict]] = {b: [] for b in args.baton}
    with EtcdServer() as etcd:
        for run in range(args.runs):
            for baton in args.baton:
                samples[baton].append(start_once(baton, etcd.url, f"start-{run}"))
    rows = []
    for baton, runs in samples.items():
        rows.append({"baton": baton, "ready_s": statistics.median(r["ready_s"] for r in runs),
                     "rss_mib": statistics.median(r["rss_mib"] for r in runs),
                     "loads_torch": any(r["torch"] for r in runs), "runs": runs})
    first = rows[0]
    print(f"{'baton':60} {'ready s':>8} {'RSS MiB':>8} {'torch':>6} {'ready x':>8} {'RSS x':>6}")
    for row in rows:
        print(f"{row['baton'][-60:]:60} {row['ready_s']:8.2f} {row['rss_mib']:8.0f} {str(row['loads_torch']):>6} "
              f"{row['ready_s'] / first['ready_s']:8.2f} {row['rss_mib'] / first['rss_mib']:6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
