"""Continuous batching: a request's tokens do not depend on what shares its batch, and no block leaks."""

from __future__ import annotations

import pytest

from baton.engine import LLM, FinishReason, InvalidRequest, SamplingParams

SEEDS = (7, 7, 8)


def mixed_prompts(llm: LLM) -> list[list[int]]:
    """12 prompts from 1 to ~300 tokens."""
    story = (
        "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
        "One day, she saw a big red ball under a tree. She ran to get it, but a dog took it first. "
    )
    words = (story * 8).split()
    lengths = [1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233]
    return [llm.tokenizer.encode(" ".join(words[:n])) for n in lengths]


def test_batch_equals_alone(stories_llm):
    prompts = mixed_prompts(stories_llm)
    assert len(prompts) == 12 and len({len(p) for p in prompts}) == 12
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    together = stories_llm.generate(prompts, params)
    for prompt, out in zip(prompts, together):
        alone = stories_llm.generate([prompt], params)[0]
        assert out.token_ids == alone.token_ids
        assert out.text == alone.text
    assert stories_llm.engine.num_free_blocks == stories_llm.engine.blocks.num_blocks


def test_seeded_sampling_reproducible_and_batch_independent(stories_llm):
    prompt = "Once upon a time"
    params = [SamplingParams(max_tokens=40, temperature=1.0, top_p=0.9, top_k=50, seed=s) for s in SEEDS]
    batch = stories_llm.generate([prompt] * 3, params)
    assert batch[0].token_ids == batch[1].token_ids
    assert batch[0].token_ids != batch[2].token_ids
    # Alone, and beside unrelated greedy and sampled requests: the same tokens.
    alone = stories_llm.generate([prompt], params[0])[0]
    noisy = stories_llm.generate(
        ["The dog", prompt, "Tom had a big", prompt],
        [SamplingParams(max_tokens=60, temperature=0), params[0],
         SamplingParams(max_tokens=10, temperature=0.7, seed=99), params[2]],
    )
    assert alone.token_ids == batch[0].token_ids == noisy[1].token_ids
    assert noisy[3].token_ids == batch[2].token_ids


def test_unseeded_sampling_differs_between_requests(stories_llm):
    outs = stories_llm.generate(["Once upon a time"] * 4, SamplingParams(max_tokens=30, temperature=1.0))
    assert len({tuple(o.token_ids) for o in outs}) > 1


def test_top_k_one_is_greedy(stories_llm):
    greedy = stories_llm.generate(["The cat"], SamplingParams(max_tokens=30, temperature=0))[0]
    top1 = stories_llm.generate(["The cat"], SamplingParams(max_tokens=30, temperature=1.5, top_k=1, seed=3))[0]
    assert top1.token_ids == greedy.token_ids


def test_preemption_under_kv_pressure_keeps_outputs(stories_path):
    """A pool too small for all sequences at once forces recompute-preemption; outputs must not change."""
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    big = LLM(str(stories_path))
    small = LLM(str(stories_path), num_kv_blocks=24, block_size=8)
    prompts = mixed_prompts(big)[2:8]
    expected = [o.token_ids for o in big.generate(prompts, params)]
    preemptions = 0
    original = small.engine.scheduler._preempt

    def counting(seq):
        nonlocal preemptions
        preemptions += 1
        original(seq)

    small.engine.scheduler._preempt = counting
    assert [o.token_ids for o in small.generate(prompts, params)] == expected
    assert preemptions > 0
    assert small.engine.num_free_blocks == 24


def test_chunked_prefill_gives_the_same_tokens(stories_path, stories_llm):
    chunked = LLM(str(stories_path), enable_chunked_prefill=True, max_num_batched_tokens=32, max_num_seqs=8)
    prompts = mixed_prompts(stories_llm)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    expected = [o.token_ids for o in stories_llm.generate(prompts, params)]
    assert [o.token_ids for o in chunked.generate(prompts, params)] == expected
    assert chunked.engine.num_free_blocks == chunked.engine.blocks.num_blocks


def test_blocks_freed_after_finish_abort_and_reject(stories_llm):
    engine = stories_llm.engine
    total = engine.blocks.num_blocks
    engine.add_request("a", "Once upon a time", SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    engine.add_request("b", "The dog", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    finished = {}
    while "b" not in finished:
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.finish_reason
    assert finished == {"b": FinishReason.LENGTH}
    assert engine.num_free_blocks < total  # "a" still holds its blocks
    aborted = engine.abort_request("a")
    assert aborted.finish_reason is FinishReason.ABORT
    assert engine.num_free_blocks == total
    assert engine.abort_request("a") is None  # aborting twice is harmless
    assert not engine.has_unfinished()
    # Rejected requests hold nothing either.
    with pytest.raises(InvalidRequest):
        engine.add_request("c", "", SamplingParams())
    assert engine.num_free_blocks == total and not engine.has_unfinished()


def test_abort_while_waiting(stories_path):
    llm = LLM(str(stories_path), max_num_seqs=1)
    engine = llm.engine
    engine.add_request("run", "Once", SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    engine.add_request("wait", "Twice", SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    engine.step()
    assert engine.abort_request("wait").finish_reason is FinishReason.ABORT
    engine.abort_request("run")
    assert engine.num_free_blocks == engine.blocks.num_blocks and not engine.has_unfinished()


def test_request_too_large_for_the_cache_is_rejected(stories_path):
    llm = LLM(str(stories_path), num_kv_blocks=4, block_size=16)  # 64 tokens in all
    with pytest.raises(InvalidRequest) as e:
        llm.generate(["Once upon a time"], SamplingParams(max_tokens=100))
    assert e.value.field == "max_tokens"
    long_prompt = list(range(3, 80))
    with pytest.raises(InvalidRequest) as e:
        llm.generate([long_prompt], SamplingParams(max_tokens=1))
    assert e.value.field == "prompt"
    assert llm.engine.num_free_blocks == 4 and not llm.engine.has_unfinished()
    # What does fit still runs to the end.
    out = llm.generate(["Once upon a time"], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 40


def test_abort_all_frees_every_sequence(stories_llm):
    engine = stories_llm.engine
    for rid in ("x", "y", "z"):
        engine.add_request(rid, "Once upon a time", SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    engine.step()
    assert engine.num_free_blocks < engine.blocks.num_blocks
    engine.abort_all()
    assert not engine.has_unfinished() and engine.num_free_blocks == engine.blocks.num_blocks


def test_sampling_noise_is_a_function_of_seed_and_index_only():
    """The uniform number behind a sampled token: the same for the same (seed, index) anywhere, different for
    another index or seed, and uniform enough (10,000 draws: mean, spread over tenths)."""
    from baton.engine.sampler import uniform

    assert uniform(7, 3) == uniform(7, 3)
    assert len({uniform(7, i) for i in range(1000)}) == 1000
    assert uniform(7, 3) != uniform(8, 3)
    draws = [uniform(12345, i) for i in range(10_000)]
    assert all(0.0 <= u < 1.0 for u in draws)
    assert abs(sum(draws) / len(draws) - 0.5) < 0.01  # sd of the mean: 0.003
    tenths = [0] * 10
    for u in draws:
        tenths[int(u * 10)] += 1
    assert all(900 <= c <= 1100 for c in tenths), tenths  # expected 1000, sd 30
