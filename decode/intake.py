"""What a decode node takes in: a reservation's K/V, received over a lane of the pair channel or written in
place by a prefill node on the same device. `KVIntake` is the one owner of the lanes' claims and of the
same-device writes' deadlines; the blocks themselves stay `Reservations`' (this module only asks it to move a
reservation to RECEIVING, and tells it when the K/V are in or will not come). A transfer's routes are received
on whichever ranks hold their KV heads, through `kvtransfer.ranks.NodeRanks` (rank 0 here, the others through
their pipes: the same call).

A lane of a pair channel, (prefill node, generation, lane index), as this node sees it:

    FREE ──receive()──▶ CLAIMED (a receive, or a drain of a released reservation's transfer, runs on it)
      ▲                    │
      └──the task ends─────┘   (never before, even if the ReceiveKV call that claimed it was cancelled)

A claim of a CLAIMED lane is refused (`LaneBusy`): the prefill node puts one transfer at a time on a lane, and
two receives on one lane would each take the other's messages.

A pull (PullKV: a prefill node reads back cached blocks of a reservation instead of computing them) claims a
lane the same way, and sends on it: the blocks, or, when the reservation cannot give them (released, or they
are not its cached blocks), a cancel header on every route, so that the lane stays in step either way.

A same-device write, by request id:

    (none) ──begin_write()──▶ WRITING ──end_write() (KVWritten: ok or given up)──▶ (none)
                                 └───────the transfer timeout (the deadline)──────▶ (none)

Whichever ends a write first removes it; the other then finds nothing (a late KVWritten is NOT_FOUND). Both
end the reservation's RECEIVING (`Reservations.receive_ended`): READY, or the blocks go. Everything here runs
on the event loop (the receives' blocking parts on transfer threads): no locks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from baton.engine import FieldError
from baton.engine.async_engine import AsyncEngine
from baton.engine.parallel import KVRoute
from baton.kvtransfer.channel import TransferCancelled
from baton.kvtransfer.ranks import Abandon, NodeRanks, ReceiveRoute, SendRoute
from baton.kvtransfer.routes import TransferRoutes
from baton.kvtransfer.sender import coalesce

from .reservations import Phase, Reservation, Reservations

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Lane:
    """A lane of the pair channel with one prefill node, in one generation."""

    prefill_id: str
    generation: int
    index: int


class LaneBusy(Exception):
    """The lane is carrying another transfer (FAILED_PRECONDITION)."""


class Released(Exception):
    """The reservation was released before its K/V came. `drained`: the transfer was taken in and dropped, so
    the lane is in step (NOT_FOUND); otherwise the drain failed and the lane's generation is lost."""

    def __init__(self, message: str, drained: bool) -> None:
        super().__init__(message)
        self.drained = drained


class ReceiveFailed(Exception):
    """The transfer failed: the reservation's blocks are released (UNAVAILABLE)."""


class NotFound(LookupError):
    """No reservation, or no write in progress, for the request (NOT_FOUND)."""


@dataclass(slots=True)
class _Write:
    deadline: asyncio.Task
    started: float  # time.monotonic() when ReceiveKV began it


