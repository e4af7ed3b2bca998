"""The engine with `kernels="triton"`: whole generations against transformers, token for token.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set here before any kernel is
defined; ~0.5 s a step for stories260K): this proves the kernels are wired to the right tensors on the flat
step metadata, not that they compile for a GPU (`make gpu-check` does that).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
pytest.importorskip("numpy")
transformers = pytest.importorskip("transformers")

from baton.engine import LLM, SamplingParams  # noqa: E402
from test_architectures import PROMPTS as RANDOM_PROMPTS  # noqa: E402
from test_architectures import hf_greedy, load_hf, write_checkpoint, VARIANTS  # noqa: E402
from test_stories import PROMPTS, hf_greedy as hf_stories_greedy  # noqa: E402

NEW_TOKENS = 24
# The interpreter runs a kernel's programs one after another (~0.5 s a step for one sequence, about 3 s for
# five): two prompts of different lengths and 24 steps keep the test near 20 s.
STORIES_PROMPTS = [PROMPTS[0], PROMPTS[3]]


def test_stories_greedy_with_triton_kernels_matches_transformers(stories_path, hf_stories):
    llm = LLM(str(stories_path), kernels="triton")
    assert llm.engine.runner.model.ops.name == "triton"
    outs = llm.generate(STORIES_PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0))
    eos = set(hf_stories.generation_config.eos_token_id)
    for prompt, out in zip(STORIES_PROMPTS, outs):  # batched: two prefill spans, then decodes of two lengths
        want = hf_stories_greedy(hf_stories, out.prompt_token_ids, NEW_TOKENS)
        if any(t in eos for t in want):
            want = want[: next(i for i, t in enumerate(want) if t in eos) + 1]
        assert out.token_ids == want, prompt


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_chunked_mixed_steps_with_gqa_match_transformers(kernels, tmp_path):
    """Chunks of 16 tokens at most per step and blocks of 8: steps mix decodes with prompt chunks that
    read earlier chunks from the paged pool; 4 query heads on 2 KV heads of 32 dims."""
    folder = write_checkpoint(tmp_path / "ckpt", VARIANTS["llama-head-dim"])
    llm = LLM(str(folder), kernels=kernels, block_size=8, enable_chunked_prefill=True,
              max_num_batched_tokens=16, max_num_seqs=4)
    hf = load_hf(folder)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    outs = llm.generate(RANDOM_PROMPTS, params)
    for prompt, out in zip(RANDOM_PROMPTS, outs):
        assert out.token_ids == hf_greedy(hf, prompt)[0]


def test_fixed_buffer_decode_path_pads_without_harm(stories_path, hf_stories):
    """The CUDA-graph path without the capture: decode steps of 3 sequences copied into a batch of 4's fixed
    buffers, the padding row storing nothing and its output dropped; same tokens as transformers."""
    from baton.engine.cuda_graphs import DecodeGraphs

    llm = LLM(str(stories_path), kernels="triton", max_num_seqs=4)
    runner = llm.engine.runner
    graphs = runner.graphs = DecodeGraphs(runner.model, runner.kv.pools, 4, 16, "cpu", capture=False)
    assert graphs.sizes == [1, 2, 4]
    replayed = []
    run = graphs.run
    graphs.run = lambda ids, pos, meta: replayed.append(meta.num_decodes) or run(ids, pos, meta)
    prompts = [PROMPTS[1], PROMPTS[2], PROMPTS[4]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    assert replayed and set(replayed) <= {3}  # every decode step (of all three) took the padded path
    hf_stories_eos = hf_stories.generation_config.eos_token_id
    hf_stories.generation_config.eos_token_id = None
    try:
        for prompt, out in zip(prompts, outs):
            assert out.token_ids == hf_stories_greedy(hf_stories, out.prompt_token_ids, 12), prompt
    finally:
        hf_stories.generation_config.eos_token_id = hf_stories_eos
