"""The floor under the router's CPU per relayed token: what grpc.aio costs to pass a stream through a Python
process that does nothing else.

Three processes, nothing of Baton's serving code in them: a source (a grpc.aio server streaming
baton.v1 GenerateResponse messages, each with `--tokens-per-message` token ids, as fast as flow control lets
it), a relay (a grpc.aio server whose handler opens the source's stream and yields each message on, under
uvloop as the router runs), and this process as the client. The relay is pinned to one core, the source and
the client to the other. At each level (`--streams` concurrent streams of `--messages` messages), the relay's
CPU time (every thread, from /proc) over the tokens it passed gives its cost per token, in three modes:

  proto    the relay parses each message and serializes it again (what the router does today)
  bytes    the relay passes the serialized bytes on untouched (identity (de)serializers)
  batched  as proto, with the source putting `--batch` tokens in each message: the cost per token when
           several tokens share a message (the router's target needs this, or a relay not written in Python)

    python bench/relay_floor.py [--streams 16,256] [--messages 200] [--batch 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import time
from datetime import datetime
from pathlib import Path

import grpc
import uvloop

from baton.bench.engine_throughput import machine
from baton.bench.router_overhead import cpu_seconds, pin_process
from baton.bench.runner import git_commit
from baton.v1 import baton_pb2 as pb

METHOD = "/relayfloor.Relay/Stream"
SOURCE_METHOD = "/relayfloor.Source/Stream"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(messages: int, tokens: int) -> bytes:
    """The request both servers take: how many messages, of how many tokens (two varints in a Usage)."""
    return pb.Usage(prompt_tokens=messages, completion_tokens=tokens).SerializeToString()


def _source(port: int, ready) -> None:
    async def stream(request: bytes, context):
        ask = pb.Usage.FromString(request)
        for i in range(ask.prompt_tokens):
            ids = list(range(i, i + ask.completion_tokens))
            yield pb.GenerateResponse(request_id="r", chunk=pb.TokenChunk(index=i, token_ids=ids, text="x" * len(ids)))

    uvloop.run(_serve("relayfloor.Source", stream, pb.GenerateResponse.SerializeToString, port, ready))


async def _serve(service: str, stream, serializer, port: int, ready) -> None:
    """Serves `stream` as `service`/Stream (request bytes untouched) until killed."""
    server = grpc.aio.server()
    handler = grpc.unary_stream_rpc_method_handler(stream, request_deserializer=None,
                                                   response_serializer=serializer)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, {"Stream": handler})])
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    ready.set()
    await server.wait_for_termination()


def _relay(port: int, source_port: int, parse: bool, ready) -> None:
    async def main():
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{source_port}")
        upstream = channel.unary_stream(
            SOURCE_METHOD, request_serializer=None,
            response_deserializer=pb.GenerateResponse.FromString if parse else None)

        async def stream(request: bytes, context):
            async for message in upstream(request):
                yield message

        await _serve("relayfloor.Relay", stream, pb.GenerateResponse.SerializeToString if parse else None, port,
                     ready)

    uvloop.run(main())


async def _drive(port: int, streams: int, messages: int, tokens: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_stream(METHOD, request_serializer=None, response_deserializer=None)

        async def one() -> int:
            return sum([1 async for _ in call(_request(messages, tokens))])

        got = await asyncio.gather(*(one() for _ in range(streams)))
    assert sum(got) == streams * messages, (sum(got), streams * messages)
    return sum(got) * tokens


def measure(mode: str, streams: int, messages: int, batch: int) -> dict:
    ctx = mp.get_context("spawn")
    source_port, relay_port = free_port(), free_port()
    ready_source, ready_relay = ctx.Event(), ctx.Event()
    source = ctx.Process(target=_source, args=(source_port, ready_source), daemon=True)
    relay = ctx.Process(target=_relay, args=(relay_port, source_port, mode != "bytes", ready_relay), daemon=True)
    source.start()
    relay.start()
    try:
        if not (ready_source.wait(60) and ready_relay.wait(60)):
            raise RuntimeError("the source or the relay did not start")
        cores = sorted(os.sched_getaffinity(0))
        relay_core, other = cores[-1], [c for c in cores[:-1]] or cores
        pin_process(relay.pid, relay_core)
        for pid in (source.pid, os.getpid()):
            for tid in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(tid), set(other))
        tokens = batch if mode == "batched" else 1
        uvloop.run(_drive(relay_port, 4, 20, tokens))  # warm the channels and the code paths
        cpu0, t0 = cpu_seconds(relay.pid), time.perf_counter()
        passed = uvloop.run(_drive(relay_port, streams, messages, tokens))
        cpu, wall = cpu_seconds(relay.pid) - cpu0, time.perf_counter() - t0
        return {"mode": mode, "streams": streams, "messages": streams * messages, "tokens": passed,
                "relay_cpu_s": cpu, "wall_s": wall, "us_per_message": cpu / (streams * messages) * 1e6,
                "us_per_token": cpu / passed * 1e6}
    finally:
        for p in (relay, source):
            p.kill()
            p.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="16,256", help="comma-separated concurrent streams per level")
    parser.add_argument("--messages", type=int, default=200, help="messages per stream")
    parser.add_argument("--batch", type=int, default=8, help="tokens per message in the batched mode")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = [measure(mode, int(s), args.messages, args.batch)
            for s in args.streams.split(",") for mode in ("proto", "bytes", "batched")]
    print(f"machine: {machine()}")
    print("relay pinned to one core; source and client on the other(s)\n")
    print(f"{'streams':>7} {'mode':>8} {'messages':>9} {'tokens':>8} {'µs/message':>11} {'µs/token':>9}")
    for r in rows:
        print(f"{r['streams']:>7} {r['mode']:>8} {r['messages']:>9} {r['tokens']:>8} {r['us_per_message']:>11.1f} "
              f"{r['us_per_token']:>9.1f}")
    if args.json:
        write_rows(args.json, args, rows)


def write_rows(path: Path, args: argparse.Namespace, rows: list[dict]) -> None:
    """A run's rows as JSON, with the machine, the commit, the date and the options."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), "commit": git_commit(),
                                "date": datetime.now().isoformat(timespec="seconds"),
                                "options": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
