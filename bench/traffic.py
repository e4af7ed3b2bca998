"""Traffic management's costs and effects, each against a baseline measured in the same run.

The node is router_ceiling.py's stand-in (a `DecodeNode.Streams` server that yields one token per stream per
"step" of a clock, with no engine), registered as a colocated node of the bundled stories260K, so what is
measured is the router (`baton router`, its own process) and nothing else. Clients are raw grpc.aio stubs in
this process.

  admission   sequential 1-token requests: client latency p50/p99, with API keys + every limit of a key
              (quota, tpm, rpm, concurrency, etcd budget slices) + 4 content rules on, against all of it off
  relay       64 streams x 200 tokens: the router's CPU per relayed token (every thread, /proc), on against off
  hold-back   time to first token with an output rule whose longest match is 64 characters (responses held
              back until 64 characters follow them; the stand-in's tokens are 1 character), against no rule
  flood       one key floods (--flood streams at once, 10x its share of the places), another sends one request
              at a time: the polite key's TTFT and tokens/s with fair queuing, against FIFO, against alone
  stalled     --stalled clients open a stream and never read it: the router's RSS, against no stalled client

    python bench/traffic.py [--admissions 300] [--flood 40] [--stalled 200] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import uvloop

from baton.bench.engine_throughput import machine
from baton.bench.relay_floor import free_port, write_rows
from baton.bench.router_ceiling import _node
from baton.bench.router_overhead import cpu_seconds
from baton.cluster.etcd_server import EtcdServer
from baton.common.keys import KeyRecord, digest, keys_prefix, new_key, write_secret
from baton.common.membership import close_quietly, etcd_client
from baton.common.rules import RuleRecord, rules_prefix
from baton.engine.checkpoint import resolve_model_path, served_name
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc


class Setup:
    """An etcd cluster name with a stand-in node, and routers started on it (`router(*options)`)."""

    def __init__(self, etcd: str, folder: Path, step_ms: float, seqs: int = 0) -> None:
        self.etcd, self.folder = etcd, folder
        self.cluster = f"traffic-{uuid.uuid4().hex[:8]}"
        self.model = served_name(folder)
        self.secret_dir = tempfile.mkdtemp(prefix="baton-bench-")
        self.secret_file = os.path.join(self.secret_dir, "secret")
        self.secret = write_secret(self.secret_file)
        ctx = mp.get_context("spawn")
        ready = ctx.Event()
        self.node = ctx.Process(target=_node, args=(etcd, self.cluster, free_port(), step_ms / 1e3, self.model,
                                                    str(folder), ready, seqs), daemon=True)
        self.node.start()
        if not ready.wait(60):
            raise RuntimeError("the stand-in node did not start")
        self.routers: list[subprocess.Popen] = []

    def router(self, *options: str) -> tuple[subprocess.Popen, str]:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "baton.cluster.cli", "router", "--etcd", self.etcd,
                                 "--cluster", self.cluster, "--host", "127.0.0.1", "--port", str(port), "--model",
                                 str(self.folder), *options], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.routers.append(proc)
        address = f"127.0.0.1:{port}"
        uvloop.run(_until_served(address))
        return proc, address

    def auth(self) -> tuple[str, ...]:
        return ("--auth", "--cluster-secret-file", self.secret_file)

    def key(self, name: str, **limits) -> str:
        key, key_id = new_key()
        record = KeyRecord(key_id=key_id, name=name, digest=digest(self.secret, key), created=time.time(), **limits)
        uvloop.run(self._put(f"{keys_prefix(self.cluster)}{key_id}", record.to_json()))
        return key

    def rule(self, record: RuleRecord) -> None:
        uvloop.run(self._put(f"{rules_prefix(self.cluster)}{record.name}", record.to_json()))

    async def _put(self, key: str, value: bytes) -> None:
        client = etcd_client(self.etcd, 5.0)
        try:
            await client.put(key.encode(), value)
        finally:
            await close_quietly(client)

    def close(self) -> None:
        for proc in self.routers:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.node.kill()
        self.node.join(10)
        import shutil

        shutil.rmtree(self.secret_dir, ignore_errors=True)


async def _until_served(address: str, timeout: float = 60.0) -> None:
    """Once the router says SERVING (it has a live node), with or without keys."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2, wait_for_ready=True)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"the router at {address} never served")


