"""Where a request ends: at a token (`token_finish`), or at a stop string in its text (`stop_at`), and how much
of its text is held back until that is known (`held_back`).

Two places must agree on it to the character: the engine, which checks each token as it is generated, and
the router, which works out the end of a stream whose tokens reached its client but whose Finish did not
(`router/resume.py`). Both ask this module; neither decides an end itself. It is torch-free: the router
imports it.

The rule, checked once per generated token on the text that token completed (vLLM's stop checker too):
- nothing is looked for before the token that brings the output to `min_tokens` tokens;
- only a stop string that ends in the text this token added counts: an earlier one was looked for at its own
  token (or lay before `min_tokens` and is let be);
- of those, the one that starts first wins (on a tie, the first in `stop`); the text ends where it starts, or
  where it ends with `include_stop_str_in_output`.
While a request goes on, the last `held_back` characters are not shown: the next token could complete a stop
string that starts there, and text once shown cannot be taken back.
"""

from __future__ import annotations

from collections.abc import Container

from .request import FinishReason, SamplingParams


def token_finish(token: int, params: SamplingParams, eos_token_ids: Container[int], at_max_len: bool) -> \
        FinishReason | None:
    """Why the generated `token` ends its request, if it does (before any stop string is looked for):
    `at_max_len` says the request reached max_tokens (or the model's context) with it."""
    if not params.ignore_eos and token in eos_token_ids:
        return FinishReason.EOS
    if token in params.stop_token_ids:
        return FinishReason.STOP
    return FinishReason.LENGTH if at_max_len else None


def stop_at(text: str, new_from: int, params: SamplingParams, num_output_tokens: int) -> int | None:
    """The length `text` is cut to if a stop string ends in `text[new_from:]` (what the newest token added),
    None if none does. `num_output_tokens`: the request's generated tokens, the newest included."""
    if not params.stop or num_output_tokens < params.min_tokens:
        return None
    best: tuple[int, int] | None = None  # (where the stop string starts, where the text is cut)
    for stop in params.stop:
        # The first occurrence that starts here or later is the first one that ends after new_from.
        at = text.find(stop, max(0, new_from - len(stop) + 1))
        if at >= 0 and (best is None or at < best[0]):
            best = (at, at + len(stop) if params.include_stop_str_in_output else at)
    return None if best is None else best[1]


def held_back(params: SamplingParams) -> int:
    """How many characters at the end of an unfinished request's text are not shown yet: as many as a stop
    string could have there before the next token completes it."""
    return max(map(len, params.stop)) - 1 if params.stop else 0
