"""The router's ceiling: what one router core relays when its nodes produce tokens faster than it can pass
them on, and how its CPU per token falls as it falls behind (several tokens per message, both hops).

router_overhead.py cannot show this on a 2-core VM: its real engine is the bottleneck (~5-7k tokens/s), so
the router never falls behind and every message carries one token. Here the node is a stand-in that costs
almost nothing: a `DecodeNode.Streams` server that batches as a node does (one batch per step, the node's window, waiting
tokens merged) whose streams each produce one token per "step" of a clock, `--step-ms` apart, with no engine
behind them.
It registers in etcd as a colocated node of the bundled stories260K, so the router in front of it is the
real one (`baton router`, its own process, pinned alone to the last core), serving raw grpc.aio clients
(this process, on the other core with the stand-in node).

At each step interval (the offered load is streams x 1000 / step-ms tokens/s), the same streams: tokens/s
relayed, the router's CPU per relayed token (every thread, /proc), how busy its core was, and the tokens per
message its clients got.

    python bench/router_ceiling.py [--streams 256] [--steps-ms 40,10,2] [--max-tokens 400] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import uvloop

from baton.bench.engine_throughput import machine
from baton.bench.relay_floor import free_port, write_rows
from baton.bench.router_overhead import cpu_seconds, pin_process
from baton.cluster.etcd_server import EtcdServer
from baton.decode.streams import WINDOW
from baton.engine.loader import resolve_model_path, served_name
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc, node_pb2, node_pb2_grpc


class _Clock:
    """One tick every `step` seconds, awaited by every stream (an engine step, without the engine)."""

    def __init__(self, step: float) -> None:
        self.step = step
        self.tick = asyncio.get_running_loop().create_future()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.step)
            tick, self.tick = self.tick, asyncio.get_running_loop().create_future()
            tick.set_result(None)


class _StandIn(node_pb2_grpc.DecodeNodeServicer):
    """`Streams` as the node serves it (one batch per step with every stream's new tokens, at most `WINDOW`
    batches ahead of the router's acknowledgement, a stream's waiting tokens merged into one chunk), at a cost
    of a few list appends per token, so that the other core is not what limits the router."""

    def __init__(self, clock: _Clock) -> None:
        self.clock = clock

    async def Streams(self, request_iterator, context):
        left: dict[str, int] = {}  # open stream -> tokens still to produce
        index: dict[str, int] = {}
        waiting: dict[str, pb.GenerateResponse] = {}  # stream -> its tokens not sent yet, as one chunk
        done: list[str] = []
        sent, acked = 0, 0

        async def read() -> None:
            nonlocal acked
            async for request in request_iterator:
                for r in request.generate:
                    left[r.request_id], index[r.request_id] = r.sampling.max_tokens, 0
                for rid in request.cancel:
                    left.pop(rid, None)
                    waiting.pop(rid, None)
                acked = max(acked, request.acked)

        reader = asyncio.ensure_future(read())
        try:
            while not reader.done():
                await self.clock.tick
                for rid in list(left):
                    response = waiting.get(rid)
                    if response is None:
                        response = waiting[rid] = pb.GenerateResponse(
                            request_id=rid, chunk=pb.TokenChunk(index=index[rid]))
                    response.chunk.token_ids.append(100 + index[rid] % 200)
                    response.chunk.text += "x"
                    index[rid] += 1
                    left[rid] -= 1
                    if not left[rid]:
                        del left[rid], index[rid]
                        done.append(rid)
                if waiting and sent - acked < WINDOW:
                    batch = node_pb2.StreamsBatch(responses=list(waiting.values()))
                    for rid in done:
                        batch.responses.add(request_id=rid, finish=pb.Finish(reason=pb.FINISH_REASON_LENGTH))
                        batch.ends.add(request_id=rid)
                    waiting, done = {}, []
                    sent += 1
                    yield batch
        finally:
            reader.cancel()


def _node(etcd: str, cluster: str, port: int, step: float, model: str, folder: str, ready) -> None:
    from baton.cluster.membership import NodeInfo, NodeRegistration

    async def main() -> None:
        clock = _Clock(step)
        ticking = asyncio.ensure_future(clock.run())
        server = grpc.aio.server()
        node_pb2_grpc.add_DecodeNodeServicer_to_server(_StandIn(clock), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        info = NodeInfo(node_id="stand-in", role="colocated", model=model, address=f"127.0.0.1:{port}",
                        capacity=1 << 20, free_blocks=1 << 20, model_path=folder)
        registration = await NodeRegistration.register(etcd, cluster, info)
        ready.set()
        try:
            await server.wait_for_termination()
        finally:
            ticking.cancel()
            await registration.close()

    uvloop.run(main())


async def _drive(address: str, streams: int, max_tokens: int) -> dict:
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_concurrent_streams", 1 << 20)]) as channel:
        stub = baton_pb2_grpc.BatonStub(channel)
        sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

        async def one() -> tuple[int, int]:
            tokens = messages = 0
            async for response in stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7, 8]),
                                                                   sampling=sampling), timeout=600):
                if n := len(response.chunk.token_ids):
                    tokens, messages = tokens + n, messages + 1
            return tokens, messages

        got = await asyncio.gather(*(one() for _ in range(streams)))
    tokens, messages = sum(t for t, _ in got), sum(m for _, m in got)
    assert tokens == streams * max_tokens, (tokens, streams * max_tokens)
    return {"tokens": tokens, "messages": messages}


async def _until_served(address: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = baton_pb2_grpc.BatonStub(channel)
        while time.monotonic() < deadline:
            try:
                if (await stub.ListModels(pb.ListModelsRequest(), timeout=2)).models:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("the router never served the stand-in node's model")


def measure(etcd: str, streams: int, step_ms: float, max_tokens: int, folder: Path) -> dict:
    ctx = mp.get_context("spawn")
    cluster, model = f"ceiling-{uuid.uuid4().hex[:8]}", served_name(folder)
    node_port, router_port = free_port(), free_port()
    ready = ctx.Event()
    node = ctx.Process(target=_node, args=(etcd, cluster, node_port, step_ms / 1e3, model, str(folder), ready),
                       daemon=True)
    node.start()
    router = subprocess.Popen([sys.executable, "-m", "baton.cluster.cli", "router", "--etcd", etcd, "--cluster",
                               cluster, "--host", "127.0.0.1", "--port", str(router_port), "--model", str(folder)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not ready.wait(60):
            raise RuntimeError("the stand-in node did not start")
        address = f"127.0.0.1:{router_port}"
        uvloop.run(_until_served(address))
        cores = sorted(os.sched_getaffinity(0))
        pin_process(router.pid, cores[-1])
        others = set(cores[:-1]) or set(cores)
        for pid in (node.pid, os.getpid()):
            for tid in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(tid), others)
        uvloop.run(_drive(address, 8, 20))  # warm the channels and the code paths
        cpu0, t0 = cpu_seconds(router.pid), time.perf_counter()
        got = uvloop.run(_drive(address, streams, max_tokens))
        cpu, wall = cpu_seconds(router.pid) - cpu0, time.perf_counter() - t0
        return {"streams": streams, "step_ms": step_ms, "offered_tok_s": streams * 1e3 / step_ms,
                "relayed_tok_s": got["tokens"] / wall, "tokens": got["tokens"], "messages": got["messages"],
                "tokens_per_message": got["tokens"] / got["messages"], "router_cpu_s": cpu, "wall_s": wall,
                "router_us_per_token": cpu / got["tokens"] * 1e6, "router_core_busy": cpu / wall}
    finally:
        router.terminate()
        try:
            router.wait(15)
        except subprocess.TimeoutExpired:
            router.kill()
        node.kill()
        node.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--steps-ms", default="40,10,2", help="comma-separated step intervals of the stand-in")
    parser.add_argument("--max-tokens", type=int, default=400)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    folder = resolve_model_path("")
    with EtcdServer() as etcd:
        rows = [measure(etcd.url, args.streams, float(s), args.max_tokens, folder) for s in args.steps_ms.split(",")]
    print(f"machine: {machine()}")
    print(f"the router alone on one core; the stand-in node and the clients on the other; {args.streams} streams "
          f"of {args.max_tokens} tokens\n")
    print(f"{'step ms':>7} {'offered tok/s':>14} {'relayed tok/s':>14} {'router µs/token':>16} {'core busy':>10} "
          f"{'tokens/message':>15}")
    for r in rows:
        print(f"{r['step_ms']:>7g} {r['offered_tok_s']:>14.0f} {r['relayed_tok_s']:>14.0f} "
              f"{r['router_us_per_token']:>16.1f} {r['router_core_busy'] * 100:>9.0f}% {r['tokens_per_message']:>15.2f}")
    if args.json:
        write_rows(args.json, args, rows)


if __name__ == "__main__":
    main()
