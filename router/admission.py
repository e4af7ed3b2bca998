"""Validates a client's GenerateRequest before any node is involved: every field, with the field named."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from baton.common.messages import sampling_from_proto
from baton.engine import InvalidRequest, SamplingParams
from baton.engine.detokenizer import IncrementalDetokenizer
from baton.engine.tokenizer import Tokenizer
from baton.v1 import baton_pb2 as pb

MAX_REQUEST_ID_LEN = 256

# How many input bytes a normalizer may fold into one byte of the text the tokenizer sees: NFKC maps the
# 3-byte full-width "Ａ" to the 1-byte "A", NFC composes three Hangul jamo (9 bytes) into one 3-byte
# syllable; 4 covers those with room. What drops text outright has no safe factor (a normalizer that strips
# control characters or accents, a Whitespace pre-tokenizer, unknown characters fused into one <unk>): such
# tokenizers need `ModelCard.max_prompt_bytes` set by hand. The byte-fallback and byte-level BPE tokenizers
# of Llama, Mistral and Qwen2 drop nothing.
NORMALIZER_SHRINK = 4


class UnknownModel(LookupError):
    pass


@dataclass(frozen=True, slots=True)
class ModelCard:
    """What the router knows of the served model: enough to validate and tokenize, no weights."""

    id: str
    architecture: str
    max_model_len: int
    vocab_size: int
    dtype: str
    # The longest prompt text admitted, in UTF-8 bytes, checked before tokenizing it. 0: derived from the
    # tokenizer (`with_prompt_bound`); a deployment whose tokenizer defeats the derivation sets it.
    max_prompt_bytes: int = 0
    eos_token_ids: tuple[int, ...] = ()  # the model's end-of-sequence tokens (a resumed stream may end on one)


@dataclass(slots=True)
class Admitted:
    request_id: str  # the client's, echoed back
    internal_id: str  # unique in the cluster: what the nodes see
    prompt_ids: list[int]
    params: SamplingParams  # validated: what the router itself needs of them (max_tokens)
    sampling: pb.SamplingParams  # the client's message as the nodes get it (seed filled in), not re-encoded
    nodes: tuple[str, str] = ("", "")  # (prefill, decode) node ids, once picked
    resumed: list[int] = field(default_factory=list)  # tokens the client already has (GenerateRequest.resume)
    resumed_chars: int = 0  # and the characters of their text
    model: Any = None  # the models.ServedModel it asked for (set by the router once admitted)
    key: Any = None  # the caller's common.keys.KeyRecord (with `--auth`)
    hold: Any = None  # what it reserved against the key's limits (limits.Hold), settled when it ends
    slot: Any = None  # its place with the nodes (flow.Slot), released when it ends
    screen: Any = None  # the content rules its output goes through (rules.OutputScreen), if any apply


def max_token_bytes(tokenizer: Tokenizer) -> int:
    """The most UTF-8 bytes of a client's text that one token can stand for.

    A token covers a piece of the text after normalization and pre-tokenization, and its vocabulary string
    is that piece as the tokenizer's model sees it: spaces as "▁" (Metaspace) or "Ġ" (byte-level BPE),
    every byte of byte-level BPE as one character of one or two bytes, "<0x41>" for one fallback byte,
    a "##" prefix (WordPiece) that covers nothing. So the string's length bounds what the token covers; the
    token decoded alone is taken too, in case a vocabulary spells a token shorter than its text. Added
    tokens ("<s>", ...) are matched on the raw text, as spelled. A normalizer may shrink the text before
    the tokenizer sees it, hence `NORMALIZER_SHRINK`.
    """
    backend = tokenizer.backend
    vocab = backend.get_vocab(with_added_tokens=True)
    spelled = max((len(token.encode()) for token in vocab), default=1)
    decoded = backend.decode_batch([[i] for i in vocab.values()], skip_special_tokens=False)
    longest = max(spelled, max((len(text.encode()) for text in decoded), default=1))
    return longest * (NORMALIZER_SHRINK if backend.normalizer is not None else 1)


def prompt_byte_limit(tokenizer: Tokenizer, max_model_len: int) -> int:
    """The longest prompt text that can fit the context: a prompt is refused at max_model_len tokens, and
    max_model_len - 1 tokens cover at most this many bytes. Longer text is refused before tokenizing it,
    which would cost the router seconds of CPU for a multi-MB prompt."""
    return (max_model_len - 1) * max_token_bytes(tokenizer)


def with_prompt_bound(model: ModelCard, tokenizer: Tokenizer) -> ModelCard:
    """`model` with `max_prompt_bytes` set: as configured, else derived from the tokenizer (this walks the
    whole vocabulary, so callers keep the card it returns)."""
    if model.max_prompt_bytes > 0:
        return model
    return replace(model, max_prompt_bytes=prompt_byte_limit(tokenizer, model.max_model_len))


def check_text_size(field: str, text: str, model: ModelCard) -> None:
    """Refuses text longer, in UTF-8 bytes, than any text that fits the model's context."""
    if len(text) > model.max_prompt_bytes:  # at least one byte per character: no need to encode it
        size = f"{len(text)} characters"
    elif (n := len(text.encode())) > model.max_prompt_bytes:
        size = f"{n} bytes"
    else:
        return
    raise InvalidRequest(field, f"{size} of text, more than the {model.max_prompt_bytes} bytes that the "
                                f"model's context ({model.max_model_len} tokens) can hold")


