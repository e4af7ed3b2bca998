"""Bad input raises an error that names the field, holds nothing, and leaves the engine serving."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
import tokenizers
from tokenizers import normalizers, pre_tokenizers

from baton.engine import LLM, ConfigError, EngineConfig, InvalidRequest, SamplingParams
from baton.engine.tokenizer import Tokenizer
from baton.router.admission import admit, max_token_bytes, with_prompt_bound
from baton.router.models import model_card
from baton.v1 import baton_pb2 as pb


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("max_tokens", {"max_tokens": 0}),
        ("max_tokens", {"max_tokens": -5}),
        ("temperature", {"temperature": -0.1}),
        ("temperature", {"temperature": math.nan}),
        ("temperature", {"temperature": math.inf}),
        ("temperature", {"temperature": -math.inf}),
        ("top_p", {"top_p": 0.0}),
        ("top_p", {"top_p": 1.5}),
        ("top_p", {"top_p": math.nan}),
        ("top_p", {"top_p": math.inf}),
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


# ---- the router's bound on a prompt's bytes ----

@pytest.fixture(scope="module")
def stories_tokenizer(stories_path) -> Tokenizer:
    return Tokenizer.from_folder(stories_path)


@pytest.mark.parametrize("text", [
    "Once upon a time, there was a little girl named Lily.",
    "   spaces   everywhere    ",
    "héllo wörld — 日本語 🙂🙂🙂",  # byte fallback: one token per byte of what the vocabulary lacks
    "<s></s><unk>littlelittlelittle",  # special tokens written out in the text
])
def test_no_text_takes_more_bytes_per_token_than_the_bound_assumes(stories_tokenizer, text):
    per_token = max_token_bytes(stories_tokenizer)
    assert len(text.encode()) <= len(stories_tokenizer.encode(text, add_special_tokens=False)) * per_token


def test_a_normalizer_multiplies_the_bytes_a_token_may_cover():
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"ab": 0, "[UNK]": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    assert max_token_bytes(Tokenizer(backend)) == len("[UNK]")
    backend.normalizer = normalizers.NFKC()  # "ａｂ" (6 bytes) becomes the 2-byte token "ab"
    assert max_token_bytes(Tokenizer(backend)) == 4 * len("[UNK]")


class NeverTokenizes:
    """A tokenizer that fails the test if admission asks it for anything."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise AssertionError("the prompt was tokenized")


@pytest.mark.parametrize("size", ["just over", "3 MB"])
def test_a_prompt_larger_than_the_context_can_hold_is_refused_untokenized(stories_path, stories_tokenizer, size):
    card = with_prompt_bound(model_card(stories_path), stories_tokenizer)
    assert card.max_prompt_bytes == (card.max_model_len - 1) * max_token_bytes(stories_tokenizer)
    text = "é" * (card.max_prompt_bytes // 2 + 1) if size == "just over" else "a" * 3_000_000
    with pytest.raises(InvalidRequest) as e:
        admit(pb.GenerateRequest(text=text), card, NeverTokenizes(), random.Random(0))
    assert e.value.field == "prompt"


def test_the_prompt_bound_can_be_set_and_a_prompt_under_it_is_admitted(stories_path, stories_tokenizer):
    card = model_card(stories_path)
    prompt = "Once upon a time, there was a little girl named Lily. " * 8
    admitted = admit(pb.GenerateRequest(text=prompt), card, stories_tokenizer, random.Random(0))  # derived
    assert len(admitted.prompt_ids) > 100
    tight = with_prompt_bound(replace(card, max_prompt_bytes=100), stories_tokenizer)  # set: kept as it is
    assert tight.max_prompt_bytes == 100
    with pytest.raises(InvalidRequest) as e:
        admit(pb.GenerateRequest(text=prompt), tight, NeverTokenizes(), random.Random(0))
    assert e.value.field == "prompt" and "100 bytes" in str(e.value)
