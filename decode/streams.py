"""`DecodeNode.Streams`: every stream a router has on this node, on one call.

Per token, a call per stream costs the router a message received and one sent; at a few hundred streams that
is most of its CPU. On this call the node sends one batch per turn of its event loop with what every stream
produced since the last, and keeps at most `WINDOW` batches ahead of what the router has read: when the router
falls behind, the node's outputs wait here and go out together (each stream's coalesced, `merged`), so the
router handles several tokens per message instead of falling further behind. At low load each batch leaves as
soon as it is made: nothing waits for an acknowledgement that has not come back within an engine step.

Each stream runs exactly as its own Continue or Generate call would (same code, through `_StreamContext`),
and ends with the status that call would have had (`StreamEnd`). The router cancels a stream by naming it;
the call's end (the router went away) cancels all of them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import grpc

from baton.common.messages import LOST_NODE_KEY, merged
from baton.v1 import baton_pb2 as pb
from baton.v1 import node_pb2

log = logging.getLogger(__name__)

WINDOW = 2  # batches sent ahead of the router's acknowledgement


class _StreamContext:
    """What Continue and Generate use of a grpc context, for a stream on a `Streams` call: `abort` raises
    (as grpc's does) and keeps the status for the stream's `StreamEnd`."""

    __slots__ = ("_code", "_details", "_trailing")

    def __init__(self) -> None:
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self._trailing: tuple = ()

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: tuple = ()) -> None:
        self._code, self._details = code, details
        if trailing_metadata:
            self._trailing = tuple(trailing_metadata)
        raise grpc.aio.AbortError()

    def set_trailing_metadata(self, metadata) -> None:
        self._trailing = tuple(metadata)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def end(self, request_id: str) -> node_pb2.StreamEnd:
        end = node_pb2.StreamEnd(request_id=request_id, code=self._code.value[0], details=self._details)
        for key, value in self._trailing:
            if key == LOST_NODE_KEY:
                end.lost_node = value
        return end


Opener = Callable[[object, _StreamContext], AsyncIterator[pb.GenerateResponse]]


class StreamsCall:
    """One router's `Streams` call: its open streams (a task each), what they produced and not yet sent,
    and the batches sent and acknowledged. `closing()` says the node is stopping: streams opened from then
    on are refused (UNAVAILABLE, naming the node, so the router resumes them elsewhere), and the call ends
    once its last stream has."""

    def __init__(self, node_id: str, generate: Opener, cont: Opener, closing: Callable[[], bool]) -> None:
        self._node_id = node_id
        self._generate, self._continue, self._closing = generate, cont, closing
        self._tasks: dict[str, asyncio.Task] = {}
        self._responses: dict[str, list[pb.GenerateResponse]] = {}  # request id -> queued, in order
        self._ends: list[node_pb2.StreamEnd] = []
        self._sent = self._acked = 0
        self._wake = asyncio.Event()
        self._router_left = False

    async def serve(self, requests: AsyncIterator[node_pb2.StreamsRequest]) -> AsyncIterator[node_pb2.StreamsBatch]:
        reader = asyncio.ensure_future(self._read(requests))
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._router_left:
                    return
                if (self._responses or self._ends) and self._sent - self._acked < WINDOW:
                    self._sent += 1
                    yield self._batch()
                if self._closing() and not self._tasks and not self._responses and not self._ends:
                    return
        finally:
            reader.cancel()
            for task in list(self._tasks.values()):  # the router went away, or the node stops: cancels each
                task.cancel()

    def wake(self) -> None:
        self._wake.set()

    def _batch(self) -> node_pb2.StreamsBatch:
        batch = node_pb2.StreamsBatch(ends=self._ends)
        for queued in self._responses.values():
            batch.responses.extend(merged(queued))
        self._responses, self._ends = {}, []
        return batch

    async def _read(self, requests: AsyncIterator[node_pb2.StreamsRequest]) -> None:
        try:
            async for request in requests:
                for r in request.generate:
                    self._open(r, self._generate)
                for r in request.continues:
                    self._open(r, self._continue)
                for request_id in request.cancel:
                    task = self._tasks.get(request_id)
                    if task is not None:
                        task.cancel()
                if request.acked > self._acked:
                    self._acked = request.acked
                self._wake.set()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:  # the call broke
            log.debug("streams call ended: %s", e)
        self._router_left = True  # the router never half-closes: its side ending means it went away
        self._wake.set()

    def _open(self, request, opener: Opener) -> None:
        rid = request.request_id
        if rid in self._tasks:
            self._ends.append(node_pb2.StreamEnd(request_id=rid, code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                                 details=f"request_id: {rid!r} is already open on this call"))
        elif self._closing():
            self._ends.append(node_pb2.StreamEnd(request_id=rid, code=grpc.StatusCode.UNAVAILABLE.value[0],
                                                 details=f"node {self._node_id} is stopping",
                                                 lost_node=self._node_id))
        else:
            self._tasks[rid] = asyncio.ensure_future(self._run(rid, request, opener))

    async def _run(self, rid: str, request, opener: Opener) -> None:
        context = _StreamContext()
        end: node_pb2.StreamEnd | None = None
        try:
            async for response in opener(request, context):
                queued = self._responses.get(rid)
                if queued is None:
                    self._responses[rid] = [response]
                    self._wake.set()
                else:
                    queued.append(response)
            end = node_pb2.StreamEnd(request_id=rid)
        except grpc.aio.AbortError:
            end = context.end(rid)
        except asyncio.CancelledError:  # the router cancelled it (no end: it no longer listens), or left
            self._responses.pop(rid, None)
        except Exception as e:  # as grpc would answer a handler that raised
            log.exception("stream %s failed", rid)
            end = node_pb2.StreamEnd(request_id=rid, code=grpc.StatusCode.UNKNOWN.value[0],
                                     details=f"{type(e).__name__}: {e}")
        finally:
            del self._tasks[rid]
            if end is not None:
                self._ends.append(end)
            self._wake.set()
