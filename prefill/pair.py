"""The pair channel path of a prefill node's transfer (`transfer.Transfer`).

  start    a lane of the pair's generation that no other transfer holds, from `DecodePeers` (waiting while
           every lane is held); ReceiveKV tells the decode node which one (it posts its receive on that call,
           answered once its side is over); each route is opened on the rank that sends it (`NodeRanks`: one
           route between two single-rank nodes, `kvtransfer.routes`)
  confirm  every route ended (its sends waited for) and the decode node's answer in
  end      whatever ended the call early: the decode ranks still waiting get what each route owes (a cancel
           header if it had not begun, zeros for the layers it still owed); the lane goes back once the
           decode node has answered in step (received, drained after a release, or cancelled by the header:
           only then has it matched every message of the transfer). Any other end (the channel failed, the
           call failed or timed out) fails the generation, every lane of it, on every rank.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from baton.kvtransfer.channel import KVTransferError
from baton.kvtransfer.ranks import DropGeneration, EndRoutes, OpenRoute
from baton.kvtransfer.routes import TransferRoutes
from baton.v1 import node_pb2

from .peers import DecodePeer
from .transfer import Transfer, retrieve, short

log = logging.getLogger(__name__)

# The decode node's answers that say its side of the transfer is over with the lane in step: it drained the
# transfer (the reservation was gone), or it read a cancel header. Success is the third.
_IN_STEP = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED)


def lane_in_step(e: BaseException) -> bool:
    """Whether a transfer that ended with `e` left its lane fit for the next transfer."""
    return isinstance(e, grpc.aio.AioRpcError) and e.code() in _IN_STEP


class PairTransfer(Transfer):
    def __init__(self, sending, request, runs, pieces) -> None:
        super().__init__(sending, request, runs)
        self.pieces = pieces  # `engine.parallel.kv_routes` between the two nodes' degrees
        self.peer: DecodePeer | None = None
        self.generation: int | None = None
        self.lane: int | None = None
        self.receive_call = None
        self.answer: asyncio.Future | None = None  # the ReceiveKV call's outcome
        self.opens: list[tuple[int, asyncio.Future]] = []  # (sending rank, its route being opened)
        self.finishing: asyncio.Future | None = None  # the routes' ends: the bytes sent
        self.broken = False  # the lane is not in step: its generation must go

    async def start(self) -> None:
        s, target = self.sending, self.target
        self.peer, self.generation, self.lane = await s.peers.acquire(
            target.decode_node_id, target.decode_address, target.kv_store_address, s.timeout)
        self.started = time.monotonic()
        # From here this node owes the decode node a transfer on this lane (a whole one, or a cancel header):
        # the decode node posts its receive on this call.
        self.receive_call = self.peer.stub.ReceiveKV(
            node_pb2.ReceiveKVRequest(request_id=self.request_id, prefill_node_id=s.node_id,
                                      generation=self.generation, layout=s.layout, num_tokens=self.num_tokens,
                                      block_ids=target.block_ids, transfer_tag=target.transfer_tag, lane=self.lane,
                                      first_block=self.first_block),
            timeout=s.timeout,
        )
        # Its answer, awaited through a shield (awaiting the call itself would cancel it with its awaiter): the
        # lane may not go back before it.
        self.answer = asyncio.ensure_future(self.receive_call)
        self.answer.add_done_callback(retrieve)
        routes = TransferRoutes(self.request_id, s.node_id, target.decode_node_id, self.generation, self.lane,
                                target.kv_store_address, tuple(self.runs), s.num_layers, self.first_block)
        for rank, route in routes.routes(self.pieces, True, s.head_starts):
            opening = s.ranks.call(rank, OpenRoute(route, s.timeout))  # its sender then waits for the step
            opening.add_done_callback(retrieve)
            self.opens.append((rank, opening))
        await asyncio.shield(asyncio.gather(*(opening for _, opening in self.opens)))

    async def confirm(self) -> int:
        sent = await asyncio.shield(self._finish_routes())
        await asyncio.shield(self.answer)
        return sent

    def failed(self, error: BaseException) -> None:
        # NOT_FOUND or ABORTED: the decode node's side ended in step (drained, or a cancel header read).
        self.broken = self.broken or not lane_in_step(error)

    def _finish_routes(self) -> asyncio.Future:
        """Each sending rank's routes ended (what they still owe sent) and waited for: the bytes sent. Once per
        transfer, however many times it is asked for; raises the first rank's KVTransferError."""
        if self.finishing is None:
            async def finish() -> int:
                s = self.sending
                ranks = sorted({rank for rank, _ in self.opens})
                results = await asyncio.gather(*(s.ranks.call(rank, EndRoutes(self.request_id, s.timeout))
                                                 for rank in ranks), return_exceptions=True)
                for rank, result in zip(ranks, results):
                    if isinstance(result, int):
                        s.rank_bytes[rank] += result
                error = next((r for r in results if isinstance(r, BaseException)), None)
                if error is not None:
                    raise error if isinstance(error, KVTransferError) else KVTransferError(str(error))
                return sum(results)

            self.finishing = asyncio.ensure_future(finish())
            self.finishing.add_done_callback(retrieve)
        return self.finishing

    async def end(self) -> None:
        s = self.sending
        if self.opens:
            # Ended while lanes were being opened: the decode ranks still wait for their routes' headers, so a
            # cancel header goes on each route as soon as it is open. A route that could not open loses the lane.
            opened = await asyncio.gather(*(opening for _, opening in self.opens), return_exceptions=True)
            self.broken = self.broken or any(isinstance(o, BaseException) for o in opened)
            try:
                await self._finish_routes()
            except KVTransferError as e:
                if not self.broken:
                    log.warning("kv transfer of %s ended with a failure: %s", self.request_id, e)
                self.broken = True
        elif self.answer is not None:
            self.broken = True  # the decode node waits for a header that will not come
        if self.answer is not None:
            if not self.broken:
                # The lane is this transfer's until the decode node has answered: only then were all its
                # messages matched there (a completed send proves nothing: NCCL completes small sends before
                # the recvs are posted).
                try:
                    await asyncio.wait_for(asyncio.shield(self.answer), s.timeout)
                except Exception as e:  # noqa: BLE001 - the call's error, or no answer in time
                    if not lane_in_step(e):
                        log.warning("kv transfer of %s: the decode node did not answer in step: %s",
                                    self.request_id, short(e))
                        self.broken = True
            self.receive_call.cancel()  # a no-op once it has completed
        if self.peer is not None:
            if self.broken:
                s.peers.failed(self.peer, self.generation)  # before the release: the lane is lost
                for rank in s.ranks.others:  # rank 0's groups of that generation went with it; the others' go
                    s.ranks.call(rank, DropGeneration(self.peer.node_id, self.generation)).add_done_callback(
                        retrieve)
            s.peers.release(self.peer, self.generation, self.lane)
