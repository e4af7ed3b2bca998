"""How close `baton simulate` comes to real clusters: the same trace, predicted and measured.

The 51M Llama (context 4096) is profiled once with `baton profile` (one torch thread, as each node runs here);
then for each topology (1P1D, 2P1D, 1P2D, two colocated nodes) a `baton up` cluster (one thread per node,
pinned to core i % 2) is sent a seeded Poisson trace open-loop, at the trace's times, and the simulator predicts
the same trace on the same topology from the profile. What the offline profile cannot see (the router's work
and RPCs before a prompt is computed, a node streaming each step's tokens) is calibrated once, from five idle
requests on the 1P1D cluster, and used for every topology. It prints measured against predicted p50 TTFT, p50
TPOT and goodput, and the error of each (predicted / measured - 1), from the profile alone and calibrated.

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
from baton.cluster.planner import Slo
from baton.cluster.simulator import Request, SimConfig, simulate, summarize
from baton.engine.profile import Profile
from baton.router.client import AsyncBatonClient

TOPOLOGIES = {"1P1D": (1, 1, 0), "2P1D": (2, 1, 0), "1P2D": (1, 2, 0), "2 colocated": (0, 0, 2)}
VOCAB = 32000


def make_trace(n: int, rate: float, seed: int) -> list[Request]:
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(Request(t, rng.randint(32, 512), rng.randint(16, 96)))
    return out


async def calibrate(address: str, profile: Profile, probes: int = 5) -> tuple[float, float]:
    """What the offline profile misses, from idle single requests on a live 1P1D cluster: (dispatch_s, the
    TTFT beyond the prompt's step; step_overhead_s, the TPOT beyond the decode step), medians, never below 0."""
    rng = random.Random(1)
    ttfts, tpots = [], []
    async with AsyncBatonClient(address, timeout=600) as client:
        await client.complete([5, 6, 7], max_tokens=2)
        for i in range(probes):
            prompt = [rng.randrange(3, VOCAB) for _ in range(256)]
            rec = await send(client, Sent(i, "probe", prompt, 256, 33), time.perf_counter(), 0.0, False, 600)
            ttfts.append(rec.ttft_ms / 1e3 - profile.prefill_s(256))
            tpots.append(rec.tpot_ms / 1e3 - profile.decode_step_s(1, 256 + 16))
    return max(0.0, sorted(ttfts)[probes // 2]), max(0.0, sorted(tpots)[probes // 2])


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
    ap.add_argument("--tight-slo", default="ttft=100,tpot=8", help="ms, for a second goodput that some miss")
    ap.add_argument("--topologies", default=",".join(TOPOLOGIES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    slo, tight = Slo.parse(args.slo), Slo.parse(args.tight_slo)
    model = cached_model()
    trace = make_trace(args.requests, args.rate, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        profile = profile_model(model, Path(tmp) / "profile.yaml")
    rows, overheads = {}, (0.0, 0.0)
    for name in args.topologies.split(","):
        p, d, c = TOPOLOGIES[name]
        spec = ClusterSpec(model=str(model), prefill=p, decode=d, colocated=c, threads=1, pin=True,
                           node_args=["--max-num-seqs", "64"])

        async def body(cluster, calibrating: bool = name == "1P1D"):
            calibration = await calibrate(cluster.address, profile) if calibrating else None
            return calibration, await replay(cluster.address, trace, args.seed)

        calibration, records = run_cluster(spec, body)
        if calibration is not None:  # calibrated on 1P1D once, used for every topology
            overheads = calibration
            print(f"calibration on idle 1P1D: dispatch {overheads[0] * 1e3:.1f} ms, step overhead "
                  f"{overheads[1] * 1e3:.2f} ms", flush=True)
        real = measured_summary(records, trace, slo.ttft, slo.tpot)
        real["goodput_tight"] = measured_summary(records, trace, tight.ttft, tight.tpot)["goodput"]
        rows[name] = {"measured": real}
        for kind, (dispatch, step) in (("profile only", (0.0, 0.0)), ("calibrated", overheads)):
            config = SimConfig(prefill=p, decode=d, colocated=c, bandwidth=args.bandwidth, dispatch_s=dispatch,
                               step_overhead_s=step)
            outcomes = simulate(profile, config, trace)
            sim = summarize(outcomes, slo.ttft, slo.tpot)
            predicted = {"ttft_p50": sim.ttft_p50, "tpot_p50": sim.tpot_p50, "goodput": sim.goodput,
                         "goodput_tight": summarize(outcomes, tight.ttft, tight.tpot).goodput}
            rows[name][kind] = {"predicted": predicted, "error": {k: predicted[k] / real[k] - 1 if real[k] else math.nan
                                                                  for k in predicted}}
        print(f"{name}: measured {real}, predicted {rows[name]}", flush=True)
    print(f"machine: {machine('one torch thread per node, pinned to core i % 2')}")
    print(f"trace: {args.requests} requests, Poisson {args.rate}/s, prompts 32-512, outputs 16-96 tokens; "
          f"SLO {args.slo} ms, tight {args.tight_slo} ms")
    print(f"{'topology':12} {'TTFT p50 ms (meas/pred, err)':>32} {'TPOT p50 ms (meas/pred, err)':>32} "
          f"{'goodput req/s (meas/pred, err)':>34} {'tight-SLO goodput':>26}")
    for kind in ("profile only", "calibrated"):
        print(f"-- predicted from the {kind}" + (f" (dispatch {overheads[0] * 1e3:.1f} ms, step overhead "
                                                  f"{overheads[1] * 1e3:.2f} ms)" if kind == "calibrated" else ""))
        for name, row in rows.items():
            m, p, e = row["measured"], row[kind]["predicted"], row[kind]["error"]
            print(f"{name:12} {m['ttft_p50'] * 1e3:11.1f} /{p['ttft_p50'] * 1e3:7.1f}, {e['ttft_p50']:+6.0%}"
                  f"{m['tpot_p50'] * 1e3:14.1f} /{p['tpot_p50'] * 1e3:7.1f}, {e['tpot_p50']:+6.0%}"
                  f"{m['goodput']:15.2f} /{p['goodput']:6.2f}, {e['goodput']:+6.0%}"
                  f"{m['goodput_tight']:13.2f} /{p['goodput_tight']:6.2f}, {e['goodput_tight']:+6.0%}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine("one torch thread per node, pinned"), "commit":
                                         git_commit(), "args": vars(args) | {"json": str(args.json)},
                                         "profile": profile.to_dict(), "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