def admit(request: pb.GenerateRequest, model: ModelCard, tokenizer: Tokenizer, rng: random.Random) -> Admitted:
    """Raises `InvalidRequest` (INVALID_ARGUMENT) or `UnknownModel` (NOT_FOUND). Pass a card from
    `with_prompt_bound` (else the bound is derived again on every call)."""
    if len(request.request_id) > MAX_REQUEST_ID_LEN:
        raise InvalidRequest("request_id", f"longer than {MAX_REQUEST_ID_LEN} characters")
    if request.model and request.model != model.id:
        raise UnknownModel(f"model: {request.model!r} is not served here (this cluster serves {model.id!r})")
    model = with_prompt_bound(model, tokenizer)
    kind = request.WhichOneof("prompt")
    if kind == "text":
        if not request.text:
            raise InvalidRequest("prompt", "is empty")
        check_text_size("prompt", request.text, model)  # before the tokenizer spends time on it
        ids = tokenizer.encode(request.text)
    elif kind == "token_ids":
        ids = request.token_ids.ids
        _check_prompt_length(len(ids), model)  # before a pass over millions of ids
        if any(not 0 <= t < model.vocab_size for t in ids):
            raise InvalidRequest("prompt", f"token ids must be in [0, {model.vocab_size})")
        ids = list(ids)
    else:
        raise InvalidRequest("prompt", "is empty (set text or token_ids)")
    if not ids:
        raise InvalidRequest("prompt", "is empty")
    _check_prompt_length(len(ids), model)
    params = sampling_from_proto(request.sampling)
    if len(ids) + params.max_tokens > model.max_model_len:  # as vLLM's and TGI's servers refuse it
        raise InvalidRequest(
            "max_tokens", f"{len(ids)} prompt + {params.max_tokens} new tokens exceed the model's context "
            f"({model.max_model_len})",
        )
    sampling = request.sampling  # forwarded as it came: each node converts it once, as the router did here
    if not params.greedy and params.seed is None:
        # Prefill and decode nodes sample from the same per-request generator only if they share its seed.
        params = replace(params, seed=rng.getrandbits(63))
        sampling = pb.SamplingParams()
        sampling.CopyFrom(request.sampling)
        sampling.seed = params.seed
    resumed = _check_resume(request, ids, params, model, tokenizer) if request.HasField("resume") else []
    request_id = request.request_id or uuid.uuid4().hex
    return Admitted(request_id, f"{request_id}#{uuid.uuid4().hex[:12]}", ids, params, sampling, resumed=resumed,
                    resumed_chars=request.resume.text_chars)


def _check_resume(request: pb.GenerateRequest, prompt: list[int], params: SamplingParams, model: ModelCard,
                  tokenizer: Tokenizer) -> list[int]:
    """The tokens a resumed stream's client has, checked against the prompt, the sampling and their text."""
    ids = request.resume.token_ids
    if len(ids) > params.max_tokens:
        raise InvalidRequest("resume.token_ids", f"{len(ids)} tokens received, more than max_tokens "
                                                 f"({params.max_tokens})")
    if any(not 0 <= t < model.vocab_size for t in ids):
        raise InvalidRequest("resume.token_ids", f"token ids must be in [0, {model.vocab_size})")
    if ids and not params.greedy and not request.sampling.HasField("seed"):
        # A seed the first router drew is unknown here: the rest of the stream would not be the same.
        raise InvalidRequest("resume", "a sampled stream resumes only with the seed it started with "
                                       "(set sampling.seed)")
    # The text those tokens make, as the engine streams it (held-back characters and bytes included).
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    text = detokenizer.push(ids) + detokenizer.flush() if ids else ""
    if request.resume.text_chars > len(text):
        raise InvalidRequest("resume.text_chars", f"{request.resume.text_chars} characters received, the tokens "
                                                  f"make {len(text)}")
    return list(ids)


def _check_prompt_length(n: int, model: ModelCard) -> None:
    if n >= model.max_model_len:
        raise InvalidRequest("prompt", f"{n} tokens, the model's context is {model.max_model_len}")
