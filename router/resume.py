"""A stream resumed from the tokens its client already has (its node or its router failed) whose tokens
already end it: the failure came between its last token and its Finish. What the client still lacks, the
text held back while a stop string could be completing and the Finish, is worked out here from the tokens,
as the engine would have at that token (the same detokenizer fed the same tokens one by one, the same stop-string
rule, `engine/stops.py`); nothing is sent to a node (it would sample a token past the end)."""

from __future__ import annotations

from baton.engine import SamplingParams
from baton.engine.detokenizer import IncrementalDetokenizer
from baton.engine.stops import stop_at
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
    # Token by token, as the engine built it: the text before the last token, then what the last one added.
    text = "".join(detokenizer.push([token]) for token in delivered[:-1])
    new_from = len(text)
    text += detokenizer.push(delivered[-1:]) + detokenizer.flush()  # the engine flushes at a finishing token
    if (cut := stop_at(text, new_from, params, len(delivered))) is not None:
        text, reason = text[:cut], pb.FINISH_REASON_STOP
    responses = []
    if len(text) > chars:
        responses.append(pb.GenerateResponse(request_id=request_id, chunk=pb.TokenChunk(index=len(delivered),
                                                                                       text=text[chars:])))
    responses.append(pb.GenerateResponse(request_id=request_id, finish=pb.Finish(reason=reason)))
    return responses
