"""The router's side of `DecodeNode.Streams` (decode/streams.py): one call per node carries every stream the
router has on it, each given to its request as the async iterator its own Continue or Generate call would be.

Per relayed token the router then receives a share of one message instead of a whole one, and when it falls
behind (its clients, or its own loop) the node's batches bring several tokens per stream, which each stream
hands on as one message (`merged`): the cost per token falls as the load rises. A batch is acknowledged as
soon as it is read, so at low load nothing waits.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

import grpc

from baton.common.messages import LOST_NODE_KEY, merged
from baton.v1 import baton_pb2 as pb
from baton.v1 import node_pb2, node_pb2_grpc

log = logging.getLogger(__name__)

_NO_METADATA = grpc.aio.Metadata()


def _error(code: grpc.StatusCode, details: str, lost_node: str | None = None) -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata((LOST_NODE_KEY, lost_node)) if lost_node is not None else _NO_METADATA
    return grpc.aio.AioRpcError(code, _NO_METADATA, trailing, details)


class FeederFailed(Exception):
    """The call a stream's first message depended on failed first; `error` is its error."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class NodeStream:
    """One request's responses from its node, in order, as an async iterator (`async for response in stream`);
    ends as its node ended it, raising `grpc.aio.AioRpcError` for any status but OK. `cancel()` gives it up
    (the node cancels it; a no-op once it has ended). Responses that queued up come out merged.

    `timeout`: the request's deadline (DEADLINE_EXCEEDED), as its own call would have had it. `silence`: once
    its consumer has waited that long for a message, it ends with TimeoutError (only the wait for the node
    counts: a slow consumer is not a silent node). `feeder`: a call its first message depends on (the prefill
    call sending the K/V); if that fails before the first message comes, it ends at once with FeederFailed
    instead of waiting out the silence. Both give the stream up on its node (fenced off: whatever the node
    sends later reaches nobody). The silence is timed lazily, one timer per `silence` seconds of waiting at
    most, not one per message: this runs once per relayed token."""

    __slots__ = ("request_id", "_owner", "_queue", "_waiter", "_done", "_error", "_timer", "_silence",
                 "_silence_timer", "_waiting_since", "_feeder")

    def __init__(self, owner: NodeStreams, request_id: str, timeout: float | None, silence: float | None = None,
                 feeder: asyncio.Future | None = None) -> None:
        self.request_id = request_id
        self._owner = owner
        self._queue: deque[pb.GenerateResponse] = deque()
        self._waiter: asyncio.Future | None = None
        self._done = False
        self._error: BaseException | None = None
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(timeout, self._expire) if timeout is not None else None
        self._silence = silence
        self._silence_timer: asyncio.TimerHandle | None = None
        self._waiting_since = 0.0
        self._feeder = feeder
        if feeder is not None:
            feeder.add_done_callback(self._fed)

    @property
    def ended(self) -> bool:
        """Its node ended it, or its call did (what it sent may still be waiting to be read)."""
        return self._done

    def __aiter__(self) -> NodeStream:
        return self

    async def __anext__(self) -> pb.GenerateResponse:
        queue = self._queue
        while not queue:
            if self._done:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            if self._silence is not None:
                self._waiting_since = loop.time()
                if self._silence_timer is None:
                    self._silence_timer = loop.call_at(self._waiting_since + self._silence, self._silent)
            try:
                await self._waiter
            finally:
                self._waiter = None
        if len(queue) == 1:
            return queue.popleft()
        responses = merged(list(queue))
        queue.clear()
        queue.extend(responses[1:])
        return responses[0]

    def cancel(self) -> None:
        self._give_up(_error(grpc.StatusCode.CANCELLED, "cancelled by the router"))

    def put(self, response: pb.GenerateResponse) -> None:
        self._queue.append(response)
        if self._feeder is not None:  # the first message: what the feeder does from now on does not matter
            self._feeder.remove_done_callback(self._fed)
            self._feeder = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def end(self, error: BaseException | None) -> None:
        """Its node ended it (`error` None: OK), or its call did, or the router gave it up."""
        if self._done:
            return
        self._done, self._error = True, error
        for timer in (self._timer, self._silence_timer):
            if timer is not None:
                timer.cancel()
        if self._feeder is not None:
            self._feeder.remove_done_callback(self._fed)
            self._feeder = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _expire(self) -> None:  # the request's deadline, as its own call would have had it
        self._timer = None
        self._give_up(_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))

    def _silent(self) -> None:
        self._silence_timer = None
        waiter = self._waiter
        if self._done or waiter is None or waiter.done():
            return  # not waiting for the node now: the next wait starts the timer again
        loop = asyncio.get_running_loop()
        due = self._waiting_since + self._silence
        if loop.time() >= due:
            self._give_up(TimeoutError(f"no message within {self._silence:g} s"))
        else:  # this wait began after the timer was set: it runs to its own end
            self._silence_timer = loop.call_at(due, self._silent)

    def _fed(self, feeder: asyncio.Future) -> None:
        self._feeder = None
        if not feeder.cancelled() and feeder.exception() is not None:
            self._give_up(FeederFailed(feeder.exception()))

    def _give_up(self, error: BaseException) -> None:
        if not self._done:
            self._owner.cancel(self.request_id)
            self.end(error)


