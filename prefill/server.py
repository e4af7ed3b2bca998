"""A prefill node: the `PrefillNode` gRPC service over one engine.

A request's life on a prefill node:
  1. the pair channel to the chosen decode node is opened (or reused), while the decode node is asked,
     over gRPC, to receive the request's K/V into the blocks it reserved (ReceiveKV)
  2. the prompt joins the engine's next batch; as soon as layer L of that step is computed, layer L's K/V
     for the prompt's blocks are posted to the channel (`after_layer` hook, engine thread, non-blocking)
  3. the first token is sampled and streamed to the router at once; the engine frees the prompt's blocks
     (the sends read copies)
  4. once every send has completed and the decode node confirmed, TransferDone ends the call
A failed or timed-out transfer drops the channel (the next transfer opens a new generation) and fails the
call with UNAVAILABLE; the router then releases the reservation.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import grpc

from baton.cluster.messages import abort_for, chunk_from_output, finish_to_proto, kv_layout, sampling_from_proto
from baton.engine import FieldError, NoCapacity
from baton.engine.async_engine import AsyncEngine
from baton.engine.scheduler import ScheduledStep
from baton.kvtransfer.channel import KVTransferError, PairChannels
from baton.kvtransfer.sender import KVSender, coalesce
from baton.v1 import node_pb2, node_pb2_grpc

log = logging.getLogger(__name__)


class PrefillServicer(node_pb2_grpc.PrefillNodeServicer):
    def __init__(self, node_id: str, engine: AsyncEngine, transfer_timeout: float = 30.0) -> None:
        self.node_id = node_id
        self.engine = engine
        self.channels = PairChannels(node_id, engine.engine.runner.kv.storage.device)
        self.transfer_timeout = transfer_timeout
        self.layout = kv_layout(engine.engine)
        self._generations: dict[str, int] = {}  # per decode node: a new one after its channel fails
        self._generation_locks: dict[str, asyncio.Lock] = {}
        self._decode_stubs: dict[str, node_pb2_grpc.DecodeNodeStub] = {}
        self._channels_grpc: list[grpc.aio.Channel] = []
        # One sender per transfer, made (and its header posted) before the prompt is scheduled; the engine
        # thread gives it the prompt's own block ids at the first layer.
        self._senders: dict[str, KVSender] = {}
        self._lock = threading.Lock()
        self.kv_bytes_sent = 0
        self.requests_served = 0
        engine.engine.after_layer = self._send_layer

    def _send_layer(self, layer: int, step: ScheduledStep) -> None:
        """Engine thread, inside the forward pass: post this layer's sends for every prompt of the step."""
        engine = self.engine.engine
        pool = engine.runner.kv.pools[layer]
        for seq in step.seqs:
            with self._lock:
                sender = self._senders.get(seq.request_id)
            if sender is None:
                continue
            if not sender.has_source:
                sender.set_source(engine.blocks.table(seq.request_id)[: sender.num_blocks])
            sender.send_layer(layer, pool)

    def _stub(self, address: str) -> node_pb2_grpc.DecodeNodeStub:
        stub = self._decode_stubs.get(address)
        if stub is None:
            channel = grpc.aio.insecure_channel(address)
            self._channels_grpc.append(channel)
            stub = self._decode_stubs[address] = node_pb2_grpc.DecodeNodeStub(channel)
        return stub

    async def Prefill(self, request, context):
        rid, target = request.request_id, request.target
        try:
            params = sampling_from_proto(request.sampling)
        except FieldError as e:
            await abort_for(context, e)
        if target.layout != self.layout:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "layout: the two nodes' KV layouts differ")
        prompt = list(request.prompt_token_ids)
        runs = coalesce(list(target.block_ids))
        decode_id = target.decode_node_id
        receive_call = None
        try:
            async with self._generation_locks.setdefault(decode_id, asyncio.Lock()):
                # One generation at a time per decode node, or concurrent first requests would each open one.
                generation = self._generations.get(decode_id)
                if generation is None:  # first transfer to this node, or the last one failed
                    generation = self._generations[decode_id] = await asyncio.to_thread(
                        self.channels.next_generation, decode_id, target.kv_store_address, self.transfer_timeout
                    )
            receive_call = self._stub(target.decode_address).ReceiveKV(
                node_pb2.ReceiveKVRequest(request_id=rid, prefill_node_id=self.node_id, generation=generation,
                                          layout=self.layout, num_tokens=len(prompt)),
                timeout=self.transfer_timeout,
            )
            group = await asyncio.to_thread(
                self.channels.get, decode_id, generation, target.kv_store_address, 0, self.transfer_timeout
            )
            pools = self.engine.engine.runner.kv.pools
            sender = KVSender(group, 1, target.transfer_tag, None, runs, num_layers=len(pools), pool=pools[0])
            with self._lock:
                self._senders[rid] = sender
            first = None
            async for out in self.engine.generate(rid, prompt, params, prefill_only=True):
                first = out
            self.requests_served += 1
            yield node_pb2.PrefillEvent(first_token=node_pb2.FirstToken(
                chunk=chunk_from_output(first, request.sampling.logprobs),
                finish=finish_to_proto(first.finish_reason) if first.finished else 0,
            ))
            with self._lock:
                del self._senders[rid]
            sent = await asyncio.to_thread(sender.wait, self.transfer_timeout)
            await receive_call
            self.kv_bytes_sent += sent
            yield node_pb2.PrefillEvent(transfer_done=node_pb2.TransferDone(bytes_sent=sent))
        except (FieldError, NoCapacity) as e:
            await abort_for(context, e)
        except (KVTransferError, grpc.aio.AioRpcError) as e:
            self.channels.drop(decode_id)
            self._generations.pop(decode_id, None)
            log.warning("kv transfer of %s to %s failed: %s", rid, decode_id, e)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"kv transfer to {decode_id} failed: {e}")
        finally:
            if receive_call is not None:
                receive_call.cancel()  # a no-op once it has completed
            with self._lock:
                sender = self._senders.pop(rid, None)
            if sender is not None:  # ended early: the sends must be over before the blocks can be reused
                if sender.layers_posted < sender.num_layers:
                    # The decode node waits for layers that will never come: closing the channel fails its
                    # receive at once (and the other transfers on this pair, which is why only then).
                    self.channels.drop(decode_id)
                    self._generations.pop(decode_id, None)
                await asyncio.to_thread(_wait_quietly, sender, self.transfer_timeout)
            await asyncio.shield(self.engine.call(self.engine.engine.free_reservation, rid))

    async def GetStats(self, request, context):
        return await self.stats()

    async def stats(self) -> node_pb2.NodeStats:
        total, free, running, waiting = await self.engine.load()
        return node_pb2.NodeStats(
            node_id=self.node_id, role="prefill", total_blocks=total, free_blocks=free, running=running,
            waiting=waiting, kv_bytes_sent=self.kv_bytes_sent, requests_served=self.requests_served,
        )

    async def close(self) -> None:
        for channel in self._channels_grpc:
            await channel.close()
        self.channels.close()


def _wait_quietly(sender: KVSender, timeout: float) -> None:
    try:
        sender.wait(timeout)
    except KVTransferError:
        pass
