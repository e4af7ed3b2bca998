"""OpenAI's request fields (and vLLM's extensions) to baton.v1 `SamplingParams`: what the HTTP and KServe
fronts share. Types are checked here, naming the field; ranges are checked by admission, as for baton.v1."""

from __future__ import annotations

from typing import Any

from baton.engine import InvalidRequest
from baton.v1 import baton_pb2 as pb

INT32_MAX = 2**31 - 1
# baton.v1 finish reasons as OpenAI names them (both fronts report them so).
FINISH_REASONS = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_EOS: "stop",
                  pb.FINISH_REASON_CANCELLED: "abort", pb.FINISH_REASON_CONTENT_FILTER: "content_filter"}


def get(body: dict, name: str, kinds: tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise InvalidRequest(name, f"must be {what}, got {value!r}")
    return value


def integer(body: dict, name: str, low: int = 0, high: int = INT32_MAX) -> int | None:
    value = get(body, name, (int,), "an integer")
    if value is not None and not low <= value <= high:
        raise InvalidRequest(name, f"must be in [{low}, {high}], got {value}")
    return value


def number(body: dict, name: str) -> float | None:
    value = get(body, name, (int, float), "a number")
    return None if value is None else float(value)


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequest("stop", "must be a string or a list of strings")
    return stop


def sampling(body: dict, max_tokens_field: str = "max_tokens") -> pb.SamplingParams:
    """baton.v1 sampling from OpenAI's fields (and vLLM's extensions); ranges are checked by admission."""
    params = pb.SamplingParams()
    max_tokens = integer(body, max_tokens_field, 1)
    if max_tokens is not None:
        params.max_tokens = max_tokens
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
        if (value := number(body, name)) is not None:
            setattr(params, name, value)
    top_k = integer(body, "top_k", -1)
    if top_k is not None and top_k > 0:  # vLLM's -1 and 0 both mean off
        params.top_k = top_k
    if (seed := integer(body, "seed", 0, 2**63 - 1)) is not None:
        params.seed = seed
    if (min_tokens := integer(body, "min_tokens")) is not None:
        params.min_tokens = min_tokens
    params.stop.extend(_stop(body))
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and
                                                 0 <= t <= INT32_MAX for t in stop_ids):
        raise InvalidRequest("stop_token_ids", "must be a list of token ids")
    params.stop_token_ids.extend(stop_ids)
    params.ignore_eos = bool(get(body, "ignore_eos", (bool,), "a boolean"))
    params.include_stop_str_in_output = bool(get(body, "include_stop_str_in_output", (bool,), "a boolean"))
    return params
