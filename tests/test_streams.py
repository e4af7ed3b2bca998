"""`DecodeNode.Streams`: a router's streams on one node, on one call (decode/streams.py, router/streams.py).

A real colocated node (engine, servicer, grpc.aio server on a loopback port) in this process; the router's side
is `NodeStreams`, or a raw stub where the test speaks the protocol itself."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from test_stories import PROMPTS

from baton.decode.server import DecodeServicer
from baton.decode.streams import WINDOW
from baton.engine import LLM, SamplingParams
from baton.engine.async_engine import AsyncEngine
from baton.router.streams import NodeStreams
from baton.v1 import baton_pb2 as pb
from baton.v1 import node_pb2, node_pb2_grpc

MAX_TOKENS = 40
GREEDY = pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


@contextlib.asynccontextmanager
async def colocated_node(stories_path):
    loop = asyncio.get_running_loop()
    # No prefix cache: these tests count what a prompt and its forks compute, which a cache would change.
    engine = AsyncEngine(await asyncio.to_thread(
        lambda: LLM(str(stories_path), num_kv_blocks=64, enable_prefix_caching=False).engine), loop)
    servicer = DecodeServicer("node-0", "colocated", engine, None)
    server = grpc.aio.server()
    node_pb2_grpc.add_DecodeNodeServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield servicer, node_pb2_grpc.DecodeNodeStub(channel)
    finally:
        await channel.close()
        await server.stop(0)
        await servicer.close()
        await engine.close()


async def until_idle(stub, served: int, total: int | None = None) -> node_pb2.NodeStats:
    """Polls the node's own counts until it has taken `served` requests in all and holds no sequence (and,
    given `total`, every block is free)."""
    while True:
        s = await stub.GetStats(node_pb2.GetStatsRequest())
        if s.requests_served >= served and not s.running and not s.waiting and (total is None or
                                                                              s.free_blocks == total):
            return s
        await asyncio.sleep(0.01)


def tokens_of(responses) -> list[int]:
    return [t for r in responses if r.HasField("chunk") for t in r.chunk.token_ids]


@pytest.fixture(scope="module")
def prompts(stories_llm: LLM) -> list[list[int]]:
    return [stories_llm.tokenizer.encode(p) for p in PROMPTS[:2]]


@pytest.fixture(scope="module")
def want(stories_llm: LLM, prompts):
    [out] = stories_llm.generate([prompts[0]], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                                               ignore_eos=True))
    return out


def test_the_node_stays_a_window_ahead_and_sends_what_waited_in_one_batch(stories_path, prompts, want):
    async def scenario():
        async with colocated_node(stories_path) as (_, stub):
            call = stub.Streams()
            await call.write(node_pb2.StreamsRequest(generate=[node_pb2.NodeGenerateRequest(
                request_id="a", prompt_token_ids=prompts[0], sampling=GREEDY)]))
            batches = [await call.read() for _ in range(WINDOW)]  # read, not acknowledged
            await until_idle(stub, 1)  # the engine is done with it; the node holds the rest
            await call.write(node_pb2.StreamsRequest(acked=WINDOW))
            batches.append(await call.read())
            call.cancel()
            return batches

    batches = asyncio.run(asyncio.wait_for(scenario(), 60))
    responses = [r for b in batches for r in b.responses]
    assert tokens_of(responses) == want.token_ids
    assert "".join(r.chunk.text for r in responses) == want.text
    last = batches[-1]
    # Everything after the window, in one batch: one chunk with the rest of the tokens, the Finish, the end.
    assert [r.WhichOneof("kind") for r in last.responses] == ["chunk", "finish"]
    assert last.responses[0].chunk.index == sum(len(r.chunk.token_ids) for b in batches[:-1] for r in b.responses)
    assert last.responses[1].finish.reason == pb.FINISH_REASON_LENGTH
    assert [(e.request_id, e.code) for e in last.ends] == [("a", 0)]


def test_a_stream_read_late_comes_merged_and_a_cancelled_one_frees_its_blocks(stories_path, prompts, want):
    async def scenario():
        async with colocated_node(stories_path) as (_, stub):
            total = (await stub.GetStats(node_pb2.GetStatsRequest())).total_blocks
            streams = NodeStreams(stub)
            try:
                late = streams.generate(node_pb2.NodeGenerateRequest(request_id="late", prompt_token_ids=prompts[0],
                                                                     sampling=GREEDY), None)
                while not late.ended:  # every batch read: its responses wait in the stream, unread
                    await asyncio.sleep(0.01)
                got = [r async for r in late]

                long = pb.SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)
                gone = streams.generate(node_pb2.NodeGenerateRequest(request_id="gone", prompt_token_ids=prompts[1],
                                                                     sampling=long), None)
                first = await gone.__anext__()
                assert (await stub.GetStats(node_pb2.GetStatsRequest())).free_blocks < total
                gone.cancel()
                gone.cancel()  # a no-op
                freed = await until_idle(stub, 2, total)

                timed = streams.generate(node_pb2.NodeGenerateRequest(request_id="timed", prompt_token_ids=prompts[1],
                                                                      sampling=long), 0.2)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    async for _ in timed:
                        pass
                await until_idle(stub, 3, total)
                return got, first, freed, e.value.code()
            finally:
                await streams.close()

    got, first, freed, code = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert [r.WhichOneof("kind") for r in got] == ["chunk", "finish"]  # 40 tokens that waited: one chunk
    assert got[0].chunk.token_ids == want.token_ids and got[0].chunk.text == want.text
    assert first.chunk.token_ids and freed.running == 0
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_duplicate_id_is_refused_and_a_stopping_node_refuses_new_streams(stories_path, prompts):
    async def scenario():
        async with colocated_node(stories_path) as (servicer, stub):
            call = stub.Streams()
            long = pb.SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)
            open_a = node_pb2.NodeGenerateRequest(request_id="a", prompt_token_ids=prompts[0], sampling=long)
            await call.write(node_pb2.StreamsRequest(generate=[open_a]))
            await call.write(node_pb2.StreamsRequest(generate=[open_a]))
            ends = []
            acked = 0
            while not ends:
                batch = await call.read()
                acked += 1
                await call.write(node_pb2.StreamsRequest(acked=acked))
                ends += batch.ends
            servicer.close_streams()
            await call.write(node_pb2.StreamsRequest(generate=[node_pb2.NodeGenerateRequest(
                request_id="b", prompt_token_ids=prompts[1], sampling=long)]))
            while len(ends) < 2:
                batch = await call.read()
                acked += 1
                await call.write(node_pb2.StreamsRequest(acked=acked))
                ends += batch.ends
            await call.write(node_pb2.StreamsRequest(cancel=["a"]))  # its last stream: the call then ends
            while (batch := await call.read()) is not grpc.aio.EOF:
                acked += 1
                await call.write(node_pb2.StreamsRequest(acked=acked))
            return ends, await call.code()

    ends, code = asyncio.run(asyncio.wait_for(scenario(), 60))
    dup, stopping = ends
    assert dup.request_id == "a" and dup.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert dup.details.startswith("request_id:")
    assert stopping.request_id == "b" and stopping.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert stopping.HasField("lost_node") and stopping.lost_node == "node-0"
    assert code == grpc.StatusCode.OK


def test_a_colocated_node_computes_the_prompt_of_n_choices_once(stories_path, stories_llm: LLM, prompts):
    """n choices in one Generate (`forks`): choice 0 computes the prompt, the others fork from its full blocks
    and compute only the tail. Each choice equals the offline engine's run with its own seed; the node's
    prefill-token histogram shows what was computed. With max_tokens=1, choice 0 is gone before the others
    can fork: they compute the prompt themselves, and are still right."""
    prompt = (prompts[0] * 8)[:40]  # 40 tokens: two full blocks of 16 shared, 8 tokens each fork computes
    sampled = [pb.SamplingParams(max_tokens=12, temperature=0.9, seed=11 + j, ignore_eos=True) for j in range(3)]
    greedy = [pb.SamplingParams(max_tokens=1, temperature=0.0)] * 3

    async def scenario():
        async with colocated_node(stories_path) as (servicer, stub):
            def computed() -> float:
                return servicer.metrics.registry.get_sample_value("baton_prefill_batch_tokens_sum",
                                                                  servicer.metrics.labels) or 0.0

            streams = NodeStreams(stub)
            try:
                got = []
                for i, choices in enumerate((sampled, greedy)):
                    before = computed()
                    stream = streams.generate(node_pb2.NodeGenerateRequest(
                        request_id=f"n{i}", prompt_token_ids=prompt, sampling=choices[0], forks=choices[1:]), None)
                    tokens: dict[int, list[int]] = {0: [], 1: [], 2: []}
                    finished = set()
                    async for r in stream:
                        assert r.request_id == f"n{i}"
                        if r.HasField("chunk"):
                            tokens[r.choice] += r.chunk.token_ids
                        else:
                            finished.add(r.choice)
                    await until_idle(stub, 3 * (i + 1), (await stub.GetStats(node_pb2.GetStatsRequest())).total_blocks)
                    got.append((tokens, finished, computed() - before))
                return got
            finally:
                await streams.close()

    (sampled_tokens, sampled_done, sampled_computed), (greedy_tokens, greedy_done, greedy_computed) = \
        asyncio.run(asyncio.wait_for(scenario(), 60))
    block = stories_llm.engine.blocks.block_size
    shared = (len(prompt) - 1) // block * block
    assert sampled_computed == len(prompt) + 2 * (len(prompt) - shared)  # not 3 x 40
    assert sampled_done == greedy_done == {0, 1, 2}
    for j in range(3):
        [want] = stories_llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.9, seed=11 + j,
                                                               ignore_eos=True))
        assert sampled_tokens[j] == want.token_ids, j
    assert len({tuple(t) for t in sampled_tokens.values()}) > 1  # the choices differ
    [first] = stories_llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))
    assert all(greedy_tokens[j] == first.token_ids for j in range(3))
    assert greedy_computed == 3 * len(prompt)  # choice 0 ended at once: nothing left to fork from
