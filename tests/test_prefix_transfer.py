"""Disaggregated prefix caching (issue 25, part 2): a decode node holds the cached blocks a prompt starts with for
its reservation, and the prefill node sends the K/V of the other blocks alone, on the pair channel and on the
same-device path. A real PrefillServicer and DecodeServicer (stories260K engines, real gloo pair groups, real
gRPC on loopback); the router's part is played by the test. Token for token the uncached engine's; what goes
over the wire is counted to the byte; and no input leaves a block held."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
import torch

from test_prefill_lanes import BOUND, Nodes, transferred

from baton.decode.server import DecodeServicer
from baton.engine import LLM, SamplingParams
from baton.engine.prefix import block_names
from baton.v1 import baton_pb2 as pb
from baton.v1 import node_pb2

BLOCK = 16
GREEDY = pb.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def held_blocks(computed: list[list[int]], prompt: list[int], block_size: int = BLOCK) -> int:
    """How many leading blocks of `prompt` a node that computed each of `computed` (token lists, in full) holds
    cached, short of the block of the prompt's last token (always computed again): the prefix-cache rule,
    restated from block names alone."""
    known = {name for tokens in computed for name in block_names(b"", tokens, block_size)}
    held = 0
    for name in block_names(b"", prompt, block_size, limit=(len(prompt) - 1) // block_size):
        if name not in known:
            break
        held += 1
    return held


def block_bytes(llm_engine) -> int:
    """One block's K/V, every layer (float32)."""
    cfg = llm_engine.model_config
    return cfg.num_layers * 2 * BLOCK * cfg.num_kv_heads * cfg.head_dim * 4


def run(stories_path, test, shared: bool = False) -> None:
    async def main():
        async with asyncio.timeout(BOUND):
            async with Nodes(stories_path, DecodeServicer, shared) as nodes:
                await test(nodes)

    asyncio.run(main())


async def reserve(nodes: Nodes, rid: str, tokens: list[int], **fields) -> node_pb2.KVTarget:
    request = node_pb2.ReserveRequest(request_id=rid, prompt_tokens=len(tokens), max_tokens=GREEDY.max_tokens,
                                      lease_ms=60_000, token_ids=tokens)
    for name, value in fields.items():
        setattr(request, name, value)
    return (await nodes.decode_stub.Reserve(request)).target


async def turn(nodes: Nodes, rid: str, prompt: list[int], delivered: list[int] = (),
               sampling: pb.SamplingParams = GREEDY) -> tuple[list[int], node_pb2.KVTarget, int]:
    """The router's three calls for one request: (its tokens, the reservation, the KV bytes sent). `delivered`:
    the tokens a stream that resumes here had delivered (its K/V computed and sent with the prompt's)."""
    resumed = node_pb2.Resumed(token_ids=delivered)
    target = await reserve(nodes, rid, prompt + list(delivered))
    events = [e async for e in nodes.prefill_stub.Prefill(node_pb2.PrefillRequest(
        request_id=rid, prompt_token_ids=prompt, sampling=sampling, target=target, resumed=resumed))]
    first = events[0].first_token.chunk
    tokens = list(first.token_ids)
    async for response in nodes.decode_stub.Continue(node_pb2.ContinueRequest(
            request_id=rid, prompt_token_ids=prompt, first_token=first.token_ids[0],
            first_logprob=first.logprobs[0] if first.logprobs else 0.0, sampling=sampling, resumed=resumed)):
        if response.HasField("chunk"):
            tokens += response.chunk.token_ids
    return tokens, target, transferred(events)


async def nothing_held(nodes: Nodes) -> None:
    """No request holds a block on the decode node (cached ones are available), and nothing is reserved."""
    blocks = nodes.decode_engine.engine.blocks
    while nodes.decode.reservations.pending or blocks.num_free != blocks.num_blocks:
        await asyncio.sleep(0.001)  # a release still on its way (the test's BOUND ends a hang)
    assert not any(blocks.refs(b) for b in range(blocks.num_blocks))


