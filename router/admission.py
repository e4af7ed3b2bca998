"""Validates a client's GenerateRequest before any node is involved: every field, with the field named."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, replace

from baton.cluster.messages import sampling_from_proto
from baton.engine import InvalidRequest, SamplingParams
from baton.engine.tokenizer import Tokenizer
from baton.v1 import baton_pb2 as pb

MAX_REQUEST_ID_LEN = 256


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


@dataclass(slots=True)
class Admitted:
    request_id: str  # the client's, echoed back
    internal_id: str  # unique in the cluster: what the nodes see
    prompt_ids: list[int]
    params: SamplingParams
    logprobs: bool
    nodes: tuple[str, str] = ("", "")  # (prefill, decode) node ids, once picked


def admit(request: pb.GenerateRequest, model: ModelCard, tokenizer: Tokenizer, rng: random.Random) -> Admitted:
    """Raises `InvalidRequest` (INVALID_ARGUMENT) or `UnknownModel` (NOT_FOUND)."""
    if len(request.request_id) > MAX_REQUEST_ID_LEN:
        raise InvalidRequest("request_id", f"longer than {MAX_REQUEST_ID_LEN} characters")
    if request.model and request.model != model.id:
        raise UnknownModel(f"model: {request.model!r} is not served here (this cluster serves {model.id!r})")
    kind = request.WhichOneof("prompt")
    if kind == "text":
        if not request.text:
            raise InvalidRequest("prompt", "is empty")
        ids = tokenizer.encode(request.text)
    elif kind == "token_ids":
        ids = list(request.token_ids.ids)
        if any(not 0 <= t < model.vocab_size for t in ids):
            raise InvalidRequest("prompt", f"token ids must be in [0, {model.vocab_size})")
    else:
        raise InvalidRequest("prompt", "is empty (set text or token_ids)")
    if not ids:
        raise InvalidRequest("prompt", "is empty")
    if len(ids) >= model.max_model_len:
        raise InvalidRequest("prompt", f"{len(ids)} tokens, the model's context is {model.max_model_len}")
    params = sampling_from_proto(request.sampling)
    if len(ids) + params.max_tokens > model.max_model_len:  # as vLLM's and TGI's servers refuse it
        raise InvalidRequest(
            "max_tokens", f"{len(ids)} prompt + {params.max_tokens} new tokens exceed the model's context "
            f"({model.max_model_len})",
        )
    if not params.greedy and params.seed is None:
        # Prefill and decode nodes sample from the same per-request generator only if they share its seed.
        params = replace(params, seed=rng.getrandbits(63))
    request_id = request.request_id or uuid.uuid4().hex
    return Admitted(request_id, f"{request_id}#{uuid.uuid4().hex[:12]}", ids, params, request.sampling.logprobs)
