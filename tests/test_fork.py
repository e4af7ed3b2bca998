"""Sequences forked from another's KV blocks (OpenAI n > 1 with one prefill): the block manager's reference
counts, and a real engine (stories260K, float32, CPU) whose children give exactly the tokens of independent
requests (the offline engine is the oracle) while sharing their parent's prompt blocks."""

from __future__ import annotations

import asyncio

import pytest

from baton.engine import LLM, FinishReason, InvalidRequest, SamplingParams
from baton.engine.async_engine import AsyncEngine
from baton.engine.block_manager import BlockManager
from baton.engine.request import RequestOutput, Resumed

TEXT = ("Once upon a time there was a little girl named Lily. She loved to play outside in the park with her dog. "
        "One day she saw a big red ball")
BS = 16  # the engines' block size (EngineConfig's default)


def sampled(seed: int, max_tokens: int = 12) -> SamplingParams:  # short: the tests share two busy cores
    return SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=seed, ignore_eos=True)


def greedy(max_tokens: int = 12) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


GREEDY = greedy()


@pytest.fixture(scope="module")
def llm(stories_path) -> LLM:
    return LLM(str(stories_path), num_kv_blocks=64)


def prompt(llm: LLM, n: int) -> list[int]:
    ids = llm.tokenizer.encode(TEXT)
    assert len(ids) >= n
    return ids[:n]


def drain(engine, *earlier: RequestOutput) -> dict[str, tuple[list[int], str, FinishReason]]:
    """Steps until nothing is left; each request's (tokens, text, finish reason) from its outputs (`earlier`
    ones first)."""
    got: dict[str, tuple[list[int], str, FinishReason]] = {}

    def add(out: RequestOutput) -> None:
        tokens, text, _ = got.get(out.request_id, ([], "", None))
        got[out.request_id] = (tokens + out.token_ids, text + out.text, out.finish_reason)

    for out in earlier:
        add(out)
    while engine.has_unfinished():
        for out in engine.step():
            add(out)
    return got


def oracle(stories_llm: LLM, ids: list[int], params: list[SamplingParams]) -> list[tuple]:
    return [(c.token_ids, c.text, c.finish_reason) for c in stories_llm.generate([ids] * len(params), params)]


def start_parent(engine, ids: list[int], params: SamplingParams, rid: str = "p") -> RequestOutput:
    """A parent computed here: a normal request after its first step (its prompt's K/V are in its blocks)."""
    engine.add_request(rid, ids, params)
    (first,) = engine.step()
    return first


class CopySink:
    """Copies a prefill-only prompt's K/V, layer by layer, into another engine's reserved blocks."""

    def __init__(self, dst, blocks: list[int]) -> None:
        self.dst, self.blocks = dst, blocks

    def step_started(self, prompts, pool) -> None:
        pass

    def layer_done(self, layer, pool, prompts) -> None:
        (_, table), = prompts
        self.dst.kv_pools[layer][self.blocks] = pool[table[: len(self.blocks)]]


# -- the block manager ------------------------------------------------------------------------------


def test_fork_shares_blocks_and_counts_references():
    bm = BlockManager(num_blocks=10, block_size=4)
    bm.grow("p", 10)
    parent = bm.table("p")
    bm.fork("p", "c", 2)
    assert bm.table("c") == parent[:2] and bm.num_free == 7
    assert [bm.refs(b) for b in parent] == [2, 2, 1]
    bm.grow("c", 10)  # its own third block, from the pool
    assert bm.table("c")[:2] == parent[:2] and bm.table("c")[2] not in parent and bm.num_free == 6
    assert bm.can_hold("c", (3 + 6) * 4) and not bm.can_hold("c", (3 + 6) * 4 + 1)  # shared ones count as held
    bm.fork("p", "d", 3)
    assert [bm.refs(b) for b in parent] == [3, 3, 2] and bm.num_free == 6
    assert bm.free("p") == 0 and bm.free("p") == 0  # everything it held is still held
    assert bm.free("d") == 1  # its third block was the parent's alone
    assert bm.free("c") == 3 and bm.num_free == 10
    assert sorted(bm._free) == list(range(10)) and not any(bm.refs(b) for b in range(10))