def _metadata(key: str | None):
    return (("authorization", f"Bearer {key}"),) if key else None


async def _stream(stub, key: str | None, max_tokens: int, text: str = "Once upon a time") -> tuple[float, int]:
    """One request: (seconds to its first token, tokens)."""
    start, first, tokens = time.perf_counter(), None, 0
    sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    async for response in stub.Generate(pb.GenerateRequest(text=text, sampling=sampling), timeout=600,
                                        metadata=_metadata(key)):
        if n := len(response.chunk.token_ids):
            first = first if first is not None else time.perf_counter() - start
            tokens += n
    return first if first is not None else float("nan"), tokens


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _admissions(address: str, key: str | None, n: int) -> dict:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = baton_pb2_grpc.BatonStub(channel)
        for _ in range(20):  # warm-up
            await _stream(stub, key, 1)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            await _stream(stub, key, 1)
            times.append((time.perf_counter() - t0) * 1e3)
    return {"p50_ms": _pct(times, 0.5), "p99_ms": _pct(times, 0.99)}


async def _relay(address: str, key: str | None, streams: int, max_tokens: int) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = baton_pb2_grpc.BatonStub(channel)
        got = await asyncio.gather(*(_stream(stub, key, max_tokens) for _ in range(streams)))
    return sum(t for _, t in got)


def relay_cpu(proc: subprocess.Popen, address: str, key: str | None) -> float:
    uvloop.run(_relay(address, key, 8, 20))
    cpu0 = cpu_seconds(proc.pid)
    tokens = uvloop.run(_relay(address, key, 64, 200))
    return (cpu_seconds(proc.pid) - cpu0) / tokens * 1e6


async def _ttft(address: str, key: str | None, n: int = 20) -> float:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = baton_pb2_grpc.BatonStub(channel)
        return statistics.median([(await _stream(stub, key, 100))[0] * 1e3 for _ in range(n)])


