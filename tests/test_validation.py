"""Bad input raises an error that names the field, holds nothing, and leaves the engine serving."""

from __future__ import annotations

import math

import pytest

from baton.engine import LLM, ConfigError, EngineConfig, InvalidRequest, SamplingParams


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("max_tokens", {"max_tokens": 0}),
        ("max_tokens", {"max_tokens": -5}),
        ("temperature", {"temperature": -0.1}),
        ("temperature", {"temperature": math.nan}),
        ("top_p", {"top_p": 0.0}),
        ("top_p", {"top_p": 1.5}),
        ("top_k", {"top_k": -1}),
        ("seed", {"seed": -1}),
        ("stop", {"stop": [""]}),
        ("stop_token_ids", {"stop_token_ids": [-3]}),
    ],
)
def test_bad_sampling_params_name_the_field(field, kwargs):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field
    assert str(e.value).startswith(f"{field}:")


@pytest.mark.parametrize(
    "prompt, why",
    [("", "is empty"), ([], "is empty"), ([1, 99999], "token ids"), ([1] * 512, "context")],
)
def test_bad_prompts_name_the_field(stories_llm, prompt, why):
    with pytest.raises(InvalidRequest) as e:
        stories_llm.generate([prompt], SamplingParams(max_tokens=4))
    assert e.value.field == "prompt" and why in str(e.value)
    engine = stories_llm.engine
    assert not engine.has_unfinished() and engine.num_free_blocks == engine.blocks.num_blocks


def test_a_bad_request_in_a_batch_rejects_only_the_batch_and_the_engine_goes_on(stories_llm):
    with pytest.raises(InvalidRequest):
        stories_llm.generate(["Once", "", "Twice"], SamplingParams(max_tokens=4))
    engine = stories_llm.engine
    assert not engine.has_unfinished() and engine.num_free_blocks == engine.blocks.num_blocks
    assert len(stories_llm.generate(["Once"], SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids) == 4


def test_duplicate_request_id(stories_llm):
    engine = stories_llm.engine
    engine.add_request("dup", "Once", SamplingParams(max_tokens=2))
    try:
        with pytest.raises(InvalidRequest) as e:
            engine.add_request("dup", "Once", SamplingParams(max_tokens=2))
        assert e.value.field == "request_id"
    finally:
        engine.abort_request("dup")


def test_unknown_checkpoint_path(tmp_path):
    with pytest.raises(ConfigError) as e:
        LLM(str(tmp_path / "no-such-model"))
    assert e.value.field == "model" and "no-such-model" in str(e.value)
    with pytest.raises(ConfigError) as e:
        LLM(str(tmp_path))  # a folder, but not a checkpoint
    assert e.value.field == "model" and "config.json" in str(e.value)


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("block_size", {"block_size": 0}),
        ("max_num_seqs", {"max_num_seqs": -1}),
        ("num_kv_blocks", {"num_kv_blocks": 0}),
        ("dtype", {"dtype": "float64"}),
        ("max_model_len", {"max_model_len": 1}),
    ],
)
def test_bad_engine_config(field, kwargs):
    with pytest.raises(ConfigError) as e:
        EngineConfig(**kwargs)
    assert e.value.field == field


def test_engine_options_that_cannot_work_together(stories_path):
    with pytest.raises(ConfigError) as e:
        LLM(str(stories_path), max_num_batched_tokens=100)  # < the 512-token context, no chunked prefill
    assert e.value.field == "max_num_batched_tokens"
    with pytest.raises(TypeError):
        LLM(str(stories_path), no_such_option=True)
