"""The SLO planner on a live cluster: 4 nodes of the 51M Llama under a load that shifts from chat (short
prompts, long answers) to long prompts and back, with the planner against static splits.

One real etcd; each run is a `baton launch` of a router and 4 nodes (one torch thread each) from a placement,
sent the same seeded open-loop trace in three phases. The static runs keep 1P3D, 2P2D and 3P1D throughout; the
planner run starts at the split sized for the first phase (the best static one for it) with `baton planner`
(profile from `baton profile`, interval, confirmation and cool-down given below) changing the placement, nodes
changing role in place. Per run and phase it prints the share of requests within the SLO and the goodput, the
role changes made, and requests lost (failed): the planner must lose none.

    python bench/planner_live.py [--phase-seconds 60] [--rate 3] [--slo ttft=1000,tpot=20] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from baton.bench.engine_throughput import machine
from baton.bench.memory_soak import cached_model
from baton.bench.runner import git_commit
from baton.bench.sim_accuracy import profile_model, replay
from baton.cluster import placement_store
from baton.cluster.etcd_server import EtcdServer, free_port
from baton.cluster.placement import parse
from baton.cluster.planner import Slo
from baton.cluster.simulator import Request
from baton.common.membership import MembershipWatcher

PHASES = (("chat", (32, 128), (96, 160)), ("long prompts", (600, 1000), (8, 24)), ("chat again", (32, 128),
                                                                                   (96, 160)))


def make_trace(rate: float, seconds: float, seed: int) -> list[Request]:
    rng, out = random.Random(seed), []
    for k, (_, prompt, output) in enumerate(PHASES):
        t = k * seconds
        while True:
            t += rng.expovariate(rate)
            if t >= (k + 1) * seconds:
                break
            out.append(Request(t, rng.randint(*prompt), rng.randint(*output)))
    return out


async def one_run(etcd: str, model: Path, split: tuple[int, int], trace: list[Request], logs: Path,
                  planner_args: list[str] | None, seed: int) -> dict:
    name = f"plan-{uuid.uuid4().hex[:6]}"
    port = free_port()
    nodes = [{"name": f"n{i}", "role": "prefill" if i < split[0] else "decode", "threads": 1} for i in range(4)]
    spec = {"cluster": name, "model": {"path": str(model)}, "options": {"max_num_seqs": 64},
            "machines": [{"name": "m", "host": "127.0.0.1", "router": {"port": port}, "nodes": nodes}]}
    await placement_store.place(etcd, parse(spec))
    launch = subprocess.Popen([sys.executable, "-m", "baton.cluster.cli", "launch", "--machine", "m", "--etcd", etcd,
                               "--cluster", name, "--log-dir", str(logs / name), "--parent-pid", str(os.getpid())],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    planner = None
    watcher = await MembershipWatcher.start(etcd, name)
    try:
        await watcher.wait_for(lambda: len(watcher.nodes()) == 4, 600)
        if planner_args is not None:
            planner = subprocess.Popen([sys.executable, "-m", "baton.cluster.cli", "planner", "--etcd", etcd,
                                        "--cluster", name, *planner_args],
                                       stdout=open(logs / f"{name}-planner.log", "w"), stderr=subprocess.STDOUT)
        records = await replay(f"127.0.0.1:{port}", trace, seed)
    finally:
        await watcher.close()
        for proc in (planner, launch):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    history = await placement_store.history(etcd, name)
    return {"records": records, "changes": [c for h in history if h.by == "planner" for c in h.changes],
            "reasons": [h.reason for h in history if h.by == "planner"]}


def phase_figures(records: list[dict], trace: list[Request], seconds: float, slo: Slo) -> list[dict]:
    out = []
    for k, (phase, *_) in enumerate(PHASES):
        mine = [r for r, q in zip(records, trace) if k * seconds <= q.arrival < (k + 1) * seconds]
        good = [r for r in mine if r["error"] is None and r["ttft"] <= slo.ttft and
                (math.isnan(r["tpot"]) or r["tpot"] <= slo.tpot)]
        out.append({"phase": phase, "requests": len(mine), "attained": len(good) / len(mine) if mine else math.nan,
                    "goodput": len(good) / seconds, "failed": sum(r["error"] is not None for r in mine)})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase-seconds", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=3.0)
    ap.add_argument("--slo", default="ttft=1000,tpot=20", help="ms")
    ap.add_argument("--interval", type=float, default=5.0, help="the planner's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    slo = Slo.parse(args.slo)
    model = cached_model()
    trace = make_trace(args.rate, args.phase_seconds, args.seed)
    results = {}
    with tempfile.TemporaryDirectory() as tmp, EtcdServer() as etcd:
        logs = Path(tmp)
        profile_model(model, logs / "profile.yaml")
        planner_args = ["--slo", args.slo, "--profile", str(logs / "profile.yaml"), "--interval", str(args.interval),
                        "--confirm", "2", "--cooldown", "2"]
        runs = {"static 1P3D": ((1, 3), None), "static 2P2D": ((2, 2), None), "static 3P1D": ((3, 1), None)}
        for label, (split, extra) in runs.items():
            result = asyncio.run(one_run(etcd.url, model, split, trace, logs, extra, args.seed))
            results[label] = {"phases": phase_figures(result["records"], trace, args.phase_seconds, slo),
                              "records": result["records"]}
            print(label, results[label]["phases"], flush=True)
        first = max((label for label in runs), key=lambda label: results[label]["phases"][0]["attained"])
        result = asyncio.run(one_run(etcd.url, model, runs[first][0], trace, logs, planner_args, args.seed))
        results["planner"] = {"phases": phase_figures(result["records"], trace, args.phase_seconds, slo),
                              "starts_as": first, "changes": result["changes"], "reasons": result["reasons"],
                              "records": result["records"]}
        print("planner", results["planner"]["phases"], results["planner"]["changes"], flush=True)
    print(f"machine: {machine('4 nodes, 1 torch thread each, + router and client, on 2 cores')}")
    print(f"trace: {len(trace)} requests, Poisson {args.rate}/s, {args.phase_seconds:g} s per phase; SLO {args.slo} "
          f"ms; planner every {args.interval:g} s, starting as {first}")
    print(f"{'run':14}" + "".join(f"{p[0]:>30}" for p in PHASES) + f"{'failed':>8}")
    for label, r in results.items():
        print(f"{label:14}" + "".join(f"{f['attained']:>14.0%} {f['goodput']:6.2f} req/s     " for f in r["phases"])
              + f"{sum(f['failed'] for f in r['phases']):>6}")
    print("planner changes: " + "; ".join(results["planner"]["changes"]))
    if args.json:  # the figures, not every request's record
        brief = {label: {k: v for k, v in r.items() if k != "records"} for label, r in results.items()}
        args.json.write_text(json.dumps({"machine": machine("4 nodes, 1 thread each, 2 cores"), "commit": git_commit(),
                                         "args": {k: str(v) for k, v in vars(args).items()}, "results": brief},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
