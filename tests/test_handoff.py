"""Prefill on one engine, decode on another: the engine side of disaggregation, with the KV copied in
process (the network channel is tested in test_kvtransfer.py and end to end in the cluster tests)."""

from __future__ import annotations

import pytest

from baton.engine import LLM, FinishReason, InvalidRequest, NoCapacity, SamplingParams

PROMPTS = ["Once upon a time", "The little dog ran to the park and", "Lily"]


def handoff(prefill: LLM, decode: LLM, rid: str, prompt: str, params: SamplingParams) -> tuple[list[int], str, object]:
    p, d = prefill.engine, decode.engine
    prompt_ids = p.tokenizer.encode(prompt)
    blocks = d.reserve(rid, len(prompt_ids), params.max_tokens).blocks
    sink = CopySink(d, rid, blocks)
    p.set_kv_sink(sink)
    p.add_request(rid, prompt_ids, params, prefill_only=True)
    first = p.step()[0]
    p.set_kv_sink(None)
    assert sink.started == [rid] and sink.copied == list(range(p.model_config.num_layers))
    # The sink copied the prompt's K/V during the step: the prefill engine holds nothing once it ends.
    assert p.num_free_blocks == p.blocks.num_blocks and not p.has_unfinished()
    if first.finished:
        assert d.release(rid)[0] == len(blocks)
        return first.token_ids, first.text, first.finish_reason
    d.adopt(rid, prompt_ids, first.token_ids[0], first.logprobs[0], params)
    tokens, text, reason = list(first.token_ids), first.text, None
    while reason is None:
        for out in d.step():
            tokens += out.token_ids
            text += out.text
            reason = out.finish_reason
    return tokens, text, reason


class CopySink:
    """A KV sink that copies the prompt's blocks, layer by layer, into the other engine's reserved blocks."""

    def __init__(self, dst, rid: str, blocks: list[int]) -> None:
        self.dst, self.rid, self.blocks = dst, rid, blocks
        self.started: list[str] = []
        self.copied: list[int] = []

    def step_started(self, prompts, pool) -> None:
        self.started += [rid for rid, _ in prompts]

    def layer_done(self, layer, pool, prompts) -> None:
        for rid, table in prompts:
            if rid == self.rid:
                self.dst.kv_pools[layer][self.blocks] = pool[table[: len(self.blocks)]]
                self.copied.append(layer)


@pytest.fixture(scope="module")
def pair(stories_path):
    return LLM(str(stories_path)), LLM(str(stories_path))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=60, temperature=0),
        SamplingParams(max_tokens=60, temperature=0.9, top_p=0.9, seed=11),
        SamplingParams(max_tokens=60, temperature=0, stop=["park"]),
        SamplingParams(max_tokens=1, temperature=0),
    ],
    ids=["greedy", "seeded", "stop-string", "one-token"],
)
def test_prefill_here_decode_there_equals_one_engine(pair, stories_llm, params):
    prefill, decode = pair
    for i, prompt in enumerate(PROMPTS):
        expected = stories_llm.generate([prompt], params)[0]
        tokens, text, reason = handoff(prefill, decode, f"r{i}", prompt, params)
        assert tokens == expected.token_ids
        assert text == expected.text
        assert reason is expected.finish_reason
    assert decode.engine.num_free_blocks == decode.engine.blocks.num_blocks


def test_reservations_are_checked_and_freed(stories_path):
    llm = LLM(str(stories_path), num_kv_blocks=8, block_size=16)
    engine = llm.engine
    blocks = engine.reserve("a", 40, 10).blocks
    assert len(blocks) == 3 and engine.num_free_blocks == 5
    with pytest.raises(InvalidRequest) as e:
        engine.reserve("a", 10, 10)
    assert e.value.field == "request_id"
    with pytest.raises(NoCapacity):
        engine.reserve("b", 90, 10)  # fits the cache, but not what is free now
    with pytest.raises(InvalidRequest) as e:
        engine.reserve("c", 100, 100)  # could never fit
    assert e.value.field == "max_tokens"
    with pytest.raises(InvalidRequest):
        engine.adopt("nobody", [1, 2, 3], 5, -0.1, SamplingParams())
    assert engine.release("a") == (3, None) and engine.release("a") == (0, None)
    assert engine.num_free_blocks == 8


def test_adopted_sequence_can_be_aborted(pair):
    _, decode = pair
    engine = decode.engine
    ids = engine.tokenizer.encode("Once upon a time")
    engine.reserve("x", len(ids), 50)
    engine.adopt("x", ids, 432, -0.1, SamplingParams(max_tokens=50, temperature=0))
    engine.step()
    freed, out = engine.release("x")
    assert out.finish_reason is FinishReason.ABORT and freed == engine.blocks.blocks_for(len(ids) + 2)
    assert engine.num_free_blocks == engine.blocks.num_blocks and not engine.has_unfinished()