class KVIntake:
    """The K/V coming into this node's reservations. `ranks`: this node's ranks (`NodeRanks`: each receives its
    own KV heads); `head_starts`: each rank's first KV head; `store_address`: this node's KV store;
    `on_done(started)`: called for each transfer that landed whole (the node's metrics)."""

    def __init__(self, node_id: str, engine: AsyncEngine, reservations: Reservations, ranks: NodeRanks,
                 head_starts: Sequence[int], store_address: str, timeout: float,
                 on_done: Callable[[float], None]) -> None:
        self.node_id = node_id
        self.timeout = timeout
        self.bytes_received = 0
        self.bytes_pulled = 0  # sent back by PullKV
        self.rank_bytes = [0] * ranks.size  # KV bytes each rank received
        self._engine = engine
        self._reservations = reservations
        self._ranks = ranks
        self._head_starts = tuple(head_starts)
        self._store_address = store_address
        self._on_done = on_done
        self._claimed: set[Lane] = set()
        self._writes: dict[str, _Write] = {}

    # -- the pair channel --------------------------------------------------------------------------------

    async def receive(self, request, routes: list[KVRoute]) -> int:
        """The transfer that `request` (a ReceiveKVRequest) announces, received into its reservation's blocks:
        the bytes received. Returns only once this node's side of it is over, every message on its lane matched
        (or the lane given up). Raises LaneBusy, Released, FieldError (num_tokens), NotAllowed,
        TransferCancelled (the sender's cancel header: the lane is in step) or ReceiveFailed."""
        rid = request.request_id
        lane = Lane(request.prefill_node_id, request.generation, request.lane)
        self._claim(lane)  # until the receive (or drain) on it ends, even if this call is cancelled
        task = None
        try:
            r = self._reservations.get(rid)
            if r is None or r.phase is Phase.RELEASED:
                # Released before its K/V came (the request was cancelled): the prefill node may already be
                # sending. Take the transfer in and drop it, so the lane stays in step for the next transfer.
                task = self._hold(lane, self._drain(request, routes))
                if not await self._unless_caller_leaves(task, rid, routes):
                    raise Released(f"kv transfer failed: {rid!r} was released and could not be drained", False)
                raise Released(f"request_id: no reservation for {rid!r} (its K/V were dropped)", True)
            self._check_fit(request, r)
            self._reservations.advance(r, Phase.RECEIVING)  # at once, before any await: see Reservations
            task = self._hold(lane, self._receive(request, r, routes))
            received, cancelled = await self._unless_caller_leaves(task, rid, routes)
        finally:
            if task is None:
                self._claimed.discard(lane)
        if cancelled:
            raise TransferCancelled(f"kv transfer of {rid!r} cancelled by the prefill node")
        if received is None:
            raise ReceiveFailed(f"kv transfer failed: {r.cause}")
        return received

    def _claim(self, lane: Lane) -> None:
        """Takes `lane` for one transfer (a receive, a drain or a pull's sends); LaneBusy if another holds it."""
        if lane in self._claimed:
            raise LaneBusy(f"lane: lane {lane.index} of generation {lane.generation} with {lane.prefill_id!r} is "
                           "carrying another transfer")
        self._claimed.add(lane)

    def _hold(self, lane: Lane, work) -> asyncio.Future:
        """`work` (a receive or a drain) as a task that holds `lane`'s claim until it ends."""
        task = asyncio.ensure_future(work)
        task.add_done_callback(lambda _: self._claimed.discard(lane))
        return task

    async def _unless_caller_leaves(self, task: asyncio.Future, request_id: str, routes: list[KVRoute]):
        """`task`'s result. Shielded: if the call is cancelled, the receive still ends (done or failed) before
        its blocks can be freed or reused, and its bookkeeping still runs. But a caller that leaves (a prefill
        node that died) before it joined the pair group never will: the receiving ranks' routes still waiting
        for it give up at once (`Abandon`), and the reservation goes now instead of at the transfer timeout."""
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            for rank in {route.dst for route in routes}:
                self._ranks.call(rank, Abandon(request_id)).add_done_callback(lambda f: f.cancelled() or f.exception())
            raise

    async def _receive(self, request, r: Reservation, routes: list[KVRoute]) -> tuple[int | None, bool]:
        """(bytes received or None, whether the sender cancelled the transfer)."""
        started = time.monotonic()
        blocks = r.blocks[r.cached: self._engine.blocks_for(request.num_tokens)]  # never into a cached block
        received, cancelled, cause = None, False, "kv transfer failed"
        failures, cancels, nbytes = await self._routes(request, routes, coalesce(blocks), False)
        if failures:
            cause = f"kv transfer failed: {failures[0]}"
            log.warning("kv transfer of %s failed: %s", request.request_id, failures[0])
        elif cancels:
            cancelled, cause = True, "kv transfer cancelled by the prefill node"  # the lane is in step: keep it
        else:
            received = nbytes
            self.bytes_received += received
            self._on_done(started)
        await self._reservations.receive_ended(r, received is not None, cause)
        return received, cancelled

    async def _drain(self, request, routes: list[KVRoute]) -> bool:
        """Whether the transfer was taken in (or cancelled by its sender) with the lane left in step."""
        runs = coalesce(list(request.block_ids)[request.first_block:])  # the blocks the sender addresses
        failures, _, _ = await self._routes(request, routes, runs, True)
        if failures:
            log.warning("draining the kv transfer of %s failed: %s", request.request_id, failures[0])
        return not failures

    async def _routes(self, request, routes: list[KVRoute], runs: list[tuple[int, int]], drain_only: bool
                      ) -> tuple[list[BaseException], int, int]:
        """Every route of the transfer into this node (one per sender rank and receiving rank, each on its
        rank), run to its end: (their failures, how many were cancelled by their sender, the bytes received).
        A failed route has dropped its generation with its peer rank."""
        transfer = TransferRoutes(request.request_id, self.node_id, request.prefill_node_id, request.generation,
                                  request.lane, self._store_address, tuple(runs), self._engine.kv_spec.num_layers)
        mine = transfer.routes(routes, False, self._head_starts)
        results = await asyncio.gather(*(self._ranks.call(rank, ReceiveRoute(route, self.timeout, drain_only))
                                         for rank, route in mine), return_exceptions=True)
        failures = [e for e in results if isinstance(e, BaseException) and not isinstance(e, TransferCancelled)]
        cancels = sum(isinstance(e, TransferCancelled) for e in results)
        nbytes = 0
        for (rank, _), result in zip(mine, results):
            if isinstance(result, int) and not drain_only:
                self.rank_bytes[rank] += result
                nbytes += result
        return failures, cancels, nbytes

    # -- the pull path -----------------------------------------------------------------------------------

    async def send_back(self, request, routes: list[KVRoute]) -> int:
        """The cached blocks a PullKV request (`request`) names, sent on its lane into the prefill node's blocks:
        the bytes sent. Returns once this node's side is over. Raises LaneBusy; NotFound or FieldError (first_block,
        block_ids) after a cancel header went on every route (the lane is in step); ReceiveFailed when a route
        failed (its generation is dropped)."""
        rid = request.request_id
        lane = Lane(request.prefill_node_id, request.generation, request.lane)
        self._claim(lane)  # until the sends on it end
        r, refusal = self._reservations.get(rid), None
        count = len(request.block_ids)
        if r is None or r.phase is Phase.RELEASED:
            refusal = NotFound(f"request_id: no reservation for {rid!r}")
        elif r.phase is not Phase.RESERVED:
            refusal = FieldError("request_id", f"{rid!r} is {r.phase.name.lower()}: its blocks are being written")
        elif request.first_block + count > r.cached:
            refusal = FieldError("first_block", f"blocks {request.first_block}..{request.first_block + count - 1} "
                                 f"are not all among the reservation's {r.cached} cached blocks")
        src = () if refusal is not None else tuple(r.blocks[request.first_block: request.first_block + count])
        # Shielded, as a receive is: a caller that leaves does not end the sends, nor the read before they end.
        failures, sent = await asyncio.shield(self._hold(lane, self._read(request, routes, r if src else None, src)))
        if failures:
            log.warning("kv pull of %s by %s failed: %s", rid, request.prefill_node_id, failures[0])
            raise ReceiveFailed(f"kv pull failed: {failures[0]}")
        if refusal is not None:
            raise refusal
        self.bytes_pulled += sent
        return sent

    async def _read(self, request, routes: list[KVRoute], r: Reservation | None, src: tuple[int, ...]
                    ) -> tuple[list[BaseException], int]:
        """`_send`, with `r`'s blocks kept from a release until the sends are over."""
        if r is None:
            return await self._send(request, routes, src)
        self._reservations.begin_read(r)
        try:
            return await self._send(request, routes, src)
        finally:
            await self._reservations.end_read(r)

    async def _send(self, request, routes: list[KVRoute], src: tuple[int, ...]) -> tuple[list[BaseException], int]:
        """Every route of the pull from this node, each on its rank (a cancel header on each when `src` is
        empty): (their failures, the bytes sent)."""
        transfer = TransferRoutes(request.request_id, self.node_id, request.prefill_node_id, request.generation,
                                  request.lane, self._store_address, tuple(coalesce(list(request.block_ids))),
                                  self._engine.kv_spec.num_layers, request.first_block, pull=True)
        mine = transfer.routes(routes, True, self._head_starts)
        results = await asyncio.gather(*(self._ranks.call(rank, SendRoute(route, src, self.timeout))
                                         for rank, route in mine), return_exceptions=True)
        failures = [e for e in results if isinstance(e, BaseException)]
        return failures, sum(r for r in results if isinstance(r, int))

    # -- the same-device path ----------------------------------------------------------------------------

    def begin_write(self, request) -> None:
        """The prefill node is about to write `request`'s K/V into the reserved blocks itself: the reservation
        becomes RECEIVING (so a release waits for the writes to end) until `end_write` or the deadline.
        Raises NotFound, FieldError (num_tokens, block_ids) or NotAllowed."""
        rid = request.request_id
        r = self._reservations.get(rid)
        if r is None or r.phase is Phase.RELEASED:
            raise NotFound(f"request_id: no reservation for {rid!r}")
        self._check_fit(request, r)
        if list(request.block_ids) != r.blocks[: len(request.block_ids)]:
            raise FieldError("block_ids", "not this reservation's blocks")
        self._reservations.advance(r, Phase.RECEIVING)  # at once, before any await: see Reservations
        self._writes[rid] = _Write(asyncio.create_task(self._deadline(r, request.prefill_node_id)), time.monotonic())

    async def end_write(self, request_id: str, prefill_id: str, ok: bool, bytes_written: int) -> None:
        """KVWritten: the prefill node's writes are over, all of them (`ok`) or given up. Raises NotFound when
        no write is in progress (never begun, or ended by its deadline)."""
        write = self._writes.pop(request_id, None)
        r = self._reservations.get(request_id)
        if write is None or r is None:
            raise NotFound(f"request_id: no KV write in progress for {request_id!r}")
        write.deadline.cancel()
        if ok:
            self.bytes_received += bytes_written
            self._on_done(write.started)
        await self._reservations.receive_ended(r, ok, "kv written" if ok else
                                               f"the prefill node {prefill_id} gave up its KV writes")

    async def _deadline(self, r: Reservation, prefill_id: str) -> None:
        await asyncio.sleep(self.timeout)
        if self._writes.pop(r.request_id, None) is not None:
            log.warning("kv writes of %s by %s did not end in %.0f s", r.request_id, prefill_id, self.timeout)
            await self._reservations.receive_ended(r, False, "the prefill node's KV writes did not end in time")

    # ------------------------------------------------------------------------------------------------------

    def _check_fit(self, request, r: Reservation) -> None:
        blocks = self._engine.blocks_for(request.num_tokens)
        if not 0 < blocks <= len(r.blocks):
            raise FieldError("num_tokens", f"{request.num_tokens} tokens do not fit the {len(r.blocks)} reserved "
                             "blocks")
        # The blocks before the first written are the reservation's cached ones: a transfer that starts anywhere
        # else would leave blocks unwritten, or write into blocks other requests read.
        if request.first_block != r.cached:
            raise FieldError("first_block", f"the transfer starts at block {request.first_block}; this node holds "
                             f"the first {r.cached} blocks of the prompt and expects the rest")
        if request.first_block >= blocks:
            raise FieldError("first_block", f"block {request.first_block} is past the prompt's {blocks} blocks")

    def close(self) -> None:
        """The node stops: the write deadlines go (the node's release of every reservation frees the blocks)."""
        for write in self._writes.values():
            write.deadline.cancel()
