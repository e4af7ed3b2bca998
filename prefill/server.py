"""A prefill node: the `PrefillNode` gRPC service over one engine.

A request's life on a prefill node, one skeleton (`Prefill`) over either path of its K/V (`transfer.Transfer`):
  0. the pull path (`pull.Pull`): blocks of the prompt that the decode node holds cached and this node lacks
     are read back from it instead of computed, when the cost model says so
  1. the transfer starts: it takes what its path needs of the decode node's entry (`DecodePeers`) and tells the
     decode node to expect the K/V (ReceiveKV). On the pair channel (`pair.py`) that is a lane of the pair's
     generation that no other transfer holds, and a route opened on each rank of this node that holds KV
     heads of a decode rank (`kvtransfer.ranks.NodeRanks`); on the same device (`same_device.py`), the decode
     node's pool mapped here
  2. the prompt joins the engine's next batch; when its step starts each route's header goes out, and as soon
     as layer L is computed, each rank copies out layer L's K/V of its routes' heads for the prompt's blocks
     and posts them (the engines' KV sinks, `kvtransfer.ranks.RankWork`: engine threads, non-blocking)
  3. the first token is sampled and streamed to the router at once; the engine frees the prompt's blocks when
     the step ends (the sends read the copies)
  4. once the decode node has every byte (the transfer confirmed), TransferDone ends the call
Whatever ends the call early (client cancel, deadline, a failure), the request leaves the engine first, then the
transfer ends: what it still owes the decode node is settled (`Transfer.end`). A failed transfer fails this
call with UNAVAILABLE, naming the decode node; the router releases the reservation.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from baton.common.kv_messages import kv_layout, layouts_match
from baton.common.logs import REQUEST_ID, client_request_id
from baton.common.messages import (LOST_NODE_KEY, abort_for, chunk_from_output, finish_to_proto, resumed_from_proto,
                                   sampling_from_proto)
from baton.common.metrics import NodeMetrics, RequestMetrics
from baton.engine import ConfigError, FieldError, NoCapacity
from baton.engine.async_engine import AsyncEngine, EngineFailed
from baton.engine.omp import serial_torch
from baton.engine.parallel import kv_routes, shard
from baton.kvtransfer.channel import PairChannels, TransferThreads
from baton.kvtransfer.ranks import NodeRanks, RankWork
from baton.kvtransfer.sender import Staging, coalesce, staging_bytes
from baton.kvtransfer.shared import device_id
from baton.v1 import node_pb2, node_pb2_grpc

from .pair import PairTransfer
from .peers import DecodePeers
from .pull import DEFAULT_PULL_MIN_TOKENS, Pull
from .same_device import SameDeviceTransfer
from .transfer import Sending, Transfer, short

log = logging.getLogger(__name__)


class PrefillServicer(node_pb2_grpc.PrefillNodeServicer):
    def __init__(self, node_id: str, engine: AsyncEngine, transfer_timeout: float = 30.0,
                 peer_idle_seconds: float = 60.0, kv_path: str = "auto", model: str = "",
                 pull_min_tokens: int = DEFAULT_PULL_MIN_TOKENS, member_token: str | None = None,
                 member_credentials=None) -> None:
        self.node_id = node_id
        self.engine = engine
        self.spec = engine.kv_spec
        # "pair": always the pair channel; otherwise the same-device path wherever a decode node offers its
        # storage on this node's device (kvtransfer/shared.py).
        self.kv_path = kv_path
        self.device_id = device_id(self.spec.device)
        self.channels = PairChannels(node_id, self.spec.device, secret=member_token or "")
        self.threads = TransferThreads("kv-send", thread_setup=serial_torch)
        self.peers = DecodePeers(self.channels, self.threads, peer_idle_seconds, member_token=member_token,
                                 credentials=member_credentials)
        self.transfer_timeout = transfer_timeout
        tp = self.spec.tensor_parallel_size
        self.shards = [shard(engine.model_config, tp, r) for r in range(tp)]
        # Rank 0's part of the transfers (its route senders, and the same-device writers) is this node's KV
        # sink; the other ranks' are theirs, driven through their pipes. The packed layers' buffers are reused
        # from transfer to transfer.
        staging = Staging(staging_bytes(engine.kv_pools, engine.transfer_tokens))
        rank0 = RankWork(engine.kv_pools, self.spec.device, self.channels, staging)
        self.ranks = NodeRanks(rank0, self.threads, engine.rank_links())
        self.sending = Sending(node_id, self.peers, self.ranks, self.threads, kv_layout(self.spec),
                               engine.model_config, self.spec.device, tuple(s.kv_head_start for s in self.shards),
                               self.spec.num_layers, transfer_timeout, [0] * tp)
        self.kv_bytes_sent = 0
        self.pull_min_tokens = pull_min_tokens  # 0: never pull (`pull.Pull`)
        self.kv_bytes_pulled = 0
        self.requests_served = 0
        # `model`: the name the node registers its model under ("": the architecture's), its metrics' label.
        self.metrics = NodeMetrics(node_id, "prefill", model or engine.model_config.architecture, tp,
                                   engine.rank_pids())
        engine.set_kv_sink(rank0)
        engine.set_step_observer(self.metrics.observe_step)

    async def Prefill(self, request, context):
        REQUEST_ID.set(client_request_id(request.request_id))  # in every line logged about it
        with self.metrics.request(context, len(request.prompt_token_ids)) as track:
            rid, target = request.request_id, request.target
            try:
                params = sampling_from_proto(request.sampling)
                prompt = list(request.prompt_token_ids)
                # A resumed stream's delivered tokens are computed (and their K/V sent) with the prompt.
                computed = len(prompt) + len(request.resumed.token_ids)
                filled = self.engine.blocks_for(computed)
                if len(target.block_ids) != filled:
                    raise FieldError("target.block_ids", f"{len(target.block_ids)} blocks for {computed} tokens to "
                                     f"compute (they fill {filled})")
                if target.cached_blocks >= filled:  # the last block always goes: its last token was computed here
                    raise FieldError("target.cached_blocks", f"{target.cached_blocks} of the prompt's {filled} "
                                     "blocks: at least the last one is sent")
                # Only the blocks the decode node lacks are sent: from its first uncached one.
                runs = coalesce(list(target.block_ids)[target.cached_blocks:])
            except FieldError as e:
                await abort_for(context, e)
            if not layouts_match(target.layout, self.sending.layout, any_degree=True):
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "layout: the two nodes' KV layouts differ")
            try:
                pieces = kv_routes(self.engine.model_config, len(self.shards), target.layout.tensor_parallel_size or 1)
            except ConfigError as e:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"layout: the decode node's degree: {e}")
            transfer = self._transfer(request, runs, pieces)
            pull = Pull(self.sending, self.engine, request, prompt + list(request.resumed.token_ids),
                        self.pull_min_tokens)
            try:
                await pull.run()
                self.kv_bytes_pulled += pull.pulled
                await transfer.start()
                first = await self._compute(request, prompt, params, track)
                # From the first token on, the transfer's end is the request's: it goes on (and is counted) if the
                # call ends first, as it may once the decode node has the K/V (the router does not wait).
                confirmed = track.defer_to(transfer.confirmation(lambda sent: self._count(transfer, sent, track)))
                yield first
                sent = await asyncio.shield(confirmed)
                yield node_pb2.PrefillEvent(transfer_done=node_pb2.TransferDone(bytes_sent=sent))
            except (FieldError, NoCapacity) as e:
                await abort_for(context, e)
            except EngineFailed as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"prefill node {self.node_id}: {e}")
            except transfer.failures as e:
                transfer.failed(e)
                if isinstance(e, grpc.aio.AioRpcError) and e.code() == grpc.StatusCode.NOT_FOUND:
                    # The decode node had released the reservation (the request was cancelled there): a drop,
                    # not a failure of anything (the cancellation storm found it logged as one).
                    log.info("%s of %s to %s dropped there: %s", transfer.kind, rid, target.decode_node_id,
                             e.details())
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"{target.decode_node_id}: {e.details()}")
                log.warning("%s of %s to %s failed: %s", transfer.kind, rid, target.decode_node_id, short(e))
                context.set_trailing_metadata(((LOST_NODE_KEY, target.decode_node_id),))  # the router avoids it
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"kv transfer to {target.decode_node_id} failed: {short(e)}")
            finally:
                # Shielded: a cancelled call still ends its transfer and lets go of its peer entry. The request
                # leaves the engine first (a queued release runs after the add and after any step computing
                # it): after that no layer is posted for it on any rank.
                await asyncio.shield(self._end(transfer, pull))

    def _transfer(self, request, runs: list[tuple[int, int]], pieces) -> Transfer:
        """The request's transfer: the same-device path wherever the decode node offers its storage on this
        node's device (and this node is one rank: a tensor-parallel prefill node sends from every rank, through
        the pair channels only, so far), else the pair channel."""
        target = request.target
        if (self.kv_path != "pair" and len(self.shards) == 1 and target.HasField("share")
                and target.share.device_id == self.device_id):
            return SameDeviceTransfer(self.sending, request, runs)
        return PairTransfer(self.sending, request, runs, pieces)

    async def _compute(self, request, prompt: list[int], params, track: RequestMetrics) -> node_pb2.PrefillEvent:
        """Computes the prompt (the KV sink posts its layers as they are done): the first-token event."""
        first = None
        async for out in self.engine.generate(request.request_id, prompt, params, prefill_only=True,
                                              resumed=resumed_from_proto(request.resumed)):
            first = out
        self.requests_served += 1
        track.output(first)
        return node_pb2.PrefillEvent(first_token=node_pb2.FirstToken(
            chunk=chunk_from_output(first, request.sampling.logprobs),
            finish=finish_to_proto(first.finish_reason) if first.finished else 0,
        ))

    def _count(self, transfer: Transfer, sent: int, track: RequestMetrics) -> None:
        self.kv_bytes_sent += sent
        self.metrics.transfer_done(transfer.started)
        track.settle("ok")

    async def _end(self, transfer: Transfer, pull: Pull) -> None:
        await self.engine.release(transfer.request_id)
        await transfer.end()
        await pull.end()

    async def GetStats(self, request, context):
        return await self.stats()

    async def stats(self) -> node_pb2.NodeStats:
        load = await self.engine.load()
        return node_pb2.NodeStats(
            node_id=self.node_id, role="prefill", total_blocks=load.total_blocks, free_blocks=load.free_blocks,
            running=load.running, waiting=load.waiting, queued_tokens=load.queued_tokens,
            kv_bytes_sent=self.kv_bytes_sent, kv_bytes_pulled=self.kv_bytes_pulled,
            requests_served=self.requests_served,
            peers=max(len(self.peers), self.channels.peers()), rank_kv_bytes=self.sending.rank_bytes,
            prefix_cache=node_pb2.PrefixCache(**await self.engine.prefix_cache()),
        )

    async def close(self) -> None:
        await self.peers.close()
        self.channels.close()
        self.threads.close()
