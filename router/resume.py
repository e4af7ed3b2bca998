"""A stream resumed from the tokens its client already has (its node or its router failed) whose tokens
already end it: the failure came between its last token and its Finish. What the client still lacks, the
text held back while a stop string could be completing and the Finish, is worked out here from the tokens,
as the engine would have at that token; nothing is sent to a node (it would sample a token past the end)."""

from __future__ import annotations

from baton.engine import SamplingParams
from baton.engine.detokenizer import IncrementalDetokenizer
from baton.engine.tokenizer import Tokenizer
from baton.v1 import baton_pb2 as pb


def ended(delivered: list[int], params: SamplingParams, eos_token_ids: tuple[int, ...]) -> int | None:
    """The finish reason the delivered tokens already carry (LENGTH, EOS or STOP by token id), None if the
    stream goes on. A stop string is found with the text (`rest`)."""
    if not delivered:
        return None
    last = delivered[-1]
    if not params.ignore_eos and last in eos_token_ids:
        return pb.FINISH_REASON_EOS
    if last in params.stop_token_ids:
        return pb.FINISH_REASON_STOP
    if len(delivered) >= params.max_tokens:
        return pb.FINISH_REASON_LENGTH
    return None


def rest(tokenizer: Tokenizer, prompt: list[int], delivered: list[int], chars: int, params: SamplingParams,
         reason: int, request_id: str) -> list[pb.GenerateResponse]:
    """The ended stream's last responses: its held-back text (if any), then its Finish."""
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    floor = -1  # a stop string counts only if it ends after this character (min_tokens, as the engine checks)
    if params.stop and params.min_tokens >= 2:
        text = ""
        for i, token in enumerate(delivered):
            text += detokenizer.push([token])
            if i == params.min_tokens - 2:  # the text before the token that reaches min_tokens
                floor = len(text)
        text += detokenizer.flush()
    else:
        text = detokenizer.push(delivered) + detokenizer.flush()
    if params.stop:  # only a match the delivered text did not end before can be new
        start = max(0, chars - max(map(len, params.stop)) + 1)
        hits = [(i, s) for s in params.stop if (i := _find_after(text, s, start, floor)) >= 0]
        if hits:
            cut, stop = min(hits)
            text = text[: cut + (len(stop) if params.include_stop_str_in_output else 0)]
            reason = pb.FINISH_REASON_STOP
    responses = []
    if len(text) > chars:
        responses.append(pb.GenerateResponse(request_id=request_id, chunk=pb.TokenChunk(index=len(delivered),
                                                                                       text=text[chars:])))
    responses.append(pb.GenerateResponse(request_id=request_id, finish=pb.Finish(reason=reason)))
    return responses


def _find_after(text: str, stop: str, start: int, floor: int) -> int:
    """The first occurrence of `stop` in text[start:] that ends after character `floor`, or -1."""
    at = text.find(stop, start)
    while 0 <= at and at + len(stop) <= floor:
        at = text.find(stop, at + 1)
    return at
