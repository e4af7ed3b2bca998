"""A stream resumed from the tokens its client already has (its node or its router failed) whose tokens
already end it: the failure came between its last token and its Finish. What the client still lacks, the
text held back while a stop string could be completing and the Finish, is worked out here from the tokens,
as the engine would have at that token: the same rule for where a request ends (`engine/stops.py`), and the
same text, built by the engine's own `SequenceOutput` fed the same tokens. Nothing is sent to a node (it would
sample a token past the end)."""

from __future__ import annotations

from baton.engine.output import SequenceOutput
from baton.engine.request import FinishReason, SamplingParams
from baton.engine.stops import token_finish
from baton.engine.tokenizer import Tokenizer
from baton.v1 import baton_pb2 as pb

_REASONS = {FinishReason.EOS: pb.FINISH_REASON_EOS, FinishReason.STOP: pb.FINISH_REASON_STOP,
            FinishReason.LENGTH: pb.FINISH_REASON_LENGTH}


def end(tokenizer: Tokenizer, prompt: list[int], delivered: list[int], chars: int, params: SamplingParams,
        eos_token_ids: tuple[int, ...], request_id: str) -> list[pb.GenerateResponse] | None:
    """The last responses of a stream that its delivered tokens' last one ends (by token id, length or stop
    string): its held-back text (if any), then its Finish. None if the stream goes on."""
    if not delivered:
        return None
    by_token = token_finish(delivered[-1], params, eos_token_ids, len(delivered) >= params.max_tokens)
    output = SequenceOutput(tokenizer, prompt, params)
    output.replay(delivered[:-1], 0)  # the text before the last token, as the engine had it
    if output.add(delivered[-1], len(delivered), finishing=by_token is not None):
        reason = pb.FINISH_REASON_STOP
    elif by_token is None:
        return None
    else:
        reason = _REASONS[by_token]
    responses = []
    if len(output.text) > chars:
        chunk = pb.TokenChunk(index=len(delivered), text=output.text[chars:])
        responses.append(pb.GenerateResponse(request_id=request_id, chunk=chunk))
    responses.append(pb.GenerateResponse(request_id=request_id, finish=pb.Finish(reason=reason)))
    return responses