def test_fork_refuses_a_held_child_or_a_short_parent():
    bm = BlockManager(num_blocks=10, block_size=4)
    bm.grow("p", 8)
    bm.grow("x", 1)
    with pytest.raises(ValueError):
        bm.fork("p", "x", 1)
    with pytest.raises(ValueError):
        bm.fork("p", "c", 3)
    with pytest.raises(ValueError):
        bm.fork("nobody", "c", 1)
    bm.fork("p", "c", 0)  # nothing to share: the child's blocks come from grow
    assert bm.table("c") == [] and bm.free("c") == 0
    assert [bm.refs(b) for b in bm.table("p")] == [1, 1] and bm.num_free == 7


# -- the engine -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [37, 32, 33], ids=["partial-block", "whole-blocks", "one-token-tail"])
def test_children_share_the_prompt_and_match_independent_requests(llm, stories_llm, n):
    engine, ids = llm.engine, prompt(llm, n)
    total = engine.blocks.num_blocks
    parent_params = sampled(7)
    first = start_parent(engine, ids, parent_params)
    children = {"c0": sampled(100), "c1": sampled(101), "c2": sampled(102), "g": GREEDY}
    shared = (n - 1) // BS
    for rid, params in children.items():
        assert engine.fork("p", rid, ids, params) == shared * BS
    parent_table = engine.blocks.table("p")
    assert all(engine.blocks.refs(b) == 1 + len(children) for b in parent_table[:shared])

    second = engine.step()  # the children compute their prompts' tails in blocks of their own
    for rid in children:
        table = engine.blocks.table(rid)
        assert table[:shared] == parent_table[:shared] and len(table) == engine.blocks_for(n)
        assert not set(table[shared:]) & set(parent_table)
    used = total - engine.num_free_blocks
    assert used == engine.blocks_for(n + 1) + len(children) * (engine.blocks_for(n) - shared)

    got = drain(engine, first, *second)
    expected = oracle(stories_llm, ids, [parent_params, *children.values()])
    assert [got[rid] for rid in ["p", *children]] == expected
    assert engine.num_free_blocks == total and not engine.has_unfinished()


def test_children_outlive_their_released_parent(llm, stories_llm):
    engine, ids = llm.engine, prompt(llm, 37)
    start_parent(engine, ids, GREEDY)
    params = [sampled(3), GREEDY]
    for i, p in enumerate(params):
        engine.fork("p", f"c{i}", ids, p)
    freed, out = engine.release("p")  # before the children ran: only its last, unshared block goes back
    assert out.finish_reason is FinishReason.ABORT and freed == engine.blocks_for(37) - 2
    got = drain(engine)
    assert got.keys() == {"c0", "c1"}  # the parent says nothing more
    assert [got["c0"], got["c1"]] == oracle(stories_llm, ids, params)
    assert engine.num_free_blocks == engine.blocks.num_blocks


def test_an_aborted_child_frees_only_its_own_blocks(llm, stories_llm):
    engine, ids = llm.engine, prompt(llm, 37)
    start_parent(engine, ids, GREEDY)
    engine.fork("p", "c0", ids, sampled(5))
    engine.fork("p", "c1", ids, sampled(6))
    for _ in range(8):  # c0 grows past its prompt: blocks of its own
        engine.step()
    own = engine.blocks.table("c0")[2:]
    assert len(own) == engine.blocks_for(37 + 7) - 2  # its 8th token's K/V are not computed yet
    freed, out = engine.release("c0")
    assert out.finish_reason is FinishReason.ABORT and freed == len(own)
    assert all(engine.blocks.refs(b) == 2 for b in engine.blocks.table("p")[:2])  # the parent and c1
    got = drain(engine)
    assert got["c1"][0] == oracle(stories_llm, ids, [sampled(6)])[0][0][8:]
    assert engine.num_free_blocks == engine.blocks.num_blocks


def test_fork_from_a_filled_reservation_then_adopt_it(llm, stories_llm):
    """The disaggregated n > 1: the decode node reserves, the prefill node fills the blocks and samples choice
    0's first token; the decode node forks the other choices from the reservation, then adopts it."""
    decode, prefill, ids = llm.engine, stories_llm.engine, prompt(llm, 45)
    params = [sampled(20), sampled(21), GREEDY]
    blocks = decode.reserve("r", len(ids), params[0].max_tokens).blocks

    prefill.set_kv_sink(CopySink(decode, blocks))
    try:
        prefill.add_request("r", ids, params[0], prefill_only=True)
        (first,) = prefill.step()
    finally:
        prefill.set_kv_sink(None)
    decode.fork("r", "r-1", ids, params[1])
    decode.fork("r", "r-2", ids, params[2])
    decode.adopt("r", ids, first.token_ids[0], first.logprobs[0], params[0])
    got = drain(decode)
    got["r"] = (first.token_ids + got["r"][0], first.text + got["r"][1], got["r"][2])
    assert [got["r"], got["r-1"], got["r-2"]] == oracle(stories_llm, ids, params)
    assert decode.num_free_blocks == decode.blocks.num_blocks


