"""Conversions between the wire messages (`baton.v1`) and the engine's request types, and gRPC status mapping.
Torch-free: the router uses it (the KV-side conversions are in `kv_messages`)."""

from __future__ import annotations

import grpc

from baton.engine import FieldError, FinishReason, NoCapacity, RequestOutput, Resumed, SamplingParams
from baton.v1 import baton_pb2 as pb
from baton.v1 import node_pb2

DEFAULT_MAX_TOKENS = 16
# Trailing metadata of a node's UNAVAILABLE that is about another node: its id ("" when it cannot tell which of
# the two failed), so that the router resumes the request on nodes other than that one.
LOST_NODE_KEY = "baton-lost-node"
# The options of a channel from one cluster process to a node (router -> node, prefill -> decode). grpc's
# reconnect backoff grows to 120 s: a node back on its address (restarted) would be refused by a channel
# waiting out its backoff; capped at 1 s, as for etcd (common/membership.py). And a subchannel of the
# channel's own: grpc shares them between channels to one address, so the fresh channel that replaces a
# failed one would take over its failed connection, backoff and all.
NODE_CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                        ("grpc.max_reconnect_backoff_ms", 1000), ("grpc.use_local_subchannel_pool", 1))

_FINISH = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.ABORT: pb.FINISH_REASON_CANCELLED,
}


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Raises `InvalidRequest` naming the field (SamplingParams validates every one)."""
    return SamplingParams(
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else DEFAULT_MAX_TOKENS,
        temperature=msg.temperature if msg.HasField("temperature") else 1.0,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        top_k=msg.top_k,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=list(msg.stop),
        stop_token_ids=list(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        include_stop_str_in_output=msg.include_stop_str_in_output,
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0,
        min_p=msg.min_p,
        min_tokens=msg.min_tokens,
        top_logprobs=msg.top_logprobs,
    )


def resumed_from_proto(msg: node_pb2.Resumed) -> Resumed | None:
    """None for a stream on its first nodes (the engine checks the rest, naming `resumed.*`)."""
    return Resumed(tuple(msg.token_ids), msg.text_chars) if msg.token_ids else None


def chunk_from_output(out: RequestOutput, logprobs: bool) -> pb.TokenChunk:
    chunk = pb.TokenChunk(index=out.first_index, token_ids=out.token_ids, text=out.text,
                          logprobs=out.logprobs if logprobs else [])
    for top in out.top_logprobs:  # empty unless the request asked for them
        entry = chunk.top_logprobs.add()
        if top is not None:
            entry.token_ids.extend(top[0])
            entry.logprobs.extend(top[1])
    return chunk


def finish_to_proto(reason: FinishReason) -> int:
    return _FINISH[reason]


def responses_from_output(
    out: RequestOutput, logprobs: bool, usage: pb.Usage | None = None
) -> list[pb.GenerateResponse]:
    """A chunk for the output's tokens (if any), then a Finish if it ended the request."""
    responses = []
    if out.token_ids or out.text:
        responses.append(pb.GenerateResponse(request_id=out.request_id, chunk=chunk_from_output(out, logprobs)))
    if out.finish_reason is not None:
        finish = pb.Finish(reason=finish_to_proto(out.finish_reason), usage=usage)
        responses.append(pb.GenerateResponse(request_id=out.request_id, finish=finish))
    return responses


def merged(responses: list[pb.GenerateResponse]) -> list[pb.GenerateResponse]:
    """One stream's queued responses with each run of chunks of one choice made one chunk (tokens, text and
    log-probabilities in order; the first one's index), so that whoever fell behind gets them in one message.
    Each choice's responses keep their order; the first response of a run is extended in place."""
    if len(responses) < 2:
        return responses
    out: list[pb.GenerateResponse] = []
    open_chunk: dict[int, pb.TokenChunk] = {}  # choice -> the chunk its next chunk joins
    for r in responses:
        if not r.HasField("chunk"):
            open_chunk.pop(r.choice, None)
            out.append(r)
            continue
        into = open_chunk.get(r.choice)
        if into is None:
            open_chunk[r.choice] = r.chunk
            out.append(r)
            continue
        c = r.chunk
        into.token_ids.extend(c.token_ids)
        into.text += c.text
        into.logprobs.extend(c.logprobs)
        into.top_logprobs.extend(c.top_logprobs)
    return out


async def abort_for(context: grpc.aio.ServicerContext, error: Exception) -> None:
    """Ends an RPC with the status that fits an engine error (never INTERNAL for bad input)."""
    if isinstance(error, FieldError):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    if isinstance(error, NoCapacity):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
    raise error
