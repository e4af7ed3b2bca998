"""What a request asks for (`SamplingParams`) and what the engine hands back (`RequestOutput`)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from .errors import InvalidRequest


def _is_finite(value: object) -> bool:
    """A real number (numpy's included), neither infinite nor NaN."""
    try:
        return math.isfinite(value)
    except TypeError:  # not a number at all
        return False


MAX_TOP_LOGPROBS = 20  # as OpenAI's API


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_tokens, or the model's context, reached
    STOP = "stop"  # a stop string or one of the request's stop_token_ids
    EOS = "eos"  # the checkpoint's end-of-sequence token
    ABORT = "cancelled"  # aborted by the caller


@dataclass(slots=True)
class SamplingParams:
    """Per-request generation settings. `temperature == 0` is greedy; `top_k == 0` and `top_p == 1` are off.

    The penalties and `min_p` follow vLLM (and OpenAI for presence/frequency); each default is off:
    `presence_penalty` and `frequency_penalty` lower a token's logit by `frequency_penalty * n + presence_penalty
    * (n > 0)`, n its count among the tokens generated so far; `repetition_penalty` divides the positive logit
    of every token in the prompt or the generated tokens and multiplies the negative ones; `min_p` (sampled
    rows) drops tokens less probable than `min_p` times the top token; until `min_tokens` tokens are generated,
    the model's EOS ids and `stop_token_ids` cannot be sampled and stop strings are not looked for.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    min_tokens: int = 0
    top_logprobs: int = 0  # also report the k most likely tokens of each step (their model log-probabilities)

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequest("max_tokens", f"must be a positive integer, got {self.max_tokens!r}")
        # Floats arrive from the wire as any IEEE value: infinities and NaN are refused with the field named.
        if not (_is_finite(self.temperature) and self.temperature >= 0):
            raise InvalidRequest("temperature", f"must be a finite number >= 0, got {self.temperature!r}")
        if not (_is_finite(self.top_p) and 0 < self.top_p <= 1):
            raise InvalidRequest("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequest("top_k", f"must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise InvalidRequest("seed", f"must be an integer in [0, 2**63), got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequest("stop", "stop strings must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise InvalidRequest("stop_token_ids", "must be non-negative integers")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (_is_finite(value) and -2 <= value <= 2):
                raise InvalidRequest(name, f"must be in [-2, 2], got {value!r}")
        if not (_is_finite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise InvalidRequest("repetition_penalty", f"must be a finite number > 0, got {self.repetition_penalty!r}")
        if not (_is_finite(self.min_p) and 0 <= self.min_p <= 1):
            raise InvalidRequest("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if not (isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens):
            raise InvalidRequest("min_tokens", f"must be an integer in [0, max_tokens = {self.max_tokens}], "
                                 f"got {self.min_tokens!r}")
        if not (isinstance(self.top_logprobs, int) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS):
            raise InvalidRequest("top_logprobs", f"must be an integer in [0, {MAX_TOP_LOGPROBS}], got "
                                 f"{self.top_logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalised(self) -> bool:
        """Whether the sampler needs the request's prompt and generated tokens (any penalty is on)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


@dataclass(frozen=True, slots=True)
class Resumed:
    """What a stream resumed on this engine (its first node failed) has already delivered to its client: the
    tokens generated so far, indices 0..n-1, and how many characters of their text went out (the rest was
    held back while a stop string could still be completing). The sequence carries on from index n, with the
    same sampler state: sampling's randomness is a function of (seed, index) only, and the penalties count the
    delivered tokens as generated ones."""

    token_ids: tuple[int, ...] = ()
    text_chars: int = 0


@dataclass(slots=True)
class RequestOutput:
    """What one engine step produced for one request: new tokens and the text they completed."""

    request_id: str
    first_index: int  # index of token_ids[0] among the request's generated tokens
    token_ids: list[int]
    logprobs: list[float]  # log-probability of each token under the model's distribution
    text: str  # the text delta these tokens made safe to show
    finish_reason: FinishReason | None = None
    # With SamplingParams.top_logprobs: per token, the k most likely (token ids, log-probabilities), or None
    # for a token whose step this engine did not compute (a first token adopted from a prefill node).
    top_logprobs: list[tuple[list[int], list[float]] | None] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class Completion:
    """A finished request, as the offline API returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: FinishReason
