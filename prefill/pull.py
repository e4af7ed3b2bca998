"""The pull path: a prefill node that lacks cached blocks of a prompt that the decode node holds for the
request's reservation (`KVTarget.cached_blocks`) reads their K/V back over the pair channel instead of
computing them, then computes only the rest. One request's pull, driven by `PrefillServicer.Prefill` before its
transfer starts:

  hold    the engine holds blocks for the prompt's first `cached_blocks` blocks: this node's own cached ones,
          then fresh ones (`LLMEngine.hold_prefix`)
  pull    on a lane of the pair channel (taken from `DecodePeers`, as a transfer's), each rank of this node
          receives its KV heads of the fresh blocks (a `Route.pull`) while the decode node's ranks send them
          (PullKV); the same header, per-layer checksums and generations as a transfer
  commit  the fresh blocks are named (`commit_held`): the prompt attaches them as its cached prefix
  end     the hold goes once the request has left the engine (its own hold on the blocks keeps them meanwhile)

When to pull (the cost model): when at least `min_tokens` of the prompt's tokens would come back (a pull costs
a round trip and a lane; computing costs the model's forward pass over those tokens and the tokens after them
attend to them either way). A pull that fails or is refused costs only time: the hold goes and the prompt is
computed in full, as without it. A decode node that refused it (NOT_FOUND: the reservation went; or
INVALID_ARGUMENT) sent a cancel header on every route, so the lane stays in step; any other failure retires the
lane's generation, as a failed transfer does.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from baton.engine import FieldError, NoCapacity
from baton.engine.async_engine import AsyncEngine
from baton.engine.parallel import kv_routes
from baton.kvtransfer.channel import KVTransferError, TransferCancelled
from baton.kvtransfer.ranks import Abandon, DropGeneration, ReceiveRoute
from baton.kvtransfer.routes import TransferRoutes
from baton.kvtransfer.sender import coalesce
from baton.v1 import node_pb2

from .transfer import Sending, retrieve, short

log = logging.getLogger(__name__)

DEFAULT_PULL_MIN_TOKENS = 16  # pull once a block would come back (bench/prefix_cache.py measures pull against compute)
_REFUSED = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)  # a cancel header went on every route


class Pull:
    """One request's pull (see the module's docstring): `run()` before the transfer starts, `end()` once the
    request has left the engine, whatever happened. `pulled`: the bytes that came back."""

    def __init__(self, sending: Sending, engine: AsyncEngine, request, token_ids: list[int], min_tokens: int) -> None:
        self.sending = sending
        self.engine = engine
        self.request = request
        self.token_ids = token_ids  # the prompt's and the resumed tokens': what the prompt's blocks hold
        self.min_tokens = min_tokens
        self.hold_id = f"{request.request_id}#pull"
        self.held = False
        self.pulled = 0
        self._task: asyncio.Future | None = None

    def wanted(self) -> bool:
        block_size = self.engine.kv_identity[1]
        return (self.min_tokens > 0 and self.engine.kv_identity[0] != b""
                and self.request.target.cached_blocks * block_size >= self.min_tokens)

    async def run(self) -> None:
        """Holds and pulls what the cost model says to; never raises for the pull's own failures. The work is
        a task of its own: a call cancelled meanwhile leaves it to end before `end` lets the blocks go."""
        if not self.wanted():
            return
        self._task = asyncio.ensure_future(self._run())
        self._task.add_done_callback(retrieve)
        await asyncio.shield(self._task)

    async def end(self) -> None:
        if self._task is not None:
            await asyncio.wait([self._task])  # nothing writes into the held blocks after this
        if self.held:
            self.held = False
            await self.engine.release(self.hold_id)

    async def _run(self) -> None:
        target, block_size = self.request.target, self.engine.kv_identity[1]
        try:
            held = await self.engine.hold_prefix(self.hold_id, self.token_ids, target.cached_blocks)
        except (FieldError, NoCapacity) as e:
            log.info("no pull for %s: %s", self.request.request_id, e)
            return
        self.held = True
        missing = target.cached_blocks - held.cached
        if missing * block_size < self.min_tokens:
            return  # this node holds (nearly) as much: nothing worth a round trip
        try:
            self.pulled = await self._pull(held.cached, held.blocks[held.cached:])
        except (KVTransferError, PullRefused) as e:
            log.warning("kv pull of %s from %s failed (the prompt is computed instead): %s",
                        self.request.request_id, target.decode_node_id, e)
            self.held = False
            await self.engine.release(self.hold_id)  # the fresh blocks go unnamed
            return
        await self.engine.commit_held(self.hold_id, self.token_ids)

    async def _pull(self, first: int, blocks: list[int]) -> int:
        """The decode node's blocks `first`, `first + 1`, ... into this node's `blocks`: the bytes received."""
        s, target, rid = self.sending, self.request.target, self.request.request_id
        peer, generation, lane = await s.peers.acquire(target.decode_node_id, target.decode_address,
                                                       target.kv_store_address, s.timeout)
        broken = True  # until the decode node has answered in step
        try:
            answer = asyncio.ensure_future(peer.stub.PullKV(
                node_pb2.PullKVRequest(request_id=rid, prefill_node_id=s.node_id, generation=generation, lane=lane,
                                       layout=s.layout, first_block=first, block_ids=blocks),
                timeout=s.timeout))
            answer.add_done_callback(retrieve)
            pieces = kv_routes(s.model_config, target.layout.tensor_parallel_size or 1, len(s.head_starts))
            routes = TransferRoutes(rid, s.node_id, target.decode_node_id, generation, lane, target.kv_store_address,
                                    tuple(coalesce(blocks)), s.num_layers, first, pull=True)
            mine = routes.routes(pieces, False, s.head_starts)
            receives = asyncio.ensure_future(asyncio.gather(
                *(s.ranks.call(rank, ReceiveRoute(route, s.timeout)) for rank, route in mine),
                return_exceptions=True))
            receives.add_done_callback(retrieve)
            await asyncio.wait([receives, answer], return_when=asyncio.FIRST_COMPLETED)
            if answer.done() and _code(answer) not in (grpc.StatusCode.OK, *_REFUSED):
                # Refused before it touched the lane, or the node failed: nothing more comes on the lane. The
                # receives still waiting give up (set-up) or time out; the generation goes.
                for rank in {rank for rank, _ in mine}:
                    s.ranks.call(rank, Abandon(rid)).add_done_callback(retrieve)
                raise KVTransferError(f"PullKV: {short(answer.exception())}")
            results = await receives
            failures = [r for r in results if isinstance(r, BaseException) and not isinstance(r, TransferCancelled)]
            if failures:
                raise KVTransferError(str(failures[0]))
            await asyncio.wait([answer])
            code, cancelled = _code(answer), sum(isinstance(r, TransferCancelled) for r in results)
            if code in _REFUSED and cancelled == len(results):
                broken = False
                raise PullRefused(short(answer.exception()))
            if code is not grpc.StatusCode.OK or cancelled:
                raise KVTransferError(f"the decode node answered {code.name} to a pull that "
                                      f"{'was' if cancelled else 'was not'} cancelled")
            broken = False
            return sum(results)
        finally:
            if broken:
                s.peers.failed(peer, generation)
                for rank in s.ranks.others:
                    s.ranks.call(rank, DropGeneration(peer.node_id, generation)).add_done_callback(retrieve)
            s.peers.release(peer, generation, lane)


class PullRefused(Exception):
    """The decode node refused the pull (the reservation went, or the blocks are not its cached ones), with the
    lane in step."""


def _code(call: asyncio.Future) -> grpc.StatusCode:
    e = call.exception()
    if e is None:
        return grpc.StatusCode.OK
    return e.code() if isinstance(e, grpc.aio.AioRpcError) else grpc.StatusCode.UNKNOWN
