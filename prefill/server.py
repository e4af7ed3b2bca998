"""A prefill node: the `PrefillNode` gRPC service over one engine.

A request's life on a prefill node:
  1. the decode node's entry (gRPC channel, pair channel generation) and a lane of that generation which no other
     transfer holds are taken from `DecodePeers` (waiting while every lane is held), the decode node is asked
     over gRPC to receive the request's K/V on that lane into the blocks it reserved (ReceiveKV), and the
     lane's groups are opened (or reused): one per route, from each rank of this node that holds KV heads of
     a decode rank to that rank (`kvtransfer.ranks`; one route between two single-rank nodes)
  2. the prompt joins the engine's next batch; when its step starts each route's header goes out, and as
     soon as layer L is computed, each rank copies out layer L's K/V of its routes' heads for the prompt's
     blocks and posts them (the engines' KV sinks: engine threads, non-blocking)
  3. the first token is sampled and streamed to the router at once; the engine frees the prompt's blocks
     when the step ends (the sends read the copies)
  4. once every send has completed and the decode node confirmed, TransferDone ends the call
Whatever ends the call early (client cancel, deadline, a failure), the request leaves the engine first, then
its transfer is ended so that the lane stays in step (a cancel header if it had not begun, zeros for the
layers it still owed otherwise). The lane goes back only once the decode node has answered the ReceiveKV
call (received, drained after a release, or cancelled by the header): only then has it matched every message
of the transfer, and only then may the next transfer use the lane. Any other end (the channel failed, the
call failed or timed out) drops the generation, every lane of it. A failed transfer fails this call with
UNAVAILABLE; the router releases the reservation.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import grpc
import torch

from baton.common.kv_messages import kv_layout, layouts_match, share_from_proto
from baton.common.messages import (LOST_NODE_KEY, abort_for, chunk_from_output, finish_to_proto, resumed_from_proto,
                                   sampling_from_proto)
from baton.common.logs import REQUEST_ID, client_request_id
from baton.common.metrics import NodeMetrics, RequestMetrics
from baton.engine import ConfigError, FieldError, NoCapacity
from baton.engine.async_engine import AsyncEngine, EngineFailed
from baton.engine.parallel import kv_routes, shard
from baton.kvtransfer.channel import KVTransferError, PairChannels, TransferThreads
from baton.kvtransfer.ranks import DropGeneration, EndRoutes, NodeRanks, OpenRoute, RankWork
from baton.kvtransfer.routes import Route, rank_name
from baton.kvtransfer.sender import Staging, check_runs, coalesce
from baton.kvtransfer.shared import SharedWriter, device_id
from baton.v1 import node_pb2, node_pb2_grpc

from .peers import DecodePeer, DecodePeers

log = logging.getLogger(__name__)


class PrefillServicer(node_pb2_grpc.PrefillNodeServicer):
    def __init__(self, node_id: str, engine: AsyncEngine, transfer_timeout: float = 30.0,
                 peer_idle_seconds: float = 60.0, kv_path: str = "auto", model: str = "") -> None:
        self.node_id = node_id
        self.engine = engine
        self.spec = engine.kv_spec
        # "pair": always the pair channel; otherwise the same-device path wherever a decode node offers its
        # storage on this node's device (kvtransfer/shared.py).
        self.kv_path = kv_path
        self.device_id = device_id(self.spec.device)
        self.channels = PairChannels(node_id, self.spec.device)
        self.threads = TransferThreads("kv-send")
        self.staging = Staging()  # the packed layers' buffers, reused from transfer to transfer
        self.peers = DecodePeers(self.channels, self.threads, peer_idle_seconds)
        self.transfer_timeout = transfer_timeout
        self.layout = kv_layout(self.spec)
        tp = self.spec.tensor_parallel_size
        self.shards = [shard(engine.model_config, tp, r) for r in range(tp)]
        # Rank 0's route senders here, the other ranks' through their pipes.
        self.ranks = NodeRanks(RankWork(engine.kv_pools, self.spec.device, self.channels, self.staging), self.threads,
                               engine.rank_links())
        self.routes = self.ranks.local.senders
        self.rank_bytes = [0] * tp  # KV bytes each rank sent
        # The same-device path's writer per transfer, registered before its prompt can be scheduled and removed
        # only once the request has left the engine: the engine thread (the KV sink below) reads it in between.
        self._senders: dict[str, SharedWriter] = {}
        self._lock = threading.Lock()
        self.kv_bytes_sent = 0
        self.requests_served = 0
        # `model`: the name the node registers its model under ("": the architecture's), its metrics' label.
        self.metrics = NodeMetrics(node_id, "prefill", model or engine.model_config.architecture, tp)
        engine.set_kv_sink(self)
        engine.set_step_observer(self.metrics.observe_step)

    # -- the KV sink (engine thread, inside a step): never raises, a failure stays with its transfer ----

    def _sender(self, request_id: str) -> SharedWriter | None:
        with self._lock:
            return self._senders.get(request_id)

    def step_started(self, prompts: list[tuple[str, list[int]]], pool: torch.Tensor) -> None:
        self.routes.step_started(prompts, pool)
        for rid, table in prompts:
            sender = self._sender(rid)
            if sender is not None:
                try:
                    sender.begin(table[: sender.num_blocks], pool)
                except Exception as e:  # noqa: BLE001 - fails this transfer only (kept by the sender)
                    log.warning("kv transfer of %s: the header failed: %s", rid, e)

    def layer_done(self, layer: int, pool: torch.Tensor, prompts: list[tuple[str, list[int]]]) -> None:
        self.routes.layer_done(layer, pool, prompts)
        for rid, _ in prompts:
            sender = self._sender(rid)
            if sender is not None and sender.failed is None and sender.header is not None:
                try:
                    sender.send_layer(layer, pool)
                except Exception as e:  # noqa: BLE001 - a dead decode node fails only the requests bound for it
                    log.warning("kv transfer of %s: layer %d failed: %s", rid, layer, e)

    # -- the service ----------------------------------------------------------------------------------

    async def Prefill(self, request, context):
        REQUEST_ID.set(client_request_id(request.request_id))  # in every line logged about it
        with self.metrics.request(context, len(request.prompt_token_ids)) as track:
            rid, target = request.request_id, request.target
            try:
                params = sampling_from_proto(request.sampling)
                prompt = list(request.prompt_token_ids)
                # A resumed stream's delivered tokens are computed (and their K/V sent) with the prompt.
                computed = len(prompt) + len(request.resumed.token_ids)
                runs = coalesce(list(target.block_ids))
                if check_runs(runs) != self.engine.blocks_for(computed):
                    raise FieldError("target.block_ids", f"{check_runs(runs)} blocks for {computed} tokens to compute "
                                     f"(they fill {self.engine.blocks_for(computed)})")
            except FieldError as e:
                await abort_for(context, e)
            # A tensor-parallel prefill node sends from every rank: through the pair channels only, so far.
            same_device = (self.kv_path != "pair" and len(self.shards) == 1 and target.HasField("share")
                           and target.share.device_id == self.device_id)
            if not layouts_match(target.layout, self.layout, any_degree=True):
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "layout: the two nodes' KV layouts differ")
            try:
                routes = kv_routes(self.engine.model_config, len(self.shards), target.layout.tensor_parallel_size or 1)
            except ConfigError as e:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"layout: the decode node's degree: {e}")
            if same_device:
                async for event in self._prefill_shared(request, prompt, params, context, track):
                    yield event
                return
            transfer = _Transfer()
            try:
                transfer.peer, transfer.generation, transfer.lane = await self.peers.acquire(
                    target.decode_node_id, target.decode_address, target.kv_store_address, self.transfer_timeout)
                started = time.monotonic()
                # From here this node owes the decode node a transfer on this lane (a whole one, or a cancel
                # header): the decode node posts its receive on this call.
                transfer.receive_call = transfer.peer.stub.ReceiveKV(
                    node_pb2.ReceiveKVRequest(request_id=rid, prefill_node_id=self.node_id,
                                              generation=transfer.generation, layout=self.layout,
                                              num_tokens=computed, block_ids=target.block_ids,
                                              transfer_tag=target.transfer_tag, lane=transfer.lane),
                    timeout=self.transfer_timeout,
                )
                # Its answer, awaited through a shield (awaiting the call itself would cancel it with its awaiter):
                # the lane may not go back before it.
                transfer.answer = asyncio.ensure_future(transfer.receive_call)
                transfer.answer.add_done_callback(_retrieve)
                self._open_routes(rid, target, transfer, routes, runs)
                await asyncio.shield(asyncio.gather(*(opening for _, opening in transfer.opens)))
                first = await self._compute(request, prompt, params, track)
                # From the first token on, the transfer's end is the request's: it goes on (and is counted) if
                # the call ends first, as it may once the decode node has the K/V (the router does not wait).
                confirmed = track.defer_to(asyncio.ensure_future(self._confirmed(rid, transfer, started, track)))
                confirmed.add_done_callback(_retrieve)
                yield first
                sent = await asyncio.shield(confirmed)
                yield node_pb2.PrefillEvent(transfer_done=node_pb2.TransferDone(bytes_sent=sent))
            except (FieldError, NoCapacity) as e:
                await abort_for(context, e)
            except (KVTransferError, grpc.aio.AioRpcError) as e:
                # NOT_FOUND: the decode node had released the reservation; it took the transfer in and dropped
                # it, so the lane is fine. Anything else: the channel (or the node) failed.
                dropped = isinstance(e, grpc.aio.AioRpcError) and e.code() == grpc.StatusCode.NOT_FOUND
                transfer.failed = transfer.failed or not _lane_in_step(e)
                if dropped:  # the request was over on the decode side (cancelled): not a failure of anything
                    log.info("kv transfer of %s to %s dropped there: %s", rid, target.decode_node_id, e.details())
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"{target.decode_node_id}: {e.details()}")
                log.warning("kv transfer of %s to %s failed: %s", rid, target.decode_node_id, _short(e))
                context.set_trailing_metadata(((LOST_NODE_KEY, target.decode_node_id),))  # the router avoids it
                await context.abort(grpc.StatusCode.UNAVAILABLE,
                                    f"kv transfer to {target.decode_node_id} failed: {_short(e)}")
            except EngineFailed as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"prefill node {self.node_id}: {e}")
            finally:
                # Shielded: a cancelled call still ends its transfer and lets go of its peer entry.
                await asyncio.shield(self._end(rid, transfer, runs))

    async def _confirmed(self, rid: str, transfer: _Transfer, started: float, track: RequestMetrics) -> int:
        """The bytes sent, once every route has ended and the decode node has answered (received them all)."""
        sent = await asyncio.shield(self._finish_routes(rid, transfer))
        await asyncio.shield(transfer.answer)
        self.kv_bytes_sent += sent
        self.metrics.transfer_done(started)
        track.settle("ok")
        return sent

    def _open_routes(self, rid: str, target, transfer: _Transfer, routes, runs: list[tuple[int, int]]) -> None:
        """Starts opening each route's lane (on the rank that sends it) and registering its sender there."""
        for route in routes:
            start = self.shards[route.src].kv_head_start
            mine = Route(rid, rank_name(self.node_id, route.src), rank_name(target.decode_node_id, route.dst),
                         transfer.generation, transfer.lane, target.kv_store_address, tuple(runs),
                         (route.head_start - start, route.head_end - start), self.spec.num_layers)
            opening = self.ranks.call(route.src, OpenRoute(mine, self.transfer_timeout))
            opening.add_done_callback(_retrieve)
            transfer.opens.append((route.src, opening))

    def _finish_routes(self, rid: str, transfer: _Transfer) -> asyncio.Future:
        """Each sending rank's routes ended (what they still owe sent) and waited for: the bytes sent. Once per
        transfer, however many times it is asked for; raises the first rank's KVTransferError."""
        if transfer.finishing is None:
            async def finish() -> int:
                ranks = sorted({src for src, _ in transfer.opens})
                ends = [self.ranks.call(rank, EndRoutes(rid, self.transfer_timeout)) for rank in ranks]
                results = await asyncio.gather(*ends, return_exceptions=True)
                for rank, result in zip(ranks, results):
                    if isinstance(result, int):
                        self.rank_bytes[rank] += result
                error = next((r for r in results if isinstance(r, BaseException)), None)
                if error is not None:
                    raise error if isinstance(error, KVTransferError) else KVTransferError(str(error))
                return sum(results)

            transfer.finishing = asyncio.ensure_future(finish())
            transfer.finishing.add_done_callback(_retrieve)
        return transfer.finishing

    async def _compute(self, request, prompt: list[int], params, track: RequestMetrics,
                       writer: SharedWriter | None = None) -> node_pb2.PrefillEvent:
        """Registers the same-device path's writer for the KV sink (the pair path's route senders are
        registered where they were opened), computes the prompt (its layers go out as they are done) and
        returns the first-token event."""
        if writer is not None:
            with self._lock:
                self._senders[request.request_id] = writer
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

    async def _prefill_shared(self, request, prompt: list[int], params, context, track: RequestMetrics):
        """The same-device path: the K/V are copied straight into the decode node's pool, mapped here; the
        decode node holds the reservation as receiving from ReceiveKV (shared) until KVWritten."""
        rid, target = request.request_id, request.target
        computed = len(prompt) + len(request.resumed.token_ids)
        peer = self.peers.entry(target.decode_node_id, target.decode_address, target.kv_store_address)
        writer, owed, confirmed = None, False, None  # owed: the decode node waits for KVWritten
        try:
            targets = await self._shared_targets(peer, target)
            # Owed from the moment the call may reach the decode node: cancelled while it is in flight, this
            # call still says "given up" (a decode node that never began answers NOT_FOUND, harmlessly).
            owed = True
            started = time.monotonic()
            await peer.stub.ReceiveKV(node_pb2.ReceiveKVRequest(
                request_id=rid, prefill_node_id=self.node_id, layout=self.layout, num_tokens=computed,
                block_ids=target.block_ids, transfer_tag=target.transfer_tag, shared=True), timeout=self.transfer_timeout)
            writer = SharedWriter(targets, list(target.block_ids), self.spec.num_layers)
            first = await self._compute(request, prompt, params, track, writer)
            # As on the pair path: from the first token on, the request's end is its writes'.
            confirmed = track.defer_to(asyncio.ensure_future(self._written(rid, peer, writer, started, track)))
            confirmed.add_done_callback(_retrieve)
            yield first
            written = await asyncio.shield(confirmed)
            owed = False
            yield node_pb2.PrefillEvent(transfer_done=node_pb2.TransferDone(bytes_sent=written))
        except (FieldError, NoCapacity) as e:
            await abort_for(context, e)
        except (KVTransferError, grpc.aio.AioRpcError, ValueError, RuntimeError) as e:
            # ValueError / RuntimeError: the pool could not be mapped (a stale handle, another device).
            # A refused ReceiveKV owes nothing; a failed KVWritten leaves the blocks to the decode node's deadline.
            owed = owed and not isinstance(e, grpc.aio.AioRpcError)
            if isinstance(e, grpc.aio.AioRpcError) and e.code() == grpc.StatusCode.NOT_FOUND:
                # The decode node had released the reservation (the request was cancelled): as on the pair
                # path, a drop, not a failure of anything (the cancellation storm found it logged as one).
                log.info("kv writes of %s into %s dropped there: %s", rid, target.decode_node_id, e.details())
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"{target.decode_node_id}: {e.details()}")
            log.warning("kv writes of %s into %s failed: %s", rid, target.decode_node_id, _short(e))
            context.set_trailing_metadata(((LOST_NODE_KEY, target.decode_node_id),))  # the router avoids it
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"kv transfer to {target.decode_node_id} failed: {_short(e)}")
        except EngineFailed as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"prefill node {self.node_id}: {e}")
        finally:
            await asyncio.shield(self._end_shared(rid, peer, writer, owed, confirmed))

    async def _shared_targets(self, peer: DecodePeer, target) -> list[tuple[torch.Tensor, int, int]]:
        """Each decode rank's storage, mapped here, with the range of this node's KV heads it holds
        (`kv_routes`: all of them from this single rank)."""
        shares = [target.share, *target.rank_shares]
        routes = kv_routes(self.engine.model_config, 1, len(shares))
        mapped = [await self.peers.mapped_pool(peer, share_from_proto(s), self.spec.device, rank)
                  for rank, s in enumerate(shares)]
        return [(mapped[r.dst], r.head_start, r.head_end) for r in routes]

    async def _written(self, rid: str, peer: DecodePeer, writer: SharedWriter, started: float,
                       track: RequestMetrics) -> int:
        """The bytes written, once the copies have ended and the decode node has been told (KVWritten)."""
        written = await self.threads.run(writer.wait, self.transfer_timeout)
        await peer.stub.KVWritten(node_pb2.KVWrittenRequest(
            request_id=rid, prefill_node_id=self.node_id, ok=True, bytes_written=written),
            timeout=self.transfer_timeout)
        self.kv_bytes_sent += written
        self.metrics.transfer_done(started)
        track.settle("ok")
        return written

    async def _end_shared(self, rid: str, peer: DecodePeer, writer: SharedWriter | None, owed: bool,
                          confirmed: asyncio.Future | None) -> None:
        if confirmed is not None:  # the call ended while its writes were being confirmed: they end first
            await asyncio.wait([confirmed])
            owed = owed and (confirmed.cancelled() or confirmed.exception() is not None)
        await self.engine.release(rid)  # after it, the engine thread queues no copy for this request
        with self._lock:
            self._senders.pop(rid, None)
        if writer is not None:
            writer.end_early()
            await self.threads.run(writer.settle)  # the blocks are the decode node's again only after this
        if owed:
            try:
                await peer.stub.KVWritten(node_pb2.KVWrittenRequest(request_id=rid, prefill_node_id=self.node_id,
                                                                    ok=False), timeout=self.transfer_timeout)
            except grpc.aio.AioRpcError as e:
                # NOT_FOUND: the decode node had not begun (the call was cancelled in flight) or already ended.
                # Anything else: its deadline frees the blocks anyway.
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    log.info("kv writes of %s: telling %s they were given up did not reach it: %s", rid,
                             peer.node_id, _short(e))
        self.peers.release(peer)

    async def _end(self, rid: str, transfer: _Transfer, runs: list[tuple[int, int]]) -> None:
        """Ends a call's transfer, whatever ended the call. The request leaves the engine first (a queued
        release runs after the add and after any step computing it): after that no layer is posted for it on
        any rank, and what each route still owes can be settled here."""
        await self.engine.release(rid)
        if transfer.opens:
            # Ended while lanes were being opened: the decode ranks still wait for their routes' headers, so a
            # cancel header goes on each route as soon as it is open. A route that could not open loses the lane.
            opened = await asyncio.gather(*(opening for _, opening in transfer.opens), return_exceptions=True)
            transfer.failed = transfer.failed or any(isinstance(o, BaseException) for o in opened)
            try:
                await self._finish_routes(rid, transfer)
            except KVTransferError as e:
                if not transfer.failed:
                    log.warning("kv transfer of %s ended with a failure: %s", rid, e)
                transfer.failed = True
        elif transfer.answer is not None:
            transfer.failed = True  # the decode node waits for a header that will not come
        if transfer.answer is not None:
            if not transfer.failed:
                # The lane is this transfer's until the decode node has answered: only then were all its
                # messages matched there (a completed send proves nothing: NCCL completes small sends
                # before the recvs are posted).
                try:
                    await asyncio.wait_for(asyncio.shield(transfer.answer), self.transfer_timeout)
                except Exception as e:  # noqa: BLE001 - the call's error, or no answer in time
                    if not _lane_in_step(e):
                        log.warning("kv transfer of %s: the decode node did not answer in step: %s", rid, _short(e))
                        transfer.failed = True
            transfer.receive_call.cancel()  # a no-op once it has completed
        if transfer.peer is not None:
            if transfer.failed:
                self.peers.failed(transfer.peer, transfer.generation)  # before the release: the lane is lost
                for rank in self.ranks.others:  # the other ranks' groups of that generation go too
                    self.ranks.call(rank, DropGeneration(transfer.peer.node_id, transfer.generation)
                                    ).add_done_callback(_retrieve)
            self.peers.release(transfer.peer, transfer.generation, transfer.lane)

    async def GetStats(self, request, context):
        return await self.stats()

    async def stats(self) -> node_pb2.NodeStats:
        total, free, running, waiting = await self.engine.load()
        return node_pb2.NodeStats(
            node_id=self.node_id, role="prefill", total_blocks=total, free_blocks=free, running=running,
            waiting=waiting, kv_bytes_sent=self.kv_bytes_sent, requests_served=self.requests_served,
            peers=max(len(self.peers), self.channels.peers()), rank_kv_bytes=self.rank_bytes,
        )

    async def close(self) -> None:
        await self.peers.close()
        self.channels.close()
        self.threads.close()


