"""A request's state inside the engine: its tokens, how many have KV in the cache, and its sampler state.
What it has handed out (its text included) is its `output` (`output.py`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING


from .request import FinishReason, SamplingParams


if TYPE_CHECKING:
    from .output import SequenceOutput


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(slots=True, eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt, then generated tokens
    num_prompt_tokens: int
    params: SamplingParams
    max_len: int  # prompt + max_tokens, capped by the model's context
    seed: int | None  # sampling's randomness is a function of (seed, token index) only; None when greedy
    output: SequenceOutput | None = None  # None only for sequences made up by tests of the scheduler and runner
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed: int = 0  # tokens whose K/V are in the cache
    logprobs: list[float] = field(default_factory=list)
    # With params.top_logprobs: one entry per generated token, as logprobs (None where not computed here).
    top_logprobs: list[tuple[list[int], list[float]] | None] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prefill_only: bool = False  # a prefill node's request: stop after the first token, the decode node goes on

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