def test_a_preempted_child_recomputes_in_its_own_blocks(stories_path, stories_llm):
    # 6 blocks: the parent and two children of 17 + 24 tokens need 3 + 2 + 2 (one shared) at the end.
    llm = LLM(str(stories_path), num_kv_blocks=6)
    engine, ids = llm.engine, prompt(llm, 17)
    preempted: list[str] = []
    preempt = engine.scheduler._preempt

    def spy(seq) -> None:
        preempted.append(seq.request_id)
        preempt(seq)

    engine.scheduler._preempt = spy
    params = [sampled(1, 24), sampled(2, 24), greedy(24)]
    first = start_parent(engine, ids, params[0])
    engine.fork("p", "c1", ids, params[1])
    engine.fork("p", "c2", ids, params[2])
    got = drain(engine, first)
    assert "c2" in preempted
    assert [got["p"], got["c1"], got["c2"]] == oracle(stories_llm, ids, params)
    assert engine.num_free_blocks == 6


def test_a_resumed_child_carries_on(llm, stories_llm):
    engine, ids = llm.engine, prompt(llm, 37)
    params = sampled(9)
    (tokens, text, reason), = oracle(stories_llm, ids, [params])
    start_parent(engine, ids, GREEDY)
    # None of the delivered tokens' text went out: the child emits all of it, then carries on at index 5.
    engine.fork("p", "c", ids, params, Resumed(tuple(tokens[:5]), 0))
    engine.release("p")
    assert drain(engine)["c"] == (tokens[5:], text, reason)
    assert engine.num_free_blocks == engine.blocks.num_blocks


def test_fork_is_refused_before_anything_is_held(llm):
    engine, ids = llm.engine, prompt(llm, 37)
    free = engine.num_free_blocks

    def refused(field: str, *args) -> None:
        with pytest.raises(InvalidRequest) as e:
            engine.fork(*args)
        assert e.value.field == field

    refused("request_id", "nobody", "c", ids, GREEDY)
    engine.add_request("q", ids, GREEDY)
    refused("request_id", "q", "c", ids, GREEDY)  # queued, not computed: it holds no blocks yet
    engine.abort_request("q")
    engine.reserve("small", 20, 10)
    refused("request_id", "small", "c", ids, GREEDY)  # 2 blocks, the prompt fills 3
    engine.release("small")
    start_parent(engine, ids, GREEDY)
    refused("prompt", "p", "c", [ids[0] + 1, *ids[1:]], GREEDY)  # not the parent's tokens
    refused("request_id", "p", "p", ids, GREEDY)  # the id is the parent's
    refused("prompt", "p", "c", [], GREEDY)
    refused("prompt", "p", "c", [*ids[:-1], 10**6], GREEDY)
    assert not engine.blocks.table("c")
    engine.release("p")
    assert engine.num_free_blocks == free and not engine.has_unfinished()


def test_async_engine_fork(llm, stories_llm):
    engine, ids = llm.engine, prompt(llm, 37)
    params = [GREEDY, sampled(31)]

    async def main() -> list[tuple]:
        ae = AsyncEngine(engine, asyncio.get_running_loop())
        try:
            parent = ae.generate("p", ids, params[0])
            first = await parent.__anext__()  # its prompt is computed
            stream = ae.open_stream("c")
            assert await ae.fork("p", "c", ids, params[1]) == 32
            results = []
            for outputs, head in ((parent, [first]), (ae.outputs("c", stream), [])):
                outs = head + [out async for out in outputs]
                results.append(([t for o in outs for t in o.token_ids], "".join(o.text for o in outs),
                                outs[-1].finish_reason))
            total, free, running, waiting, _ = await ae.load()
            assert (free, running, waiting) == (total, 0, 0)
            return results
        finally:
            await ae.close()

    assert asyncio.run(asyncio.wait_for(main(), 30)) == oracle(stories_llm, ids, params)
