"""Conditional disaggregation's crossover: when a decode node holds a prompt's prefix cached, is it better to
compute the short rest on the decode node itself, or on a prefill node that sends its K/V over?

One 1P1D cluster of the 51M Llama (context 4096) and two routers on it: one always sends prompts to the
prefill node (`--max-local-prefill-tokens 0`), the other lets the decode node compute whatever rest its cached
blocks leave (a limit no prompt reaches). A conversation of PREFIX tokens is cached on both nodes; then, for
each rest length S, probes of PREFIX + S fresh tokens go through one router and the other in turn, while
BACKGROUND clients keep the decode node decoding. For each S it prints the probes' TTFT through each router and
the background streams' decode rate meanwhile: computing locally saves the prefill call and the transfer, but
stalls every stream the decode node is decoding for as long as the rest takes. The default limit
(router/attempt.py DEFAULT_MAX_LOCAL_PREFILL_TOKENS) is the largest S at which local is faster for the probe
and costs the background streams less than LIMIT_SLOWDOWN of their rate.

    .venv/bin/python bench/local_prefill.py [--rests 16,64,128,256,512,1024] [--probes 6] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from baton.bench.engine_throughput import machine
from baton.bench.faults import run_cluster, write_json
from baton.bench.memory_soak import cached_model
from baton.cluster.etcd_server import free_port
from baton.cluster.launch import ClusterSpec
from baton.router.client import AsyncBatonClient, Delta

PREFIX = 1024
BACKGROUND = 4  # clients decoding all along
BACKGROUND_TOKENS = 200
LIMIT_SLOWDOWN = 0.10  # the background decode rate local prefill may cost, at most


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10, 31000) for _ in range(n)]


async def ttft(address: str, prompt: list[int]) -> float:
    async with AsyncBatonClient(address, timeout=300) as client:
        start = time.monotonic()
        async for item in client.generate(prompt, max_tokens=4, temperature=0, ignore_eos=True):
            if isinstance(item, Delta):
                return time.monotonic() - start
    raise RuntimeError("no token")


class Background:
    """Clients that keep the decode node decoding; counts the tokens they receive."""

    def __init__(self, address: str, rng: random.Random) -> None:
        self.address, self.rng = address, rng
        self.tokens = 0
        self.tasks: list[asyncio.Task] = []

    async def _client(self) -> None:
        async with AsyncBatonClient(self.address, timeout=300) as client:
            while True:
                async for item in client.generate(tokens(self.rng, 32), max_tokens=BACKGROUND_TOKENS,
                                                  temperature=0, ignore_eos=True):
                    if isinstance(item, Delta):
                        self.tokens += len(item.token_ids)

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._client()) for _ in range(BACKGROUND)]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def serving(address: str) -> None:
    """Once the router says SERVING (it sees both nodes)."""
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while (await health.Check(health_pb2.HealthCheckRequest(), timeout=60, wait_for_ready=True)).status != \
                health_pb2.HealthCheckResponse.SERVING:
            await asyncio.sleep(0.1)


def second_router(cluster, model: Path, limit: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "baton.cluster.cli", "router", "--etcd", cluster.etcd_url,
                             "--cluster", cluster.cluster, "--model", str(model), "--port", str(port),
                             "--max-local-prefill-tokens", str(limit), "--parent-pid", str(os.getpid())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"127.0.0.1:{port}"


async def measure(cluster, model: Path, rests: list[int], probes: int, seed: int) -> dict:
    rng = random.Random(seed)
    local_router, local = second_router(cluster, model, 1 << 20)
    remote = cluster.address
    try:
        await serving(local)
        prefix = tokens(rng, PREFIX)
        for address in (remote, local):  # both nodes hold the prefix (the decode node: prompt and answer)
            await ttft(address, prefix)
        background = Background(remote, rng)
        background.start()
        await asyncio.sleep(2.0)  # the background streams are decoding before the first probe
        rows = []
        for rest in rests:
            times: dict[str, list[float]] = {"remote": [], "local": []}
            rates: dict[str, list[float]] = {"remote": [], "local": []}
            for i in range(probes):
                for where in (("remote", "local") if i % 2 == 0 else ("local", "remote")):
                    before, start = background.tokens, time.monotonic()
                    times[where].append(await ttft(remote if where == "remote" else local,
                                                   prefix + tokens(rng, rest)))
                    rates[where].append((background.tokens - before) / (time.monotonic() - start))
            row = dict(rest=rest, **{f"ttft_{w}_ms": statistics.median(times[w]) * 1000 for w in times},
                       **{f"background_{w}_tok_s": statistics.median(rates[w]) for w in rates})
            row["ttft_local_over_remote"] = row["ttft_local_ms"] / row["ttft_remote_ms"]
            row["background_local_over_remote"] = row["background_local_tok_s"] / max(row["background_remote_tok_s"],
                                                                                       1e-9)
            rows.append(row)
            print(f"  rest {rest:5d}: TTFT remote {row['ttft_remote_ms']:7.1f} ms, local {row['ttft_local_ms']:7.1f} "
                  f"ms ({row['ttft_local_over_remote']:.2f}x); background decode remote "
                  f"{row['background_remote_tok_s']:6.1f} tok/s, local {row['background_local_tok_s']:6.1f} tok/s "
                  f"({row['background_local_over_remote']:.2f}x)", flush=True)
        await background.stop()
    finally:
        local_router.terminate()
        local_router.wait(15)
    good = [r["rest"] for r in rows if r["ttft_local_over_remote"] < 1
            and r["background_local_over_remote"] >= 1 - LIMIT_SLOWDOWN]
    crossover = max(good) if good else 0
    print(f"crossover: local prefill pays up to a rest of {crossover} tokens", flush=True)
    return dict(rows=rows, crossover=crossover)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rests", default="16,64,128,256,512,1024")
    ap.add_argument("--probes", type=int, default=6, help="per rest length and router")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    model = cached_model()
    rests = [int(r) for r in args.rests.split(",")]
    print(f"machine: {machine('2 cores shared out between the nodes')}\nmodel: {model} (51M Llama, context 4096); "
          f"prefix {PREFIX} tokens cached on both nodes, {BACKGROUND} background streams", flush=True)
    spec = ClusterSpec(model=str(model), prefill=1, decode=1, router_args=["--max-local-prefill-tokens", "0"])
    result = run_cluster(spec, lambda cluster: measure(cluster, model, rests, args.probes, args.seed))
    write_json(args.json, args, dict(date=datetime.now().isoformat(timespec="seconds"), model=str(model)) | result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
