"""How close `baton simulate` comes to real clusters: the same trace, predicted and measured.

The 51M Llama (context 4096) is profiled once with `baton profile` (one torch thread, as each node runs here);
then for each topology (1P1D, 2P1D, 1P2D, two colocated nodes) a `baton up` cluster (one thread per node,
pinned to core i % 2) is sent a seeded Poisson trace open-loop, at the trace's times, and the simulator predicts
the same trace on the same topology from the profile. It prints measured against predicted p50 TTFT, p50 TPOT
and goodput, and the error of each (predicted / measured - 1).

    python bench/sim_accuracy.py [--rate 2] [--requests 120] [--slo ttft=1000,tpot=100] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from baton.bench.engine_throughput import machine
from baton.bench.faults import run_cluster
from baton.bench.loadgen import send
from baton.bench.memory_soak import cached_model
from baton.bench.runner import git_commit
from baton.bench.workload import Request as Sent
from baton.cluster.launch import ClusterSpec
from baton.cluster.simulator import Request, SimConfig, simulate, summarize
from baton.common.profile import Profile
from baton.router.client import AsyncBatonClient

TOPOLOGIES = {"1P1D": (1, 1, 0), "2P1D": (2, 1, 0), "1P2D": (1, 2, 0), "2 colocated": (0, 0, 2)}
VOCAB = 32000


def make_trace(n: int, rate: float, seed: int) -> list[Request]:
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(Request(t, rng.randint(32, 512), rng.randint(16, 96)))
    return out


async def replay(address: str, trace: list[Request], seed: int) -> list[dict]:
    """Sends the trace open-loop at its times: per request its TTFT and TPOT (seconds), as the client saw them."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(r.prompt)] for r in trace]
    async with AsyncBatonClient(address, timeout=600) as client:
        await client.complete([5, 6, 7], max_tokens=2)  # warm-up: channels open, first-call costs paid
        t0 = time.perf_counter()
        tasks = []
        for i, (r, prompt) in enumerate(zip(trace, prompts)):
            delay = t0 + r.arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing the open loop: the trace's arrival times
            tasks.append(asyncio.create_task(send(client, Sent(i, "trace", prompt, r.prompt, r.output), t0,
                                                  r.arrival, False, 600)))
        records = await asyncio.gather(*tasks)
    return [{"ttft": (rec.ttft_ms or math.nan) / 1e3, "tpot": (rec.tpot_ms or math.nan) / 1e3,
             "error": rec.error, "end": (rec.start_s + (rec.e2e_ms or math.nan) / 1e3)} for rec in records]


def measured_summary(records: list[dict], trace: list[Request], ttft_slo: float, tpot_slo: float) -> dict:
    ok = [r for r in records if r["error"] is None]
    good = [r for r in ok if r["ttft"] <= ttft_slo and r["tpot"] <= tpot_slo]
    duration = max(r["end"] for r in ok) - trace[0].arrival
    median = lambda xs: sorted(xs)[(len(xs) - 1) // 2] if xs else math.nan  # noqa: E731
    return {"ttft_p50": median([r["ttft"] for r in ok]), "tpot_p50": median([r["tpot"] for r in ok]),
            "goodput": len(good) / duration, "errors": len(records) - len(ok)}


def profile_model(model: Path, out: Path) -> Profile:
    subprocess.run([sys.executable, "-m", "baton.cluster.cli", "profile", "--model", str(model), "--threads", "1",
                    "--output", str(out), "--prompt-lens", "32,128,320,512", "--cached-fractions", "0",
                    "--batches", "1,2,4,8,16", "--contexts", "64,320,600", "--repeats", "3", "--max-num-seqs", "64"],
                   check=True, stdout=subprocess.DEVNULL)
    return Profile.load(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=2.0, help="requests per second")
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--bandwidth", type=float, default=1e9, help="the simulator's KV transfer bytes/s")
    ap.add_argument("--slo", default="ttft=1000,tpot=100", help="ms, for goodput")
    ap.add_argument("--topologies", default=",".join(TOPOLOGIES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    slo = {k: float(v) / 1e3 for k, v in (part.split("=") for part in args.slo.split(","))}
    model = cached_model()
    trace = make_trace(args.requests, args.rate, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        profile = profile_model(model, Path(tmp) / "profile.yaml")
    rows = {}
    for name in args.topologies.split(","):
        p, d, c = TOPOLOGIES[name]
        spec = ClusterSpec(model=str(model), prefill=p, decode=d, colocated=c, threads=1, pin=True,
                           node_args=["--max-num-seqs", "64"])
        records = run_cluster(spec, lambda cluster: replay(cluster.address, trace, args.seed))
        real = measured_summary(records, trace, slo["ttft"], slo["tpot"])
        sim = summarize(simulate(profile, SimConfig(prefill=p, decode=d, colocated=c, bandwidth=args.bandwidth),
                                 trace), slo["ttft"], slo["tpot"])
        predicted = {"ttft_p50": sim.ttft_p50, "tpot_p50": sim.tpot_p50, "goodput": sim.goodput}
        rows[name] = {"measured": real, "predicted": predicted,
                      "error": {k: predicted[k] / real[k] - 1 for k in predicted}}
        print(f"{name}: measured {real}, predicted {predicted}", flush=True)
    print(f"machine: {machine('one torch thread per node, pinned to core i % 2')}")
    print(f"trace: {args.requests} requests, Poisson {args.rate}/s, prompts 32-512, outputs 16-96 tokens; "
          f"SLO {args.slo} ms")
    print(f"{'topology':12} {'TTFT p50 ms (meas/pred, err)':>32} {'TPOT p50 ms (meas/pred, err)':>32} "
          f"{'goodput req/s (meas/pred, err)':>34}")
    for name, row in rows.items():
        m, p, e = row["measured"], row["predicted"], row["error"]
        print(f"{name:12} {m['ttft_p50'] * 1e3:11.1f} /{p['ttft_p50'] * 1e3:7.1f}, {e['ttft_p50']:+6.0%}"
              f"{m['tpot_p50'] * 1e3:14.1f} /{p['tpot_p50'] * 1e3:7.1f}, {e['tpot_p50']:+6.0%}"
              f"{m['goodput']:15.2f} /{p['goodput']:6.2f}, {e['goodput']:+6.0%}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine("one torch thread per node, pinned"), "commit":
                                         git_commit(), "args": vars(args) | {"json": str(args.json)},
                                         "profile": profile.to_dict(), "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