def _short(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return str(e) or type(e).__name__


# The decode node's answers that say its side of the transfer is over with the lane in step: it drained the
# transfer (the reservation was gone), or it read a cancel header. Success is the third.
_IN_STEP = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ABORTED)


def _lane_in_step(e: BaseException) -> bool:
    """Whether a transfer that ended with `e` left its lane fit for the next transfer."""
    return isinstance(e, grpc.aio.AioRpcError) and e.code() in _IN_STEP


def _retrieve(answer: asyncio.Future) -> None:
    """Marks a ReceiveKV answer's error as seen (a failed transfer does not wait for its answer)."""
    if not answer.cancelled():
        answer.exception()


class _Transfer:
    """One call's transfer state, for its clean-up."""

    __slots__ = ("peer", "generation", "lane", "receive_call", "answer", "opens", "finishing", "failed")

    def __init__(self) -> None:
        self.peer: DecodePeer | None = None
        self.generation: int | None = None
        self.lane: int | None = None
        self.receive_call = None
        self.answer: asyncio.Future | None = None  # the ReceiveKV call's outcome
        self.opens: list[tuple[int, asyncio.Future]] = []  # (sending rank, its route's lane being opened)
        self.finishing: asyncio.Future | None = None  # the routes' ends: the bytes sent
        self.failed = False
