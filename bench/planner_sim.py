"""The SLO planner judged in the simulator, beyond this machine: a GPU cluster's day, compressed.

Profile: one Llama-3.1-8B node on one H100 SXM in bfloat16, derived (not measured) from published figures:
NVIDIA's H100 SXM datasheet (989 dense bf16 TFLOPS, 3.35 TB/s HBM3, 80 GB) and the model's shapes (8.0 B
parameters, 32 layers, 8 KV heads of 128, hidden 4096). Prefill at 50% of peak FLOPs (2 x parameters per token,
plus attention's 4 x layers x hidden per token pair); a decode step reads the weights at 80% of the memory
bandwidth, plus each sequence's K/V; per-sequence compute at 50% of peak. A profile measured on a lent GPU
(`baton profile --device cuda`) replaces it when one is at hand.

Trace: a day compressed into `--day` seconds: the request rate follows a daily cycle with a 10x swing (night
trough to a peak at noon), and the traffic shifts from chat (short prompts, long answers) in the morning to
long prompts (documents, short answers) in the afternoon, the mix turning over two "hours" around noon. Node
start: `--start` seconds (a role changed in place is 0.55 s on the CPU here; a new GPU process loads its weights
in tens of seconds).

Judged: the planner (elastic, up to --max-nodes) against the best static split that also holds the SLO for at
least 99% of requests (the fewest nodes, then the split, searched): SLO attainment and node-hours.

    python bench/planner_sim.py [--peak 100] [--day 1440] [--max-nodes 100] [--slo ttft=1000,tpot=50]
                                [--thin K] [--skip-static] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from baton.cluster.planner import Load, Planner, Slo
from baton.cluster.simulator import Request, SimConfig, Simulation, simulate, summarize, thin
from baton.engine.profile import DecodePoint, PrefillPoint, Profile

TFLOPS, HBM, MEMORY = 989e12, 3.35e12, 80e9  # H100 SXM datasheet: dense bf16, HBM3 bytes/s, bytes
PARAMS, LAYERS, HIDDEN, KV_HEADS, HEAD_DIM = 8.03e9, 32, 4096, 8, 128  # Llama-3.1-8B


def h100_llama8b() -> Profile:
    flops = 0.5 * TFLOPS
    kv_bytes = 2 * LAYERS * KV_HEADS * HEAD_DIM * 2  # K and V, bf16: 128 KiB per token
    a, b, c = 0.004, 2 * PARAMS / flops, 4 * LAYERS * HIDDEN / flops
    d, e, f = 2 * PARAMS / (0.8 * HBM), 2 * PARAMS / flops, kv_bytes / (0.8 * HBM)
    blocks = int((MEMORY * 0.9 - 2 * PARAMS) / kv_bytes) // 16
    return Profile(model="Llama-3.1-8B (derived)", device="cuda", dtype="bfloat16", tp=1,
                   machine="H100 SXM, from its datasheet (not measured)", block_size=16, num_kv_blocks=blocks,
                   kv_bytes_per_token=kv_bytes, max_num_seqs=256, max_model_len=131072,
                   prefill=(PrefillPoint(1024, 0, a + b * 1024 + c * 1024 * 1024),),
                   decode=(DecodePoint(1, 1024, d + e + f * 1024),), prefill_fit=(a, b, c), decode_fit=(d, e, f))


def day_trace(peak: float, day: float, seed: int) -> Iterator[Request]:
    """Rate(t) = peak x (0.1 + 0.9 x (1 - cos(2 pi t / day)) / 2): a 10x swing, the peak mid-day. Thinned
    from a Poisson process at the peak rate; generated as it is read (a real day holds tens of millions)."""
    rng, t = random.Random(seed), 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= day:
            return
        if rng.random() > 0.1 + 0.9 * (1 - math.cos(2 * math.pi * t / day)) / 2:
            continue
        # The mix turns from chat to long prompts over two "hours" around noon.
        if rng.random() >= min(1.0, max(0.0, (t - day * 11 / 24) / (day / 12))):  # chat
            yield Request(t, rng.randint(200, 1200), rng.randint(150, 500))
        else:  # long prompts
            yield Request(t, rng.randint(4000, 12000), rng.randint(50, 200))


def first_split(planner: Planner, trace: list[Request], interval: float) -> tuple[int, int]:
    """The split the planner gives the first interval's load: the cluster at midnight, as a day's run left it
    (starting from 1P1D instead would put the first interval's misses on a start-up no cluster goes through
    each day)."""
    first = [r for r in trace if r.arrival < interval]
    if not first:
        return 1, 1
    load = Load(len(first) / interval, sum(r.prompt for r in first) / len(first),
                sum(r.output for r in first) / len(first))
    return planner.target((1, 1), *planner.needs(load))


def static_best(profile: Profile, trace: list[Request], slo: Slo, max_nodes: int, bandwidth: float
                ) -> tuple[tuple[int, int], float] | None:
    """The fewest nodes, and their best split, that hold the SLO for >= 99% of the trace: (split, attained)."""
    def attained(p: int, d: int) -> float:
        return summarize(simulate(profile, SimConfig(prefill=p, decode=d, bandwidth=bandwidth), trace), slo.ttft,
                         slo.tpot).attained

    def best_of(n: int) -> tuple[tuple[int, int], float]:
        tried: dict[int, float] = {}
        lo, hi = 1, n - 1  # attainment is unimodal in the prefill share: ternary search over it
        while hi - lo > 2:
            m1, m2 = lo + (hi - lo) // 3, hi - (hi - lo) // 3
            for m in (m1, m2):
                tried.setdefault(m, attained(m, n - m))
            lo, hi = (lo, m2) if tried[m1] >= tried[m2] else (m1, hi)
        for m in range(lo, hi + 1):
            tried.setdefault(m, attained(m, n - m))
        p = max(tried, key=tried.get)
        return (p, n - p), tried[p]

    lo, hi, found = 2, max_nodes, None
    while lo <= hi:  # the fewest nodes whose best split holds the SLO
        n = (lo + hi) // 2
        split, share = best_of(n)
        if share >= 0.99:
            found, hi = (split, share), n - 1
        else:
            lo = n + 1
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peak", type=float, default=100.0, help="requests per second at the daily peak")
    ap.add_argument("--day", type=float, default=1440.0, help="seconds the day is compressed into")
    ap.add_argument("--max-nodes", type=int, default=100)
    ap.add_argument("--headroom", type=float, default=0.2, help="the planner's (baton planner --headroom)")
    ap.add_argument("--slo", default="ttft=1000,tpot=50", help="ms")
    ap.add_argument("--interval", type=float, default=10.0, help="the planner's, seconds")
    ap.add_argument("--start", type=float, default=0.55, help="seconds before a node added serves")
    ap.add_argument("--bandwidth", type=float, default=25e9, help="a KV transfer's bytes/s (NVLink/IB class)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--thin", type=int, default=1, metavar="K",
                    help="simulate 1/K of the nodes (the planner's --max-nodes / K) on a random 1/K of the requests; "
                         "node-hours are scaled back by K (a day of a thousand nodes in minutes)")
    ap.add_argument("--skip-static", action="store_true", help="the planner alone (the static search simulates "
                                                                  "the day some twenty times)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    slo = Slo.parse(args.slo)
    profile = h100_llama8b()
    k = args.thin  # 1/k of the requests on 1/k of the nodes; node counts and hours are scaled back by k
    trace = thin(day_trace(args.peak, args.day, args.seed), k, seed=args.seed + 1)  # its own draws
    started = time.perf_counter()
    planner = Planner(profile, slo, max_nodes=args.max_nodes // k, headroom=args.headroom)
    sim = Simulation(profile, SimConfig(*first_split(planner, trace, args.interval), bandwidth=args.bandwidth))
    planned = summarize(sim.run(trace, planner, args.interval, args.start), slo.ttft, slo.tpot)
    planner_s = time.perf_counter() - started
    node_hours = sim.node_seconds() / 3600 * k
    changes = sum(d.apply for _, d in sim.decisions)
    peak_nodes = max((d.prefill + d.decode for _, d in sim.decisions), default=2) * k
    best = None if args.skip_static else static_best(profile, trace, slo, args.max_nodes // k, args.bandwidth)
    size = f"{len(trace)} requests" if k == 1 else f"~{len(trace) * k} requests ({len(trace)} simulated)"
    print(f"profile: {profile.model} on {profile.machine}; trace: {size} over a {args.day:g} s day "
          f"(peak {args.peak:g} req/s, 10x swing; chat, then long prompts); SLO {args.slo} ms")
    sampled = f", 1/{k} of it simulated on 1/{k} of the nodes" if k > 1 else ""
    print(f"planner: {planned.attained:.2%} within the SLO, {node_hours:.2f} node-hours, {changes} changes, "
          f"at most {peak_nodes} nodes (simulated in {planner_s:.1f} s{sampled})")
    result = {"requests": len(trace) * k, "simulated_requests": len(trace), "thin": k,
              "planner": {"attained": planned.attained, "node_hours": node_hours, "changes": changes,
                          "peak_nodes": peak_nodes, "sim_s": planner_s}}
    if args.skip_static:
        pass
    elif best is None:
        print(f"no static split of up to {args.max_nodes} nodes holds the SLO for 99% of requests")
    else:
        (p, d), share = best
        p, d = p * k, d * k
        static_hours = (p + d) * (max(r.arrival for r in trace)) / 3600
        print(f"best static split holding 99%: {p}P{d}D, {share:.2%} within the SLO, {static_hours:.2f} node-hours "
              f"(planner / static: {node_hours / static_hours:.2f})")
        result["static"] = {"split": [p, d], "attained": share, "node_hours": static_hours}
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, **result}, indent=1,
                                        default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
