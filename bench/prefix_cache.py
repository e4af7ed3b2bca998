"""Prefix caching across a 2P2D cluster: multi-turn chat and a shared system prompt, with caching and KV-aware
routing, with caching and least-loaded routing, and with caching off, one after the other in one run.

chat    CONVERSATIONS conversations of TURNS turns, CONCURRENCY of them at a time, each turn resending the whole
        history (its earlier prompts and answers) and a new user message; user messages and answers drawn from
        log-normal lengths near ShareGPT's (user ~60 tokens, answers ~120, capped at 256)
system  one shared system prompt of SYSTEM tokens and a short question (16-64 tokens), REQUESTS requests,
        CONCURRENCY at a time, after one untimed request with the system prompt (it is in use before)

`--shape 4c` (or `8c`) runs the same on four (eight) colocated nodes instead (the decode hit rate is then the
colocated nodes').

For each it prints TTFT p50/p99 as the client sees it, goodput (requests/s whose TTFT met the SLO, stated with
the machine), throughput, KV bytes moved per request (the decode nodes' received bytes; and those the prefill
nodes read back from them, the pull path, which `kv-no-pull` turns off), the nodes' prefix-cache
hit rates (prefill and decode nodes: prompt tokens found cached over those looked up), and the share of
prompts the decode node computed itself (conditional disaggregation); then each configuration's ratios to
caching off, and the hit rates of kv routing to least-loaded's.

    .venv/bin/python bench/prefix_cache.py [--workload chat|system|both] [--shape 2p2d|4c] [--configs kv,...]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import signal
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import grpc

from baton.bench.engine_throughput import machine
from baton.bench.faults import run_cluster, write_json
from baton.bench.memory_soak import cached_model
from baton.cluster.launch import ClusterSpec
from baton.common.membership import MembershipWatcher
from baton.router.client import AsyncBatonClient, Delta
from baton.v1 import node_pb2, node_pb2_grpc

CONVERSATIONS, TURNS = 16, 6
SYSTEM, REQUESTS = 1536, 64
CONCURRENCY = 8
SLO_TTFT_S = 1.0  # goodput's TTFT objective, for this benchmark's 51M Llama on a 2-core VM
SHAPES = {"2p2d": dict(prefill=2, decode=2), "4c": dict(prefill=0, decode=0, colocated=4),
          "8c": dict(prefill=0, decode=0, colocated=8)}
CONFIGS = {  # name -> (node options, router options)
    "kv": ([], ["--routing", "kv"]),
    "kv-no-pull": (["--kv-pull-min-tokens", "0"], ["--routing", "kv"]),
    "least-loaded": ([], ["--routing", "least-loaded"]),
    "off": (["--no-enable-prefix-caching"], ["--routing", "least-loaded"]),
}


def lognormal(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return max(low, min(high, round(rng.lognormvariate(math.log(median), sigma))))


def words(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10, 31000) for _ in range(n)]


class Recorder:
    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.tokens = 0

    async def ask(self, client: AsyncBatonClient, prompt: list[int], max_tokens: int) -> list[int]:
        start, first, out = time.monotonic(), None, []
        async for item in client.generate(prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True):
            if isinstance(item, Delta):
                first = first or time.monotonic()
                out += item.token_ids
        self.ttft.append(first - start)
        self.tokens += len(out)
        return out


async def chat(address: str, rng: random.Random, rec: Recorder) -> int:
    # Drawn up front: every configuration sees the same conversations (and greedy answers are exact).
    plans = [[(words(rng, lognormal(rng, 60, 0.8, 8, 400)), lognormal(rng, 120, 0.6, 16, 256))
              for _ in range(TURNS)] for _ in range(CONVERSATIONS)]
    queue: asyncio.Queue = asyncio.Queue()
    for plan in plans:
        queue.put_nowait(plan)

    async def client_loop() -> None:
        async with AsyncBatonClient(address, timeout=600) as client:
            while not queue.empty():
                history: list[int] = []
                for user, answer in queue.get_nowait():
                    history += user
                    history += await rec.ask(client, history, answer)

    await asyncio.gather(*(client_loop() for _ in range(CONCURRENCY)))
    return CONVERSATIONS * TURNS


async def system(address: str, rng: random.Random, rec: Recorder) -> int:
    prompt = words(rng, SYSTEM)  # the first draw: `warm_system` sends the same
    questions = [words(rng, rng.randint(16, 64)) for _ in range(REQUESTS)]

    async def client_loop(mine: list[list[int]]) -> None:
        async with AsyncBatonClient(address, timeout=600) as client:
            for question in mine:
                await rec.ask(client, prompt + question, 32)

    await asyncio.gather(*(client_loop(questions[i::CONCURRENCY]) for i in range(CONCURRENCY)))
    return REQUESTS


async def warm_system(address: str, seed: int) -> None:
    """One request with the system prompt, before the timed run: a system prompt is in use before any measured
    minute (without it, the first CONCURRENCY requests, all at once, each compute and move it whole)."""
    prompt = words(random.Random(seed), SYSTEM)
    async with AsyncBatonClient(address, timeout=600) as client:
        await client.complete(prompt + words(random.Random(-1), 16), max_tokens=2, temperature=0)


async def node_stats(cluster) -> list[node_pb2.NodeStats]:
    watcher = await MembershipWatcher.start(cluster.etcd_url, cluster.cluster)
    try:
        out = []
        for node in watcher.nodes():
            async with grpc.aio.insecure_channel(node.address) as channel:
                stub = (node_pb2_grpc.PrefillNodeStub if node.role == "prefill" else node_pb2_grpc.DecodeNodeStub)(
                    channel)
                out.append(await stub.GetStats(node_pb2.GetStatsRequest(), timeout=10))
        return out
    finally:
        await watcher.close()


def summary(stats: list[node_pb2.NodeStats], rec: Recorder, requests: int, seconds: float) -> dict:
    def rate(role: str) -> float:
        nodes = [s for s in stats if s.role == role]
        queries = sum(s.prefix_cache.queries for s in nodes)
        return sum(s.prefix_cache.hits for s in nodes) / queries if queries else 0.0

    ttft = sorted(rec.ttft)
    prefilled = sum(s.requests_served for s in stats if s.role == "prefill")
    disaggregated = any(s.role == "prefill" for s in stats)
    return dict(
        requests=requests, seconds=seconds, ttft_p50_ms=statistics.median(ttft) * 1000,
        ttft_p99_ms=ttft[min(len(ttft) - 1, math.ceil(0.99 * len(ttft)) - 1)] * 1000,
        goodput_rps=sum(t <= SLO_TTFT_S for t in ttft) / seconds, throughput_tok_s=rec.tokens / seconds,
        kv_bytes_per_request=sum(s.kv_bytes_received for s in stats if s.role == "decode") / requests,
        pulled_bytes_per_request=sum(s.kv_bytes_pulled for s in stats if s.role == "decode") / requests,
        prefill_hit_rate=rate("prefill"), decode_hit_rate=rate("decode" if disaggregated else "colocated"),
        local_share=1 - prefilled / requests if disaggregated else 0.0)


async def one(cluster, workload: str, seed: int) -> dict:
    rng, rec = random.Random(seed), Recorder()
    async with AsyncBatonClient(cluster.address, timeout=600) as client:  # warm: every node has run a request
        for _ in range(4):
            await client.complete(words(rng, 32), max_tokens=2, temperature=0)
    if workload == "system":
        await warm_system(cluster.address, seed + 1)
    before = await node_stats(cluster)
    start = time.monotonic()
    requests = await (chat if workload == "chat" else system)(cluster.address, random.Random(seed + 1), rec)
    seconds = time.monotonic() - start
    after = await node_stats(cluster)
    # What this workload did: the counters' growth over it.
    deltas = []
    for b, a in zip(sorted(before, key=lambda s: s.node_id), sorted(after, key=lambda s: s.node_id)):
        d = node_pb2.NodeStats(node_id=a.node_id, role=a.role, requests_served=a.requests_served - b.requests_served,
                               kv_bytes_received=a.kv_bytes_received - b.kv_bytes_received,
                               kv_bytes_pulled=a.kv_bytes_pulled - b.kv_bytes_pulled)
        d.prefix_cache.queries = a.prefix_cache.queries - b.prefix_cache.queries
        d.prefix_cache.hits = a.prefix_cache.hits - b.prefix_cache.hits
        deltas.append(d)
    return summary(deltas, rec, requests, seconds)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=["chat", "system", "both"], default="both")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--shape", choices=list(SHAPES), default="2p2d",
                    help="2p2d: two prefill and two decode nodes; 4c, 8c: four or eight colocated nodes (where a "
                         "prefix lives matters more: a node picked at random holds it one time in four, or eight)")
    ap.add_argument("--num-kv-blocks", type=int, default=0,
                    help="each node's KV pool in blocks (default: the engine's); small pools put the cache under "
                         "eviction pressure, where routing decides what stays")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    model = cached_model()
    workloads = ["chat", "system"] if args.workload == "both" else [args.workload]
    print(f"machine: {machine('2 cores shared out between the nodes')}\nmodel: {model} (51M Llama, context 4096), "
          f"{args.shape}; goodput: requests with TTFT <= {SLO_TTFT_S:g} s", flush=True)
    results: dict[str, dict[str, dict]] = {w: {} for w in workloads}
    for name in args.configs.split(","):
        node_args, router_args = CONFIGS[name]
        if args.num_kv_blocks:
            node_args = [*node_args, "--num-kv-blocks", str(args.num_kv_blocks)]
        spec = ClusterSpec(model=str(model), node_args=node_args, router_args=router_args, **SHAPES[args.shape])

        async def body(cluster):
            return {w: await one(cluster, w, args.seed) for w in workloads}

        for workload, row in run_cluster(spec, body).items():
            results[workload][name] = row
            print(f"  {workload:6s} {name:12s} TTFT p50 {row['ttft_p50_ms']:8.1f} ms p99 {row['ttft_p99_ms']:8.1f} ms"
                  f"  goodput {row['goodput_rps']:5.2f} req/s  {row['throughput_tok_s']:6.1f} tok/s  KV moved "
                  f"{row['kv_bytes_per_request'] / 1e6:6.2f} MB/req (pulled back "
                  f"{row['pulled_bytes_per_request'] / 1e6:5.2f})  "
                  f"hits prefill {row['prefill_hit_rate']:.0%} "
                  f"decode {row['decode_hit_rate']:.0%}  local {row['local_share']:.0%}", flush=True)
    for workload, rows in results.items():
        off = rows.get("off")
        for name, row in rows.items():
            if off is None or name == "off":
                continue
            row["vs_off"] = dict(ttft_p50=row["ttft_p50_ms"] / off["ttft_p50_ms"],
                                 kv_bytes=row["kv_bytes_per_request"] / max(off["kv_bytes_per_request"], 1),
                                 goodput=row["goodput_rps"] / max(off["goodput_rps"], 1e-9))
            print(f"  {workload:6s} {name:12s} vs off: TTFT p50 {row['vs_off']['ttft_p50']:.2f}x, KV bytes "
                  f"{row['vs_off']['kv_bytes']:.2f}x, goodput {row['vs_off']['goodput']:.2f}x", flush=True)
        if "kv" in rows and "least-loaded" in rows:
            kv, ll = rows["kv"], rows["least-loaded"]
            print(f"  {workload:6s} hit rate kv / least-loaded: prefill "
                  f"{kv['prefill_hit_rate'] / max(ll['prefill_hit_rate'], 1e-9):.2f}x, decode "
                  f"{kv['decode_hit_rate'] / max(ll['decode_hit_rate'], 1e-9):.2f}x", flush=True)
    write_json(args.json, args, dict(date=datetime.now().isoformat(timespec="seconds"), model=str(model),
                                     slo_ttft_s=SLO_TTFT_S, results=results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
