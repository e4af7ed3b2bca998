"""The router's fronts against each other: the same load through baton.v1 gRPC and through the OpenAI HTTP
front, on the same cluster, in the same run.

The cluster and the placement are router_overhead.py's: one colocated node (one torch thread, pinned to the
first core), the router pinned to the second core, the client (this process, uvloop) on the router's core, the
bundled stories260K. At each concurrency level, every round drives both fronts back to back (order
alternating) with the same prompts: random 8-token prompts (token ids), `max_tokens` new tokens, greedy, EOS
ignored.

  grpc   Baton.Generate through raw grpc.aio stubs, one channel
  http   POST /v1/completions with "stream": true through aiohttp's client, one connection per stream (as
         OpenAI clients open them); the server-sent events are split on blank lines, each "data:" event
         parsed as JSON (what an OpenAI client does), and the usage event gives the token count.

Measured on the client: ITL (the gap between events or messages that carry text; a gRPC message of k tokens
counts its gap once and k-1 zeros), TTFT, tokens/s. The router's CPU per relayed token comes from its
/proc schedstat, less its idle rate (measured over a pause before the level). Added latency per token of
HTTP = its ITL p50 - gRPC's ITL p50 (target: < 1 ms). The router's CPU per token on each front is what decides
how many decode nodes one router serves (target: <= 15 µs per relayed token at 256 streams).

    python bench/fronts.py [--levels 1,16,64,256] [--max-tokens 160] [--rounds 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import time
from pathlib import Path

import aiohttp
import grpc
import uvloop

from baton.bench.engine_throughput import machine
from baton.bench.metrics import percentile
from baton.bench.router_overhead import Stream, cpu_seconds, latencies, one_stream, pin_process
from baton.cluster.launch import ClusterSpec, LocalCluster
from baton.v1 import baton_pb2_grpc

TARGET_HTTP_ADDED_P50_MS = 1.0
TARGET_ROUTER_US_PER_TOKEN = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def http_stream(session: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int) -> Stream:
    s = Stream()
    body = {"model": "stories260K", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    perf = time.perf_counter
    s.t0 = perf()
    arrivals = s.arrivals
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                s.error = f"HTTP {response.status}"
                return s
            async for line in response.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    s.tokens = event["usage"]["completion_tokens"]
                elif event["choices"] and event["choices"][0]["text"]:
                    arrivals.append((perf(), 1))
    except aiohttp.ClientError as e:
        s.error = type(e).__name__
    if not s.error and s.tokens != max_tokens:
        s.error = f"SHORT({s.tokens})"
    return s


async def run_level(front: str, client, prompts: list[list[int]], max_tokens: int, router_pid: int) -> dict:
    cpu0 = cpu_seconds(router_pid)
    t0 = time.perf_counter()
    if front == "grpc":
        streams = await asyncio.gather(*(one_stream("router", client, p, max_tokens, 300.0) for p in prompts))
    else:
        session, url = client
        streams = await asyncio.gather(*(http_stream(session, url, p, max_tokens) for p in prompts))
    wall = time.perf_counter() - t0
    itl, ttft, errors = latencies(streams)
    return dict(tokens=sum(s.tokens for s in streams), wall_s=wall, router_cpu_s=cpu_seconds(router_pid) - cpu0,
                itl_ms=itl, ttft_ms=ttft, errors=errors)


async def idle_rate(pid: int, seconds: float = 1.0) -> float:
    cpu0 = cpu_seconds(pid)
    await asyncio.sleep(seconds)
    return (cpu_seconds(pid) - cpu0) / seconds


async def bench(cluster: LocalCluster, http_url: str, args) -> dict:
    rng = random.Random(args.seed)
    router_pid = cluster.router.pid
    options = [("grpc.max_concurrent_streams", 1 << 20)]
    connector = aiohttp.TCPConnector(limit=0)
    async with grpc.aio.insecure_channel(cluster.address, options=options) as channel, \
            aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        clients = {"grpc": baton_pb2_grpc.BatonStub(channel), "http": (session, http_url)}
        for front in ("grpc", "http"):  # warm-up: connections, the engine's batch sizes, both code paths
            for n in (1, 16, max(args.levels)):
                prompts = [[rng.randrange(3, 512) for _ in range(args.prompt_tokens)] for _ in range(n)]
                await run_level(front, clients[front], prompts, 16, router_pid)
        results = {}
        for level in args.levels:
            idle = await idle_rate(router_pid)
            runs: dict[str, list[dict]] = {"grpc": [], "http": []}
            for r in range(args.rounds):
                prompts = [[rng.randrange(3, 512) for _ in range(args.prompt_tokens)] for _ in range(level)]
                for front in (("grpc", "http") if r % 2 == 0 else ("http", "grpc")):
                    res = await run_level(front, clients[front], prompts, args.max_tokens, router_pid)
                    runs[front].append(res)
                    print(f"  {level:4d} streams, round {r + 1}, {front:4}: {res['tokens'] / res['wall_s']:8.0f} tok/s"
                          f"  ITL p50 {percentile(res['itl_ms'], 50):6.2f} ms  errors {res['errors'] or 0}", flush=True)
            results[level] = {front: summarize(rs, idle) for front, rs in runs.items()}
    return results


def summarize(runs: list[dict], idle: float) -> dict:
    itl = [x for r in runs for x in r["itl_ms"]]
    ttft = [x for r in runs for x in r["ttft_ms"]]
    tokens = sum(r["tokens"] for r in runs)
    wall = sum(r["wall_s"] for r in runs)
    cpu = max(0.0, sum(r["router_cpu_s"] for r in runs) - idle * wall)
    errors: dict[str, int] = {}
    for r in runs:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return dict(tokens=tokens, wall_s=wall, tokens_per_s=tokens / wall if wall else 0.0,
                itl_p50_ms=percentile(itl, 50), itl_p99_ms=percentile(itl, 99),
                itl_mean_ms=statistics.fmean(itl) if itl else 0.0,
                ttft_p50_ms=percentile(ttft, 50), ttft_p99_ms=percentile(ttft, 99), errors=errors,
                router_cpu_us_per_token=cpu / tokens * 1e6 if tokens else float("nan"),
                router_idle_cpu_per_s=idle)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64, 256])
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write every figure here")
    args = ap.parse_args()
    started = time.perf_counter()
    http_port = free_port()
    max_seqs = max(256, max(args.levels))
    spec = ClusterSpec(prefill=0, decode=0, colocated=1, threads=1, pin=True, http_port=http_port,
                       node_args=["--max-num-seqs", str(max_seqs), "--max-num-batched-tokens", "8192"])
    cores = sorted(os.sched_getaffinity(0))
    with LocalCluster(spec) as cluster:
        router_core = cores[1] if len(cores) > 1 else cores[0]
        pin_process(cluster.router.pid, router_core)
        pin_process(os.getpid(), router_core)
        print(f"cluster up in {time.perf_counter() - started:.1f} s: node on core {cores[0]}, router and client on "
              f"core {router_core}", flush=True)
        results = uvloop.run(bench(cluster, f"http://127.0.0.1:{http_port}/v1/completions", args))
    runtime = time.perf_counter() - started
    print()
    print(f"machine: {machine()}")
    print(f"{'streams':>7} {'front':>5} {'tok/s':>8} {'ITL p50':>8} {'ITL p99':>8} {'TTFT p50':>9} {'errors':>6} "
          f"{'router µs/token':>16}")
    for level, fronts in results.items():
        for front in ("grpc", "http"):
            s = fronts[front]
            print(f"{level:7d} {front:>5} {s['tokens_per_s']:8.0f} {s['itl_p50_ms']:8.3f} {s['itl_p99_ms']:8.3f} "
                  f"{s['ttft_p50_ms']:9.2f} {sum(s['errors'].values()):6d} {s['router_cpu_us_per_token']:16.1f}")
    print()
    added = {level: f["http"]["itl_p50_ms"] - f["grpc"]["itl_p50_ms"] for level, f in results.items()}
    worst = max(added.values())
    top = max(results)
    print(f"HTTP's added ITL p50 per token over gRPC: {', '.join(f'{k}: {v:+.3f} ms' for k, v in added.items())}; "
          f"worst {worst:+.3f} ms (target < {TARGET_HTTP_ADDED_P50_MS} ms): "
          f"{'MET' if worst < TARGET_HTTP_ADDED_P50_MS else 'NOT MET'}")
    for front in ("grpc", "http"):
        us = results[top][front]["router_cpu_us_per_token"]
        print(f"router CPU per relayed token at {top} streams, {front}: {us:.1f} µs (target <= "
              f"{TARGET_ROUTER_US_PER_TOKEN} µs): {'MET' if us <= TARGET_ROUTER_US_PER_TOKEN else 'NOT MET'}")
    print(f"runtime: {runtime:.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(
            machine=machine(), config=vars(args) | {"json": str(args.json)}, added_itl_p50_ms=added,
            results={str(k): v for k, v in results.items()}, runtime_s=runtime), indent=2, default=str))


if __name__ == "__main__":
    main()