@pytest.mark.parametrize("shared", [False, True], ids=["pair", "same-device"])
def test_the_next_turn_moves_only_the_blocks_the_decode_node_lacks(stories_path, shared):
    """A conversation's second turn resends the first (prompt and answer) with more: the decode node holds every
    full block of what it computed for turn one, and only the rest crosses; a prompt cached whole still sends
    the block of its last token. Tokens equal the uncached engine's."""
    uncached = LLM(str(stories_path), enable_prefix_caching=False)
    params = SamplingParams(max_tokens=GREEDY.max_tokens, temperature=0, ignore_eos=True)
    base = uncached.tokenizer.encode("Once upon a time, there was a little girl named Lily. She loved to play "
                                     "outside in the sunshine with her friends and her dog")

    async def test(nodes: Nodes):
        assert nodes.prefill.kv_path == "auto"
        per_block = block_bytes(nodes.decode_engine.engine)
        computed: list[list[int]] = []
        targets: list[node_pb2.KVTarget] = []
        conversation = list(base)
        for i in range(3):
            want = uncached.generate([conversation], params)[0].token_ids
            tokens, target, sent = await turn(nodes, f"turn-{i}", conversation)
            targets.append(target)
            assert target.HasField("share") == shared  # which path it took
            assert tokens == want, i
            held = held_blocks(computed, conversation)
            assert target.cached_blocks == held and (i == 0 or held > 0)
            assert sent == (-(-len(conversation) // BLOCK) - held) * per_block
            # The held blocks are the cached ones (still named for those tokens).
            assert list(target.block_ids[:held]) == nodes.decode_engine.engine.blocks.match(conversation).blocks[:held]
            computed.append(conversation + tokens[:-1])  # the last token is sampled, never computed
            conversation = conversation + tokens + uncached.tokenizer.encode(" Then")
        # The same prompt again: all its blocks but its last token's are held.
        again = computed[-1][: len(computed[-1]) // BLOCK * BLOCK]
        tokens, target, sent = await turn(nodes, "again", again)
        targets.append(target)
        assert tokens == uncached.generate([again], params)[0].token_ids
        assert target.cached_blocks == len(again) // BLOCK - 1 and sent == per_block
        stats = await nodes.decode_stub.GetStats(node_pb2.GetStatsRequest())
        assert stats.prefix_cache.hits == sum(t.cached_blocks for t in targets) * BLOCK
        await nothing_held(nodes)

    run(stories_path, test, shared)


def test_bad_reservations_and_transfers_are_refused_and_hold_nothing(stories_path):
    """Token ids that are not the reservation's, a cached count the prompt cannot have, a transfer that starts
    anywhere but at the decode node's first uncached block, and a Continue whose prompt is not the one its
    cached blocks hold: each refused with INVALID_ARGUMENT naming the field, nothing held after."""
    prompt = [(5 * i + 7) % 500 + 1 for i in range(40)]

    async def refused(call, field: str):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(field), \
            (field, e.value.details())

    async def test(nodes: Nodes):
        await turn(nodes, "seed", prompt)  # the decode node caches its two full blocks
        await refused(reserve(nodes, "short", prompt[:-1], prompt_tokens=len(prompt)), "token_ids")
        await refused(reserve(nodes, "vocab", [nodes.vocab] + prompt[1:]), "token_ids")
        await nothing_held(nodes)

        # A cached count past the prompt's last block: the prefill node refuses it before anything moves.
        target = await reserve(nodes, "count", prompt)
        assert target.cached_blocks == 2
        target.cached_blocks = 3
        await refused(_drain(_prefill(nodes, "count", prompt, target)), "target.cached_blocks")
        await nodes.decode_stub.Release(node_pb2.ReleaseRequest(request_id="count"))

        # A transfer that starts at a block the decode node never reported, or past the prompt.
        target = await reserve(nodes, "start", prompt)
        for first in (0, 1, 3, 4):
            await refused(nodes.decode_stub.ReceiveKV(node_pb2.ReceiveKVRequest(
                request_id="start", prefill_node_id="prefill-x", generation=1, layout=nodes.decode.layout,
                num_tokens=len(prompt), block_ids=target.block_ids, first_block=first)), "first_block")
        await refused(nodes.decode_stub.ReceiveKV(node_pb2.ReceiveKVRequest(
            request_id="start", prefill_node_id="prefill-x", layout=nodes.decode.layout, num_tokens=len(prompt),
            block_ids=target.block_ids, first_block=9, shared=True)), "first_block")
        await nodes.decode_stub.Release(node_pb2.ReleaseRequest(request_id="start"))

        # Continue with another prompt of the same length than the one the reservation's cached blocks hold.
        target = await reserve(nodes, "other", prompt)
        events = [e async for e in _prefill(nodes, "other", prompt, target)]
        first = events[0].first_token.chunk.token_ids[0]
        other = [prompt[0] % 500 + 1] + prompt[1:]
        await refused(_drain(nodes.decode_stub.Continue(node_pb2.ContinueRequest(
            request_id="other", prompt_token_ids=other, first_token=first, sampling=GREEDY))), "prompt_token_ids")
        await nothing_held(nodes)

    run(stories_path, test)


def _prefill(nodes: Nodes, rid: str, prompt: list[int], target: node_pb2.KVTarget):
    return nodes.prefill_stub.Prefill(node_pb2.PrefillRequest(request_id=rid, prompt_token_ids=prompt,
                                                              sampling=GREEDY, target=target))


async def _drain(call) -> None:
    async for _ in call:
        pass


def test_a_decode_node_that_holds_the_prefix_computes_the_rest_itself(stories_path):
    """Conditional disaggregation, the decode node's part: a reservation whose cached blocks hold most of the
    prompt, continued with prefill_here, computes the rest there and samples the first token there; nothing
    crosses and no prefill node is asked; the tokens are the uncached engine's. Refused with forks, or for a
    reservation whose K/V were sent; nothing held after."""
    uncached = LLM(str(stories_path), enable_prefix_caching=False)
    params = SamplingParams(max_tokens=GREEDY.max_tokens, temperature=0, ignore_eos=True)
    prompt = [(3 * i + 11) % 500 + 1 for i in range(40)]

    async def refused(call, field: str):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _drain(call)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(field), \
            (field, e.value.details())

    def here(nodes: Nodes, rid: str, tokens: list[int], **fields):
        return nodes.decode_stub.Continue(node_pb2.ContinueRequest(
            request_id=rid, prompt_token_ids=tokens, sampling=GREEDY, prefill_here=True, **fields))

    async def test(nodes: Nodes):
        first, _, _ = await turn(nodes, "first", prompt)
        served, received = nodes.prefill.requests_served, nodes.decode.intake.bytes_received
        follow_up = prompt + first + [7, 8, 9]
        target = await reserve(nodes, "next", follow_up)
        assert target.cached_blocks == (len(prompt) + len(first) - 1) // BLOCK
        tokens = [t async for r in here(nodes, "next", follow_up) if r.HasField("chunk") for t in r.chunk.token_ids]
        assert tokens == uncached.generate([follow_up], params)[0].token_ids
        assert (nodes.prefill.requests_served, nodes.decode.intake.bytes_received) == (served, received)

        await reserve(nodes, "forked", follow_up)
        await refused(here(nodes, "forked", follow_up, forks=[GREEDY]), "forks")
        target = await reserve(nodes, "sent", follow_up)
        await _drain(_prefill(nodes, "sent", follow_up, target))
        await refused(here(nodes, "sent", follow_up), "prefill_here")
        await nothing_held(nodes)

    run(stories_path, test)


def test_a_working_set_three_times_the_pool_stays_exact_and_pins_nothing(stories_path):
    """Twenty conversations of three turns on nodes of 64 blocks each: what they would keep cached is about three
    pools' worth, so blocks are evicted on both nodes and found again or computed anew. Every token is the
    uncached engine's, and after the last turn no request holds a block."""
    uncached = LLM(str(stories_path), enable_prefix_caching=False)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    rng = random.Random(5)
    conversations = [[rng.randrange(3, 500) for _ in range(40)] for _ in range(20)]

    async def test(nodes: Nodes):
        for t in range(3):
            for c, history in enumerate(conversations):
                tokens, _, _ = await turn(nodes, f"c{c}-{t}", history)
                assert tokens == uncached.generate([history], params)[0].token_ids, (c, t)
                conversations[c] = history + tokens + [rng.randrange(3, 500) for _ in range(40)]
        for engine in (nodes.prefill_engine.engine, nodes.decode_engine.engine):
            assert engine.blocks.counters.evictions > 0 and engine.blocks.counters.hits > 0
        await nothing_held(nodes)
        prefill = nodes.prefill_engine.engine.blocks
        assert prefill.num_free == prefill.num_blocks and not any(prefill.refs(b) for b in range(prefill.num_blocks))

    run(stories_path, test)


def test_a_stream_resumed_where_its_prefix_is_cached_sends_only_the_rest(stories_path):
    """Migration's data path with the cache: a stream that resumes on a decode node which holds its prompt's
    blocks (an earlier request of the same prompt) reserves prompt and delivered tokens, is sent the blocks its
    cache lacks, and goes on from the next token exactly; seeded sampling too."""
    uncached = LLM(str(stories_path), enable_prefix_caching=False)
    prompt = [(7 * i + 2) % 500 + 1 for i in range(50)]
    seeded = pb.SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    want = uncached.generate([prompt], SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, seed=3,
                                                      ignore_eos=True))[0].token_ids

    async def test(nodes: Nodes):
        per_block = block_bytes(nodes.decode_engine.engine)
        await turn(nodes, "earlier", prompt)  # the decode node holds the prompt's three full blocks now
        delivered = want[:20]
        tokens, target, sent = await turn(nodes, "resumed", prompt, delivered, seeded)
        assert tokens == want[20:]
        assert target.cached_blocks == len(prompt) // BLOCK
        assert sent == (-(-(len(prompt) + len(delivered)) // BLOCK) - target.cached_blocks) * per_block
        await nothing_held(nodes)

    run(stories_path, test)


async def flush(engine) -> int:
    """Forgets every block the engine keeps cached (as eviction would), on its thread."""
    return await engine.call(engine.engine.blocks.flush)


def test_a_prefill_node_that_lacks_the_prefix_reads_it_back_from_the_decode_node(stories_path):
    """The pull path: the decode node holds a conversation's blocks, the prefill node has lost them (flushed, as
    eviction would): the prefill node reads the K/V of the blocks it lacks back over the pair channel (the
    pull counted to the byte on both nodes) and computes only the rest (its cache's hits rise by the pulled
    tokens); tokens are the uncached engine's. With `pull_min_tokens` 0 it computes them instead. A pull
    the decode node refuses (the reservation was released first) leaves the lane in step: the next request
    goes on the same generation. Nothing is held after, on either node."""
    uncached = LLM(str(stories_path), enable_prefix_caching=False)
    params = SamplingParams(max_tokens=GREEDY.max_tokens, temperature=0, ignore_eos=True)
    prompt = [(11 * i + 5) % 500 + 1 for i in range(60)]

    async def test(nodes: Nodes):
        per_block = block_bytes(nodes.decode_engine.engine)
        prefill = nodes.prefill_engine.engine.blocks
        first, _, _ = await turn(nodes, "first", prompt)
        follow_up = prompt + first + [9, 8, 7] * 10
        for pull in (True, False):
            nodes.prefill.pull_min_tokens = BLOCK if pull else 0
            await flush(nodes.prefill_engine)
            pulled, received, hits = nodes.prefill.kv_bytes_pulled, nodes.decode.intake.bytes_pulled, \
                prefill.counters.hits
            tokens, target, sent = await turn(nodes, f"follow-up-{pull}", follow_up)
            assert tokens == uncached.generate([follow_up], params)[0].token_ids, pull
            held = target.cached_blocks
            assert held >= (len(prompt) + len(first) - 1) // BLOCK
            assert sent == (-(-len(follow_up) // BLOCK) - held) * per_block  # only what the decode node lacks
            assert nodes.prefill.kv_bytes_pulled - pulled == (held * per_block if pull else 0)
            assert nodes.decode.intake.bytes_pulled - received == (held * per_block if pull else 0)
            assert prefill.counters.hits - hits == (held * BLOCK if pull else 0)
            if pull:
                # Both nodes' blocks for the prefix hold the same K/V, bit for bit (attention would not notice a
                # block in the wrong place: the test does). Computed here, they differ in rounding: the decode
                # node computed most of them a token at a time.
                mine = prefill.match(follow_up).blocks[:held]
                theirs = nodes.decode_engine.engine.blocks.match(follow_up).blocks[:held]
                assert len(mine) == len(theirs) == held
                for a, b in zip(nodes.prefill_engine.engine.kv_pools, nodes.decode_engine.engine.kv_pools):
                    assert torch.equal(a[mine], b[theirs])
            follow_up = follow_up + [4]  # a new last block each time: the decode node holds the same prefix

        # Refused: the reservation is gone when the pull asks for it (the router released it meanwhile).
        nodes.prefill.pull_min_tokens = BLOCK
        await flush(nodes.prefill_engine)
        generation = nodes.peer().generation
        target = await reserve(nodes, "released", follow_up)
        await nodes.decode_stub.Release(node_pb2.ReleaseRequest(request_id="released"))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _drain(_prefill(nodes, "released", follow_up, target))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        tokens, _, _ = await turn(nodes, "after", follow_up)
        assert tokens == uncached.generate([follow_up], params)[0].token_ids
        assert nodes.peer().generation == generation  # the lane stayed in step: nothing was retired
        await nothing_held(nodes)
        assert prefill.num_free == prefill.num_blocks and not any(prefill.refs(b) for b in range(prefill.num_blocks))

    run(stories_path, test)


def test_pulls_the_decode_node_cannot_serve_are_refused_by_field(stories_path):
    """PullKV's own checks, called as a prefill node would but with bad fields: each refused with the status and
    the field named, before anything touches a lane."""
    async def test(nodes: Nodes):
        layout = nodes.prefill.sending.layout
        cases = [
            (dict(block_ids=[]), grpc.StatusCode.INVALID_ARGUMENT, "block_ids"),
            (dict(block_ids=[1], lane=99), grpc.StatusCode.INVALID_ARGUMENT, "lane"),
            (dict(block_ids=[1], layout=node_pb2.KVLayout(num_layers=layout.num_layers + 1,
                                                          block_size=layout.block_size)),
             grpc.StatusCode.FAILED_PRECONDITION, "layout"),
        ]
        for fields, code, field in cases:
            request = node_pb2.PullKVRequest(request_id="x", prefill_node_id="prefill-0", layout=layout)
            for name, value in fields.items():
                if name == "layout":
                    request.layout.CopyFrom(value)
                elif name == "block_ids":
                    request.block_ids[:] = value
                else:
                    setattr(request, name, value)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await nodes.decode_stub.PullKV(request)
            assert e.value.code() == code and e.value.details().startswith(field), (field, e.value.details())

    run(stories_path, test)
