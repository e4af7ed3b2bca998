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
message its clients got. Then the baseline, in the same run on the same core against the same stand-in: a
bare relay of the same shape (one `Streams` call to the node, one grpc.aio handler per client stream yielding
each message it gets, nothing else: no admission, resume bookkeeping, metrics or layers), the floor of this
design in grpc.aio; the ratio is the router's cost over it.

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
from baton.engine.checkpoint import resolve_model_path, served_name
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
                # Shielded: the tick is every stream's, and a call cancelled while awaiting it (its router went
                # away) would cancel it for all, stopping the clock.
                await asyncio.shield(self.clock.tick)
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


def _node(etcd: str, cluster: str, port: int, step: float, model: str, folder: str, ready, seqs: int = 0) -> None:
    """The stand-in node's process: registered as a colocated node of `model` (`seqs`: the batch size it says it
    has, 0 for none: the router's queue then puts no bound on it)."""
    from baton.common.membership import NodeInfo, NodeRegistration

    async def main() -> None:
        clock = _Clock(step)
        ticking = asyncio.ensure_future(clock.run())
        server = grpc.aio.server()
        node_pb2_grpc.add_DecodeNodeServicer_to_server(_StandIn(clock), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        info = NodeInfo(node_id="stand-in", role="colocated", model=model, address=f"127.0.0.1:{port}",
                        capacity=1 << 20, free_blocks=1 << 20, model_path=folder, max_num_seqs=seqs)
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


def _bare(node_address: str, port: int, ready) -> None:
    """The baseline: relays each baton.v1 Generate (token ids in, as `_drive` sends them) from one `Streams`
    call to the node, as the router does, and nothing more."""

    async def main() -> None:
        channel = grpc.aio.insecure_channel(node_address)
        call = node_pb2_grpc.DecodeNodeStub(channel).Streams()
        queues: dict[str, asyncio.Queue] = {}
        outbox, wake = [node_pb2.StreamsRequest()], asyncio.Event()

        async def write() -> None:
            while True:
                await wake.wait()
                wake.clear()
                request, outbox[0] = outbox[0], node_pb2.StreamsRequest()
                await call.write(request)

        async def read() -> None:
            batches = 0
            while (batch := await call.read()) is not grpc.aio.EOF:
                batches += 1
                outbox[0].acked = batches
                wake.set()
                for response in batch.responses:
                    if (queue := queues.get(response.request_id)) is not None:
                        queue.put_nowait(response)

        async def generate(request: pb.GenerateRequest, context):
            rid = uuid.uuid4().hex
            queue = queues[rid] = asyncio.Queue()
            outbox[0].generate.add(request_id=rid, prompt_token_ids=request.token_ids.ids, sampling=request.sampling)
            wake.set()
            try:
                while True:
                    response = await queue.get()
                    yield response
                    if response.HasField("finish"):
                        return
            finally:
                del queues[rid]

        tasks = [asyncio.ensure_future(write()), asyncio.ensure_future(read())]
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("baton.v1.Baton", {
            "Generate": grpc.unary_stream_rpc_method_handler(
                generate, request_deserializer=pb.GenerateRequest.FromString,
                response_serializer=pb.GenerateResponse.SerializeToString)}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        try:
            await server.wait_for_termination()
        finally:
            for task in tasks:
                task.cancel()

    uvloop.run(main())


def _relay_run(pid: int, core: int, address: str, streams: int, max_tokens: int) -> dict:
    """One measured pass through the relay process `pid` (pinned alone to `core`), after a warm-up."""
    pin_process(pid, core)
    uvloop.run(_drive(address, 8, 20))  # warm the channels and the code paths
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    got = uvloop.run(_drive(address, streams, max_tokens))
    cpu, wall = cpu_seconds(pid) - cpu0, time.perf_counter() - t0
    return {"relayed_tok_s": got["tokens"] / wall, "tokens": got["tokens"], "messages": got["messages"],
            "tokens_per_message": got["tokens"] / got["messages"], "cpu_s": cpu, "wall_s": wall,
            "us_per_token": cpu / got["tokens"] * 1e6, "core_busy": cpu / wall}


def measure(etcd: str, streams: int, step_ms: float, max_tokens: int, folder: Path) -> dict:
    ctx = mp.get_context("spawn")
    cluster, model = f"ceiling-{uuid.uuid4().hex[:8]}", served_name(folder)
    node_port, router_port = free_port(), free_port()
    ready, bare_ready = ctx.Event(), ctx.Event()
    cores = sorted(os.sched_getaffinity(0))
    bare = None
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
        others = set(cores[:-1]) or set(cores)
        for pid in (node.pid, os.getpid()):
            for tid in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(tid), others)
        routed = _relay_run(router.pid, cores[-1], address, streams, max_tokens)
        router.terminate()
        bare_port = free_port()
        bare = ctx.Process(target=_bare, args=(f"127.0.0.1:{node_port}", bare_port, bare_ready), daemon=True)
        bare.start()
        if not bare_ready.wait(60):
            raise RuntimeError("the bare relay did not start")
        floor = _relay_run(bare.pid, cores[-1], f"127.0.0.1:{bare_port}", streams, max_tokens)
        row = {"streams": streams, "step_ms": step_ms, "offered_tok_s": streams * 1e3 / step_ms}
        row.update({("router_" if k in ("cpu_s", "us_per_token", "core_busy") else "") + k: v
                    for k, v in routed.items()})
        row.update({f"bare_{k}": v for k, v in floor.items()})
        row["router_over_bare"] = routed["us_per_token"] / floor["us_per_token"]
        return row
    finally:
        if bare is not None:
            bare.kill()
            bare.join(10)
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
          f"{'tokens/message':>15} | {'bare µs/token':>14} {'tokens/message':>15} {'router/bare':>12}")
    for r in rows:
        print(f"{r['step_ms']:>7g} {r['offered_tok_s']:>14.0f} {r['relayed_tok_s']:>14.0f} "
              f"{r['router_us_per_token']:>16.1f} {r['router_core_busy'] * 100:>9.0f}% "
              f"{r['tokens_per_message']:>15.2f} | {r['bare_us_per_token']:>14.1f} {r['bare_tokens_per_message']:>15.2f} {r['router_over_bare']:>11.2f}x")
    if args.json:
        write_rows(args.json, args, rows)


if __name__ == "__main__":
    main()
