"""Tokenizer parity with transformers, and the streaming detokenizer's contract, on the stories260K tokenizer."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from baton.engine.detokenizer import IncrementalDetokenizer
from baton.engine.tokenizer import Tokenizer

MODEL = Path(__file__).resolve().parents[1] / "engine" / "default_model"
FFFD = "\ufffd"

TEXTS = [
    "Once upon a time, the café served 日本 tea 😀!",
    "Hello world",
    "Wait... what?! (yes) - no; \"quoted\" 'single' 1+2=3",
    "line one\nline two\n\n\tindented",
    "crème brûlée à la mode, naïve Ångström",
    "中文字符和日本語のテキスト",
    "emoji 🎉🎉 flags 🇫🇷 family 👨‍👩‍👧",
    "",
]


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf(transformers):
    return transformers.AutoTokenizer.from_pretrained(str(MODEL))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_folder(MODEL)


def continuation(tok: Tokenizer, prompt: list[int], output: list[int], skip: bool = True) -> str:
    return tok.decode(prompt + output, skip)[len(tok.decode(prompt, skip)):]


def stream(tok: Tokenizer, prompt: list[int], output: list[int], chunk: int = 1, skip: bool = True):
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    pushed = [detok.push(output[i:i + chunk]) for i in range(0, len(output), chunk)]
    return pushed, detok.flush(), detok


# --- Tokenizer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok, hf, text):
    assert tok.encode(text) == hf(text).input_ids
    assert tok.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_transformers(tok, hf, text):
    ids = hf(text).input_ids
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)


def test_encode_adds_bos(tok):
    assert tok.encode("Hello")[0] == tok.bos_token_id == 1
    assert tok.encode("Hello", add_special_tokens=False)[0] != 1


@pytest.mark.parametrize("text", [" leading", "  two  spaces", " ", "   ", "trailing  ", "\n\nhi"])
def test_leading_whitespace_matches_transformers(tok, hf, transformers, text):
    # transformers 5 rebuilds Llama tokenizers with a Metaspace pre-tokenizer; 4.x used tokenizer.json as-is.
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("Tokenizer follows the transformers 5 pipeline for Llama tokenizers")
    assert tok.encode(text) == hf(text).input_ids


@pytest.mark.parametrize("override", [{"add_bos_token": False}, {"add_eos_token": True}, {"legacy": True},
                                      {"add_prefix_space": False}, {"tokenizer_class": None}])
def test_config_variants_match_transformers(tmp_path, transformers, override):
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("Tokenizer follows transformers 5, which ignores add_bos_token when tokenizer.json exists")
    for name in ("tokenizer.json", "special_tokens_map.json", "config.json"):
        shutil.copy(MODEL / name, tmp_path / name)
    config = json.loads((MODEL / "tokenizer_config.json").read_text()) | override
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    ours, theirs = Tokenizer.from_folder(tmp_path), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS + ["  two  spaces", " x"]:
        assert ours.encode(text) == theirs(text).input_ids, text
        ids = theirs(text).input_ids
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False)


def test_attributes(tok):
    assert tok.vocab_size == 512
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.id_to_token(1) == "<s>" and tok.id_to_token(3) == "<0x00>" and tok.id_to_token(410) == "▁"
    assert tok.special_token_ids == {0, 1, 2}
    assert tok.byte_token_ids == set(range(3, 259))


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.json")):
        Tokenizer.from_folder(tmp_path)


# --- IncrementalDetokenizer --------------------------------------------------------------------


@pytest.mark.parametrize("prompt_text", [None, "", "Once upon a time", "The café: "])
@pytest.mark.parametrize("text", [t for t in TEXTS if t])
def test_stream_one_token_at_a_time(tok, prompt_text, text):
    prompt = [] if prompt_text is None else tok.encode(prompt_text)
    output = tok.encode(text, add_special_tokens=False)
    pushed, tail, detok = stream(tok, prompt, output)
    for delta in pushed + [tail]:
        assert FFFD not in delta
    assert "".join(pushed) + tail == detok.text == continuation(tok, prompt, output)


def test_first_word_keeps_its_space(tok):
    output = tok.encode(" upon a time", add_special_tokens=False)
    pushed, tail, _ = stream(tok, tok.encode("Once"), output)
    assert pushed[0] == " upon" and "".join(pushed) + tail == " upon a time"
    # With no prompt the decode of the outputs alone is the reference, and it strips the space.
    pushed, tail, _ = stream(tok, [], output)
    assert "".join(pushed) + tail == "upon a time"


def test_multibyte_character_is_held_until_complete(tok):
    output = tok.encode("tea 😀!", add_special_tokens=False)
    emoji = [tok.id_to_token(i) for i in output].index("<0xF0>")
    pushed, tail, _ = stream(tok, tok.encode("A cup of"), output)
    assert pushed[emoji:emoji + 4] == ["", "", "", ""]
    assert pushed[emoji + 4] == "😀!" and tail == ""


@pytest.mark.parametrize("chunk", [2, 3, 7, 1000])
def test_stream_several_at_a_time(tok, chunk):
    prompt = tok.encode("Once upon a time")
    output = tok.encode(" the café served 日本 tea 😀! And then 🎉 came.", add_special_tokens=False)
    pushed, tail, detok = stream(tok, prompt, output, chunk=chunk)
    assert all(FFFD not in d for d in pushed + [tail])
    assert "".join(pushed) + tail == detok.text == continuation(tok, prompt, output)


@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize("prompt_text", [None, "Once upon a time"])
def test_arbitrary_ids(tok, prompt_text, chunk):
    prompt = [] if prompt_text is None else tok.encode(prompt_text)
    output = list(range(3, 512))  # every byte token, lone continuation bytes included, and every piece
    random.Random(1234).shuffle(output)
    pushed, tail, detok = stream(tok, prompt, output, chunk=chunk)
    assert not any(d.endswith(FFFD) for d in pushed)
    assert "".join(pushed) + tail == detok.text == continuation(tok, prompt, output)


def test_arbitrary_ids_fuzz(tok):
    rng = random.Random(7)
    for _ in range(300):
        prompt = [rng.randrange(512) for _ in range(rng.randrange(0, 8))]
        # Mostly byte tokens and specials: the cases where decoding is not prefix-stable.
        output = [rng.choice((rng.randrange(512), rng.randrange(3, 259), rng.randrange(3))) for _ in range(40)]
        skip = rng.random() < 0.7
        pushed, tail, _ = stream(tok, prompt, output, chunk=rng.choice((1, 1, 3)), skip=skip)
        assert "".join(pushed) + tail == continuation(tok, prompt, output, skip), (prompt, output, skip)


def test_special_tokens_are_skipped(tok):
    prompt = tok.encode("Once upon a time")
    output = tok.encode(" the", add_special_tokens=False) + [2, 1] + tok.encode(" café 日本", add_special_tokens=False) + [2]
    pushed, tail, detok = stream(tok, prompt, output)
    assert detok.text == " the café 日本" == continuation(tok, prompt, output)
    assert all(FFFD not in d for d in pushed + [tail])

    pushed, tail, detok = stream(tok, prompt, output, skip=False)
    assert detok.text == " the</s><s> café 日本</s>" == continuation(tok, prompt, output, skip=False)


def test_only_special_tokens(tok):
    pushed, tail, detok = stream(tok, [1], [1, 2, 2])
    assert pushed == ["", "", ""] and tail == "" and detok.text == ""


def test_decodes_only_a_window(tok):
    calls: list[int] = []

    class Spy:
        special_token_ids, byte_token_ids = tok.special_token_ids, tok.byte_token_ids

        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return tok.decode(ids, skip_special_tokens)

    prompt = tok.encode("Once upon a time, " * 50)
    output = tok.encode(" the café served 日本 tea 😀!" * 100, add_special_tokens=False)
    detok = IncrementalDetokenizer(Spy(), prompt)
    text = "".join(detok.push([i]) for i in output) + detok.flush()
    assert text == continuation(tok, prompt, output)
    assert len(output) > 2000 and max(calls) <= 16