class _Call:
    """One `Streams` call and what belongs to it alone: what its next write sends, the event that wakes its
    writer, the batches read on it. (A broken call's writer may still be waking up when the next call starts:
    sharing any of this with it would let it take the new call's wake-up.)"""

    __slots__ = ("grpc", "outbox", "wake", "read", "over")

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self.grpc = call
        self.outbox = node_pb2.StreamsRequest()
        self.wake = asyncio.Event()
        self.read = 0
        self.over = False

    def send(self) -> None:
        self.wake.set()


class NodeStreams:
    """The router's streams on one node, and the `Streams` call that carries them: opened with the first
    stream, and again with the next one after a call broke (every stream open on a broken call ends with
    its error, as its own call would have)."""

    def __init__(self, stub: node_pb2_grpc.DecodeNodeStub) -> None:
        self._stub = stub
        self._call: _Call | None = None
        self._streams: dict[str, NodeStream] = {}  # the open streams, all on the current call
        self._tasks: set[asyncio.Task] = set()

    def generate(self, request: node_pb2.NodeGenerateRequest, timeout: float | None,
                 silence: float | None = None) -> NodeStream:
        """A colocated request, as `DecodeNode.Generate` would run it (`NodeStream` says what the rest is)."""
        stream, call = self._open(request.request_id, timeout, silence)
        call.outbox.generate.append(request)
        return stream

    def cont(self, request: node_pb2.ContinueRequest, timeout: float | None, silence: float | None = None,
             feeder: asyncio.Future | None = None) -> NodeStream:
        """A prefilled request, as `DecodeNode.Continue` would run it (`NodeStream` says what the rest is)."""
        stream, call = self._open(request.request_id, timeout, silence, feeder)
        call.outbox.continues.append(request)
        return stream

    def cancel(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None and self._call is not None:
            self._call.outbox.cancel.append(request_id)
            self._call.send()

    def _open(self, request_id: str, timeout: float | None, silence: float | None = None,
              feeder: asyncio.Future | None = None) -> tuple[NodeStream, _Call]:
        if request_id in self._streams:
            raise ValueError(f"request_id: {request_id!r} is already open on this node")
        call = self._call
        if call is None:
            call = self._call = _Call(self._stub.Streams())
            for work in (self._reading(call), self._writing(call)):
                task = asyncio.ensure_future(work)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        stream = self._streams[request_id] = NodeStream(self, request_id, timeout, silence, feeder)
        call.send()
        return stream, call

    async def _writing(self, call: _Call) -> None:
        """One write at a time (grpc's rule), each with all that was asked since the last."""
        try:
            while True:
                await call.wake.wait()
                call.wake.clear()
                if call.over:
                    return
                request, call.outbox = call.outbox, node_pb2.StreamsRequest()
                await call.grpc.write(request)
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as e:
            log.debug("streams call: write failed: %s", e)  # the call is over: its reader says how

    async def _reading(self, call: _Call) -> None:
        error: grpc.aio.AioRpcError | None = None
        try:
            while True:
                batch = await call.grpc.read()
                if batch is grpc.aio.EOF:
                    break
                call.read += 1
                call.outbox.acked = call.read
                call.send()
                streams = self._streams
                for response in batch.responses:
                    stream = streams.get(response.request_id)
                    if stream is not None:  # else given up: what a cancelled call would have dropped
                        stream.put(response)
                for end in batch.ends:
                    stream = streams.pop(end.request_id, None)
                    if stream is not None:
                        stream.end(None if end.code == 0 else _error(
                            _CODES.get(end.code, grpc.StatusCode.UNKNOWN), end.details,
                            end.lost_node if end.HasField("lost_node") else None))
        except grpc.aio.AioRpcError as e:
            error = e
        finally:
            call.over = True
            call.send()  # its writer ends
            if self._call is call:  # the next stream opens another call
                self._call = None
                streams, self._streams = self._streams, {}
                why = error or _error(grpc.StatusCode.UNAVAILABLE, "the node ended its streams")
                for stream in streams.values():
                    stream.end(why)

    async def close(self) -> None:
        if self._call is not None:
            self._call.grpc.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


_CODES = {code.value[0]: code for code in grpc.StatusCode}
