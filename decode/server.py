"""A decode node: the `DecodeNode` gRPC service over one engine.

A request's life on a decode node:
  Reserve   blocks allocated for the prompt, under a lease        (router, before anything is computed)
  ReceiveKV the prefill node's K/V land straight in those blocks  (prefill node, layer by layer)
  Continue  the sequence is adopted with its first token and decoded by continuous batching; tokens stream
            back to the router until it finishes, is cancelled (the call ends) or the node is stopped
  Release   frees whatever is left; also what the lease does on its own if Continue never comes
A colocated node serves `Generate`: the whole request on this engine, prompt included.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field

import grpc

from baton.cluster.messages import abort_for, kv_layout, responses_from_output, sampling_from_proto
from baton.engine import FieldError, NoCapacity
from baton.engine.async_engine import AsyncEngine
from baton.kvtransfer.channel import KVStoreHost, PairChannels
from baton.kvtransfer.receiver import receive
from baton.kvtransfer.sender import coalesce
from baton.v1 import node_pb2, node_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Reservation:
    blocks: list[int]
    expires: float  # time.monotonic() deadline of the lease
    tag: int
    kv_ready: asyncio.Event = field(default_factory=asyncio.Event)
    receiving: bool = False
    failed: bool = False


class DecodeServicer(node_pb2_grpc.DecodeNodeServicer):
    def __init__(self, node_id: str, role: str, engine: AsyncEngine, store: KVStoreHost | None,
                 transfer_timeout: float = 30.0) -> None:
        self.node_id = node_id
        self.role = role
        self.engine = engine
        self.store = store
        # gloo for a CPU pool, NCCL for a CUDA one: the channel follows the KV cache's device.
        self.channels = PairChannels(node_id, engine.engine.runner.kv.storage.device, local_store=store)
        self.transfer_timeout = transfer_timeout
        self.reservations: dict[str, Reservation] = {}
        self.layout = kv_layout(engine.engine)
        self._tags = itertools.count(1)
        self.kv_bytes_received = 0
        self.requests_served = 0

    # -- reservations -------------------------------------------------------------------------------

    async def Reserve(self, request, context):
        try:
            blocks = await self.engine.call(
                self.engine.engine.reserve, request.request_id, request.prompt_tokens, request.max_tokens
            )
        except (FieldError, NoCapacity) as e:
            await abort_for(context, e)
        lease = (request.lease_ms or 30_000) / 1000
        tag = next(self._tags)
        self.reservations[request.request_id] = Reservation(blocks, time.monotonic() + lease, tag)
        return node_pb2.ReserveResponse(
            node_id=self.node_id, block_ids=blocks, kv_store_address=self.store.address if self.store else "",
            transfer_tag=tag, layout=self.layout,
        )

    async def expire_leases(self) -> None:
        """Frees reservations nobody continued in time (never while K/V are still landing in them)."""
        now = time.monotonic()
        for rid, r in list(self.reservations.items()):
            if r.expires < now and not r.receiving:
                log.warning("reservation %s expired; freeing %d blocks", rid, len(r.blocks))
                await self._release(rid)

    async def _release(self, request_id: str) -> int:
        """Frees what the node holds for a request. Blocks that K/V are still landing in are not freed here:
        the receive frees them when it ends (done or failed), so nothing else can be written into them."""
        r = self.reservations.get(request_id)
        if r is not None and r.receiving:
            r.expires = 0
            return 0
        self.reservations.pop(request_id, None)
        if r is not None:
            r.failed = True
            r.kv_ready.set()  # wakes a waiting Continue, which then sees `failed`
        freed = await self.engine.call(self.engine.engine.free_reservation, request_id)
        aborted = await self.engine.call(self.engine.engine.abort_request, request_id)
        return freed + (1 if aborted else 0)

    async def Release(self, request, context):
        return node_pb2.ReleaseResponse(freed_blocks=await self._release(request.request_id))

    # -- KV transfer --------------------------------------------------------------------------------

    async def ReceiveKV(self, request, context):
        r = self.reservations.get(request.request_id)
        if r is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"request_id: no reservation for {request.request_id!r}")
        if request.layout != self.layout:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "layout: the two nodes' KV layouts differ")
        # Shielded: if this call is cancelled, the receive still ends (done or failed) before its blocks
        # can be freed or reused, and its bookkeeping still runs.
        received = await asyncio.shield(asyncio.ensure_future(self._receive(request, r)))
        if received is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "kv transfer failed")
        return node_pb2.ReceiveKVResponse(bytes_received=received)

    async def _receive(self, request, r: Reservation) -> int | None:
        blocks = r.blocks[: self.engine.engine.blocks.blocks_for(request.num_tokens)]
        pools = self.engine.engine.runner.kv.pools
        r.receiving = True
        try:
            group = await asyncio.to_thread(
                self.channels.get, request.prefill_node_id, request.generation, self.store.address, 1,
                self.transfer_timeout,
            )
            received = await asyncio.to_thread(
                receive, group, 0, r.tag, pools, coalesce(blocks), self.transfer_timeout
            )
        except Exception as e:  # noqa: BLE001 - whatever failed, the reservation must not stay behind
            log.warning("kv transfer of %s failed: %s", request.request_id, e)
            self.channels.drop(request.prefill_node_id)
            r.receiving = False
            await self._release(request.request_id)
            return None
        r.receiving = False
        self.kv_bytes_received += received
        if r.expires == 0:  # released while receiving
            await self._release(request.request_id)
        else:
            r.kv_ready.set()
        return received

    # -- decoding -----------------------------------------------------------------------------------

    async def Continue(self, request, context):
        rid = request.request_id
        r = self.reservations.get(rid)
        if r is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"request_id: no reservation for {rid!r}")
        try:
            params = sampling_from_proto(request.sampling)
        except FieldError as e:
            await self._release(rid)
            await abort_for(context, e)
        try:
            await asyncio.wait_for(r.kv_ready.wait(), max(0.0, r.expires - time.monotonic()))
        except TimeoutError:
            await self._release(rid)  # deferred to the receive's end if K/V are still landing
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the KV cache did not arrive within the lease")
        if r.failed:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the KV transfer failed")
        stream = self.engine.open_stream(rid)
        try:
            await self.engine.call(
                self.engine.engine.adopt, rid, list(request.prompt_token_ids), request.first_token,
                request.first_logprob, params,
            )
        except FieldError as e:
            self.engine.close_stream(rid)
            await self._release(rid)
            await abort_for(context, e)
        finally:
            self.reservations.pop(rid, None)
        self.requests_served += 1
        async for out in self.engine.outputs(rid, stream):
            for response in responses_from_output(out, request.sampling.logprobs):
                yield response

    async def Generate(self, request, context):
        """Colocated mode: prompt and decode on this engine."""
        try:
            params = sampling_from_proto(request.sampling)
            outputs = self.engine.generate(request.request_id, list(request.prompt_token_ids), params)
            self.requests_served += 1
            async for out in outputs:
                for response in responses_from_output(out, request.sampling.logprobs):
                    yield response
        except (FieldError, NoCapacity) as e:
            await abort_for(context, e)

    async def GetStats(self, request, context):
        return await self.stats()

    async def stats(self) -> node_pb2.NodeStats:
        total, free, running, waiting = await self.engine.load()
        return node_pb2.NodeStats(
            node_id=self.node_id, role=self.role, total_blocks=total, free_blocks=free, running=running,
            waiting=waiting, reserved=len(self.reservations), kv_bytes_received=self.kv_bytes_received,
            requests_served=self.requests_served,
        )

