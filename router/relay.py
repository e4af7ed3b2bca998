"""What the router does to each node response on its way to the client: the client's own request id, the usage
figures in the Finish, the request's metrics (once per relayed token: kept to one look at each response)."""

from __future__ import annotations

import time

from baton.v1 import baton_pb2 as pb

from .admission import Admitted
from .metrics import RequestMetrics


class Relay:
    """Rewrites node responses for the client (its own request id), keeps the usage figures and feeds the
    request's metrics: one look at each response, once per relayed token."""

    def __init__(self, req: Admitted, start: float, track: RequestMetrics) -> None:
        self.req = req
        self.start = start
        self.track = track
        self.ttft_ms = 0.0
        self.completion_tokens = len(req.resumed)  # a resumed stream's count goes on from what its client has
        self.first = True
        self.finished = False  # its Finish was relayed

    def see(self, response: pb.GenerateResponse) -> pb.GenerateResponse:
        response.request_id = self.req.request_id
        if response.HasField("chunk"):
            if n := len(response.chunk.token_ids):
                if self.first:
                    self.ttft_ms = (time.perf_counter() - self.start) * 1e3
                    self.first = False
                self.completion_tokens += n
                self.track.tokens(n)
        else:
            self.finished = True
            prefill_node, decode_node = self.req.nodes
            response.finish.usage.CopyFrom(pb.Usage(
                prompt_tokens=len(self.req.prompt_ids), completion_tokens=self.completion_tokens,
                ttft_ms=self.ttft_ms, e2e_ms=(time.perf_counter() - self.start) * 1e3,
                prefill_node=prefill_node, decode_node=decode_node,
            ))
        return response
