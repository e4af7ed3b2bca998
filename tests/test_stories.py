"""stories260K (a real trained Llama with GQA and tied embeddings) against transformers, token for token."""

from __future__ import annotations

import pytest
import torch

from baton.engine import FinishReason, SamplingParams

PROMPTS = [
    "Once upon a time",
    "Lily wanted to play with the big red ball, but",
    "The little dog",
    "One day, Tom and his mom went to the store to buy some food. They saw",
    "Sue",
]


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    out = hf_model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
    )
    return out[0, len(prompt_ids) :].tolist()


def test_greedy_matches_transformers(stories_llm, hf_stories):
    params = SamplingParams(max_tokens=128, temperature=0)
    outs = stories_llm.generate(PROMPTS, params)
    eos = set(hf_stories.generation_config.eos_token_id)
    for prompt, out in zip(PROMPTS, outs):
        assert out.prompt_token_ids == stories_llm.tokenizer.encode(prompt)
        expected = hf_greedy(hf_stories, out.prompt_token_ids, 128)
        # transformers stops at the checkpoint's EOS (ids 2 and 1) and pads after it; Baton stops there too.
        if any(t in eos for t in expected):
            expected = expected[: next(i for i, t in enumerate(expected) if t in eos) + 1]
            assert out.finish_reason is FinishReason.EOS
        else:
            assert out.finish_reason is FinishReason.LENGTH
        assert out.token_ids == expected, prompt
        assert out.text == stories_llm.tokenizer.decode(out.prompt_token_ids + out.token_ids)[len(prompt) :]


def test_ignore_eos_runs_to_max_tokens_and_matches(stories_llm, hf_stories):
    prompt_ids = stories_llm.tokenizer.encode(PROMPTS[0])
    out = stories_llm.generate([prompt_ids], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 200 and out.finish_reason is FinishReason.LENGTH
    with_eos = hf_stories.generate(
        torch.tensor([prompt_ids]), max_new_tokens=200, min_new_tokens=200, do_sample=False, pad_token_id=0
    )[0, len(prompt_ids) :].tolist()
    assert out.token_ids == with_eos


def test_logprobs_are_the_model_distribution(stories_llm, hf_stories):
    prompt_ids = stories_llm.tokenizer.encode(PROMPTS[1])
    out = stories_llm.generate([prompt_ids], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    with torch.no_grad():
        logits = hf_stories(torch.tensor([prompt_ids + out.token_ids])).logits[0].float()
    ref = torch.log_softmax(logits, -1)[len(prompt_ids) - 1 : -1].gather(1, torch.tensor(out.token_ids)[:, None])
    assert torch.allclose(torch.tensor(out.logprobs), ref.squeeze(1), atol=1e-4)
    assert all(lp <= 0 for lp in out.logprobs)


@pytest.mark.parametrize("chunked", [False, True])
def test_context_limit_finishes_with_length(stories_path, chunked):
    from baton.engine import LLM

    llm = LLM(str(stories_path), max_model_len=64, enable_chunked_prefill=chunked, max_num_batched_tokens=64)
    prompt = llm.tokenizer.encode(PROMPTS[3])
    out = llm.generate([prompt], SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))[0]
    assert len(prompt) + len(out.token_ids) == 64
    assert out.finish_reason is FinishReason.LENGTH