async def _flood(address: str, flooder: str, polite: str, flood: int, rounds: int) -> dict:
    """The polite key's requests, one at a time, while `flood` streams of the flooder run (restarted as they
    end); None for `flood` = 0: the polite key alone."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = baton_pb2_grpc.BatonStub(channel)
        stop = asyncio.Event()

        async def flooding(i: int) -> None:
            n = 0
            while not stop.is_set():  # lengths 25-75: places free one by one, not in waves
                await _stream(stub, flooder, 25 + (i * 17 + n * 29) % 51)
                n += 1

        floods = [asyncio.ensure_future(flooding(i)) for i in range(flood)]
        await asyncio.sleep(0.5 if flood else 0)  # the flood fills the places and the queue
        ttfts, tokens, t0 = [], 0, time.perf_counter()
        for _ in range(rounds):
            first, n = await _stream(stub, polite, 50)
            ttfts.append(first * 1e3)
            tokens += n
        wall = time.perf_counter() - t0
        stop.set()
        await asyncio.gather(*floods, return_exceptions=True)
    return {"ttft_p50_ms": _pct(ttfts, 0.5), "ttft_p99_ms": _pct(ttfts, 0.99), "tok_s": tokens / wall}


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _stalled(address: str, n: int, proc: subprocess.Popen) -> dict:
    """`n` streams opened and never read (the client asks for them and reads nothing), the router's RSS after."""
    before = rss_mib(proc.pid)
    channel = grpc.aio.insecure_channel(address)
    stub = baton_pb2_grpc.BatonStub(channel)
    sampling = pb.SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    calls = [stub.Generate(pb.GenerateRequest(text="Once upon a time", sampling=sampling), timeout=600)
             for _ in range(n)]
    for call in calls:
        await call.initial_metadata()
    await asyncio.sleep(5.0)  # the stand-in produces 400 tokens in 4 s: every stream has all it will get
    after = rss_mib(proc.pid)
    for call in calls:
        call.cancel()
    await channel.close()
    return {"rss_before_mib": before, "rss_after_mib": after}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--admissions", type=int, default=300)
    parser.add_argument("--flood", type=int, default=40)
    parser.add_argument("--stalled", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    folder = resolve_model_path("")
    rows = []
    with EtcdServer() as etcd:
        # Admission and relay cost: the stand-in unbounded (no queue), a fast clock.
        setup = Setup(etcd.url, folder, step_ms=2.0)
        try:
            off_proc, off = setup.router()
            on_proc, on = setup.router(*setup.auth())
            key = setup.key("bench", quota_tokens=10**12, tpm=10**11, rpm=10**9, max_concurrency=10**6)
            for i, terms in enumerate((["forbidden"], ["secret plan"], ["password"])):
                setup.rule(RuleRecord(f"out-{i}", terms=terms, on=["output"]))
            setup.rule(RuleRecord("in-0", terms=["forbidden fruit"], on=["prompt"]))
            a_off = uvloop.run(_admissions(off, None, args.admissions))
            a_on = uvloop.run(_admissions(on, key, args.admissions))
            rows.append({"part": "admission", "off": a_off, "on": a_on,
                         "p50_ratio": a_on["p50_ms"] / a_off["p50_ms"], "p99_ratio": a_on["p99_ms"] / a_off["p99_ms"]})
            c_off, c_on = relay_cpu(off_proc, off, None), relay_cpu(on_proc, on, key)
            rows.append({"part": "relay", "off_us_per_token": c_off, "on_us_per_token": c_on, "ratio": c_on / c_off})
            # Hold-back: an output rule spanning 64 characters, on a router of its own, same key.
            plain = uvloop.run(_ttft(on, key))
            setup.rule(RuleRecord("span-64", regex="z{64}", on=["output"]))
            held = uvloop.run(_ttft(on, key))
            rows.append({"part": "hold-back", "ttft_ms_no_rule": plain, "ttft_ms_span_64": held,
                         "step_ms": 2.0, "added_ms": held - plain})
            s = uvloop.run(_stalled(off, args.stalled, off_proc))
            rows.append({"part": "stalled", "streams": args.stalled, **s})
        finally:
            setup.close()
        # Flood: 8 places (4 sequences x 2), a 10 ms step.
        setup = Setup(etcd.url, folder, step_ms=10.0, seqs=4)
        try:
            flooder, polite = setup.key("flooder"), setup.key("polite")
            result = {}
            for policy in ("fair", "fifo"):
                _, address = setup.router(*setup.auth(), "--queue-policy", policy)
                result[policy] = uvloop.run(_flood(address, flooder, polite, args.flood, 20))
            result["alone"] = uvloop.run(_flood(address, flooder, polite, 0, 20))
            rows.append({"part": "flood", **result, "places": 8, "flood_streams": args.flood,
                         "fair_ttft_over_alone": result["fair"]["ttft_p50_ms"] / result["alone"]["ttft_p50_ms"],
                         "fifo_ttft_over_alone": result["fifo"]["ttft_p50_ms"] / result["alone"]["ttft_p50_ms"],
                         "fair_tok_s_over_fifo": result["fair"]["tok_s"] / result["fifo"]["tok_s"]})
        finally:
            setup.close()
    print(f"machine: {machine()}")
    for row in rows:
        print(row)
    if args.json:
        write_rows(args.json, args, rows)


if __name__ == "__main__":
    main()
