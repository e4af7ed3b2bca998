"""A decode node: the `DecodeNode` gRPC service over one engine.

A request's life on a decode node (its blocks' lifecycle is `reservations.Phase`, owned by `Reservations`):
  Reserve   blocks allocated for the prompt, under a lease        (router, before anything is computed)
  ReceiveKV the prefill node's K/V land straight in those blocks  (prefill node, layer by layer, on the lane
            of the pair channel it names: one transfer at a time per lane, answered once its side is over;
            or written in place by a prefill node on this device, until KVWritten): `intake.KVIntake`
  Continue  the sequence is adopted with its first token and decoded by continuous batching; tokens stream
            back to the router until it finishes, is cancelled (the call ends) or the node is stopped
  Release   frees whatever is left; also what the lease does on its own if Continue never comes
A colocated node serves `Generate`: the whole request on this engine, prompt included.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from baton.common.kv_messages import kv_layout, layouts_match, share_to_proto
from baton.common.messages import (LOST_NODE_KEY, abort_for, responses_from_output, resumed_from_proto,
                                   sampling_from_proto)
from baton.common.logs import REQUEST_ID, client_request_id
from baton.common.metrics import NodeMetrics
from baton.engine import ConfigError, FieldError, NoCapacity
from baton.engine.async_engine import AsyncEngine, EngineFailed
from baton.engine.omp import serial_torch
from baton.engine.parallel import kv_routes, shard
from baton.kvtransfer.channel import LANES_PER_PAIR, KVStoreHost, PairChannels, TransferCancelled, TransferThreads
from baton.kvtransfer.ranks import NodeRanks, RankWork
from baton.kvtransfer.shared import decode, share
from baton.v1 import node_pb2, node_pb2_grpc

from .intake import KVIntake, LaneBusy, NotFound, ReceiveFailed, Released
from .reservations import NotAllowed, Phase, Reservations
from .streams import StreamsCall

log = logging.getLogger(__name__)

DEFAULT_LEASE_MS = 30_000
MAX_CHOICES = 128  # choices of one prompt in one Continue (OpenAI's n; the router allows as many)


class DecodeServicer(node_pb2_grpc.DecodeNodeServicer):
    def __init__(self, node_id: str, role: str, engine: AsyncEngine, store: KVStoreHost | None,
                 transfer_timeout: float = 30.0, peer_idle_seconds: float = 60.0, publish_share: bool = True,
                 model: str = "", rendezvous_secret: str = "") -> None:
        self.node_id = node_id
        self.role = role
        self.engine = engine
        self.store = store
        spec = engine.kv_spec
        # gloo for a CPU pool, NCCL for a CUDA one: the channel follows the KV cache's device.
        self.channels = PairChannels(node_id, spec.device, local_store=store, secret=rendezvous_secret)
        self.threads = TransferThreads("kv-recv", thread_setup=serial_torch)
        self.transfer_timeout = transfer_timeout
        self.peer_idle_seconds = peer_idle_seconds
        self.reservations = Reservations(engine)
        self.layout = kv_layout(spec)
        self.requests_served = 0
        # `model`: the name the node registers its model under ("": the architecture's), its metrics' label.
        self.metrics = NodeMetrics(node_id, role, model or engine.model_config.architecture,
                                   spec.tensor_parallel_size, engine.rank_pids())
        # The same-device path: how a prefill node on this device maps the KV storage (a CUDA allocation is
        # always shareable; a CPU one only when the engine put it in /dev/shm).
        storage, shm_path = engine.kv_storage
        self.share, self.rank_shares = None, []
        if publish_share and (storage.device.type == "cuda" or shm_path):
            self.share = share_to_proto(share(storage, shm_path))
            self.rank_shares = [share_to_proto(decode(p)) for p in engine.rank_pools()]
            log.info("kv storage shareable on %s (%d ranks)", self.share.device_id, 1 + len(self.rank_shares))
        # A tensor-parallel node's ranks each receive their own KV heads (kvtransfer/ranks.py), rank 0 asking
        # the others through their pipes.
        self.shards = [shard(engine.model_config, spec.tensor_parallel_size, r)
                       for r in range(spec.tensor_parallel_size)]
        ranks = NodeRanks(RankWork(engine.kv_pools, spec.device, self.channels), self.threads, engine.rank_links())
        # The K/V coming in, both paths: lane claims, write deadlines, bytes received.
        self.intake = KVIntake(node_id, engine, self.reservations, ranks, [s.kv_head_start for s in self.shards],
                               store.address if store else "", transfer_timeout, self.metrics.transfer_done)
        self.handing_over = False  # stopping: each stream ends at its next token, for the router to move it
        self._streams_calls: set[StreamsCall] = set()  # the routers' Streams calls
        self._streams_closing = False  # stopping: Streams calls take no new stream and end with their last
        engine.set_step_observer(self.metrics.observe_step)
        self.advertise("")  # until its server is bound (`advertise`)

    # -- reservations -------------------------------------------------------------------------------

    async def Reserve(self, request, context):
        REQUEST_ID.set(client_request_id(request.request_id))  # in every line logged about it
        try:
            r = await self.reservations.reserve(request.request_id, request.prompt_tokens, request.max_tokens,
                                                (request.lease_ms or DEFAULT_LEASE_MS) / 1000, request.token_ids)
        except (FieldError, NoCapacity) as e:
            await abort_for(context, e)
        target = node_pb2.KVTarget(block_ids=r.blocks, transfer_tag=r.tag, cached_blocks=r.cached)
        target.MergeFrom(self.target)
        return node_pb2.ReserveResponse(target=target)

    def advertise(self, address: str) -> None:
        """Where prefill nodes reach this node (known once its server is bound): what every reservation's
        target says of it, besides its blocks."""
        self.target = node_pb2.KVTarget(
            decode_node_id=self.node_id, decode_address=address,
            kv_store_address=self.store.address if self.store else "", layout=self.layout, share=self.share,
            rank_shares=self.rank_shares,
        )

    async def housekeeping(self) -> None:
        """Periodic: leases that ran out, and channel state of prefill nodes not heard from in a while."""
        await self.reservations.expire()
        self.channels.prune(self.peer_idle_seconds)

    async def Release(self, request, context):
        REQUEST_ID.set(client_request_id(request.request_id))  # in every line logged about it
        return node_pb2.ReleaseResponse(freed_blocks=await self.reservations.release(request.request_id, "released"))

    # -- KV transfer (decode/intake.py owns it; here, its gRPC face) ---------------------------------

    async def ReceiveKV(self, request, context):
        """Answered only once this node's side of the transfer is over (every message on its lane matched, or
        the lane given up): OK, NOT_FOUND (drained) and ABORTED (the sender's cancel header) leave the lane in
        step for the prefill node's next transfer on it; any other answer means its generation must go."""
        REQUEST_ID.set(client_request_id(request.request_id))  # in every line logged about it
        if not layouts_match(request.layout, self.layout, any_degree=True):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "layout: the two nodes' KV layouts differ")
        if request.first_block >= max(1, len(request.block_ids)):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"first_block: {request.first_block} is past the "
                                f"target's {len(request.block_ids)} blocks")
        if request.shared:
            if self.share is None:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    "shared: this node's KV storage is not shared")
            try:
                self.intake.begin_write(request)
            except (NotFound, FieldError, NotAllowed) as e:
                await context.abort(_status_of(e), str(e))
            return node_pb2.ReceiveKVResponse()
        try:  # which sender rank sends which heads to which of this node's ranks
            routes = kv_routes(self.engine.model_config, request.layout.tensor_parallel_size or 1, len(self.shards))
        except ConfigError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"layout: the sender's degree: {e}")
        if request.lane >= LANES_PER_PAIR:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"lane: must be below {LANES_PER_PAIR}, got {request.lane}")
        try:
            received = await self.intake.receive(request, routes)
        except (LaneBusy, Released, FieldError, NotAllowed, TransferCancelled, ReceiveFailed) as e:
            await context.abort(_status_of(e), str(e))
        return node_pb2.ReceiveKVResponse(bytes_received=received)

    async def PullKV(self, request, context):
        """The pull path: cached blocks of a reservation sent back to the prefill node that asked (it computes
        from after them). Answered once this node's side is over: OK, NOT_FOUND (no reservation) and
        INVALID_ARGUMENT (blocks it does not hold cached) leave the lane in step (a cancel header went);
        UNAVAILABLE means its generation must go."""
        REQUEST_ID.set(client_request_id(request.request_id))  # in every line logged about it
        if not layouts_match(request.layout, self.layout, any_degree=True):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "layout: the two nodes' KV layouts differ")
        if request.lane >= LANES_PER_PAIR:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"lane: must be below {LANES_PER_PAIR}, got {request.lane}")
        if not request.block_ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "block_ids: no block to pull")
        try:  # which of this node's ranks sends which heads to which rank of the prefill node
            routes = kv_routes(self.engine.model_config, len(self.shards), request.layout.tensor_parallel_size or 1)
        except ConfigError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"layout: the prefill node's degree: {e}")
        try:
            sent = await self.intake.send_back(request, routes)
        except (LaneBusy, NotFound, FieldError, ReceiveFailed) as e:
            await context.abort(_status_of(e), str(e))
        return node_pb2.PullKVResponse(bytes_sent=sent)

    async def KVWritten(self, request, context):
        REQUEST_ID.set(client_request_id(request.request_id))  # in every line logged about it
        try:
            await self.intake.end_write(request.request_id, request.prefill_node_id, request.ok, request.bytes_written)
        except NotFound as e:
            await context.abort(_status_of(e), str(e))
        return node_pb2.KVWrittenResponse()

    # -- decoding -----------------------------------------------------------------------------------

    async def Continue(self, request, context):
        REQUEST_ID.set(client_request_id(request.request_id))  # in every line logged about it
        with self.metrics.request(context) as track:
            rid = request.request_id
            r = self.reservations.get(rid)
            if r is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"request_id: no reservation for {rid!r}")
            try:
                params = sampling_from_proto(request.sampling)
                if not request.first_logprob <= 0:  # NaN, or a probability above 1
                    raise FieldError("first_logprob",
                                     f"must be a log-probability (<= 0), got {request.first_logprob}")
                forks = _forks(request)
                if request.prefill_here:
                    # Conditional disaggregation: no K/V come; this node computes what its cached blocks lack.
                    if forks:
                        raise FieldError("forks", "not with prefill_here")
                    try:
                        self.reservations.compute_here(r)
                    except NotAllowed as e:
                        raise FieldError("prefill_here", str(e).removeprefix("prefill_here: ")) from None
                else:
                    try:
                        await asyncio.wait_for(r.settled.wait(), self.reservations.lease_left(r))
                    except TimeoutError:
                        await self.reservations.release(rid, "lease expired")  # deferred if K/V are still landing
                        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                            "the KV cache did not arrive within the lease")
                    if r.phase is not Phase.READY:
                        # Its K/V did not come: the prefill node or this one's side of the transfer failed.
                        context.set_trailing_metadata(((LOST_NODE_KEY, ""),))
                        await context.abort(grpc.StatusCode.UNAVAILABLE,
                                            f"request_id: {rid!r} was released ({r.cause})")
                    self.reservations.advance(r, Phase.DECODING)
                async for response in self._choices(request, params, forks, context, track):
                    yield response
            except FieldError as e:
                await abort_for(context, e)
            except EngineFailed as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"decode node {self.node_id}: {e}")
            finally:
                # However the call ends (finished, failed, cancelled, lease run out while waiting): the request's
                # blocks go, now or, if K/V are still landing, when they have landed.
                await asyncio.shield(self.reservations.release(rid, "finished"))

    async def _choices(self, request, params, forks, context, track):
        """A request's choices from one prompt's K/V (one, without forks): choice 0 adopts the reservation
        (with what a resumed stream delivered); choice k + 1 forks from its full blocks (`engine.fork`: shared,
        never written; the tail of the prompt computed again in its own blocks) and samples its own first
        token. One call streams them all, each response tagged with its choice; the caller's Release (or this
        call's end) frees the lot."""
        rid, prompt = request.request_id, list(request.prompt_token_ids)
        ids = _choice_ids(rid, len(forks))
        stream = self.engine.open_streams(ids)  # before the engine has them: a release ends their streams
        try:
            # The forks first: choice 0 may end with its first token, and its blocks with it.
            for k, fork_params in enumerate(forks):
                await self.engine.fork(rid, ids[k + 1], prompt, fork_params)
            resumed = resumed_from_proto(request.resumed)
            if request.prefill_here:  # every output comes from here, the first token's too
                await self.engine.compute_rest(rid, prompt, params, resumed)
                finished = False
            else:
                first = await self.engine.adopt(rid, prompt, request.first_token, request.first_logprob, params,
                                                resumed)
                finished = first.finished
            self.requests_served += len(ids)
            if not request.prefill_here:
                track.adopted()
            # A first token that ended choice 0 was relayed with its Finish by the router: nothing more comes.
            outputs = self.engine.outputs_of(ids[1:] if finished else ids, stream)
            async for response in self._relayed(outputs, request, ids, context, track):
                yield response
        finally:
            for request_id in ids:  # choice 0's blocks go with the reservation (the caller releases it)
                self.engine.close_stream(request_id)
            for request_id in ids[1:]:
                await asyncio.shield(self.engine.release(request_id))

    async def Generate(self, request, context):
        """Colocated mode: prompt and decode on this engine; with `forks`, every choice of the prompt from one
        computation of it (`AsyncEngine.generate_choices`), each response tagged with its choice."""
        REQUEST_ID.set(client_request_id(request.request_id))  # in every line logged about it
        with self.metrics.request(context, len(request.prompt_token_ids)) as track:
            try:
                rid, prompt = request.request_id, list(request.prompt_token_ids)
                params = sampling_from_proto(request.sampling)
                forks = _forks(request)
                ids = _choice_ids(rid, len(forks))
                if forks:
                    outputs = self.engine.generate_choices(ids, prompt, [params, *forks])
                else:
                    outputs = self.engine.generate(rid, prompt, params, resumed=resumed_from_proto(request.resumed))
                self.requests_served += len(ids)
                async for response in self._relayed(outputs, request, ids, context, track):
                    yield response
            except (FieldError, NoCapacity) as e:
                await abort_for(context, e)
            except EngineFailed as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"node {self.node_id}: {e}")

    async def _relayed(self, outputs, request, ids: list[str], context, track):
        """The responses for the outputs of a request's choices (`ids`, choice 0 first), each under the request's
        id and tagged with its choice, with the log-probabilities that choice asked for."""
        choice = {request_id: i for i, request_id in enumerate(ids)}
        async for out in outputs:
            await self._unless_handing_over(out, context)
            track.output(out)
            j = choice[out.request_id]
            for response in responses_from_output(out, (request.forks[j - 1] if j else request.sampling).logprobs):
                response.request_id, response.choice = request.request_id, j
                yield response

    async def Streams(self, request_iterator, context):
        """A router's streams on this node, on one call (decode/streams.py)."""
        call = StreamsCall(self.node_id, self.Generate, self.Continue, lambda: self._streams_closing)
        self._streams_calls.add(call)
        try:
            async for batch in call.serve(request_iterator):
                yield batch
        finally:
            self._streams_calls.discard(call)

    def close_streams(self) -> None:
        """The node stops serving: each Streams call refuses new streams and ends once its last has."""
        self._streams_closing = True
        for call in self._streams_calls:
            call.wake()

    def hand_over(self) -> None:
        """The node is stopping and its drain time is up: each stream it still decodes (Continue, or a
        colocated Generate) ends UNAVAILABLE at its next token, naming this node, and the router resumes it on
        another node from what it delivered."""
        self.handing_over = True
        log.info("%s: handing over the streams still running", self.node_id)

    async def _unless_handing_over(self, out, context) -> None:
        if self.handing_over and out.finish_reason is None:
            # Before these tokens go out: the node that resumes the stream sends them.
            context.set_trailing_metadata(((LOST_NODE_KEY, self.node_id),))
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"node {self.node_id} is stopping: the stream is "
                                "handed over")

    async def GetStats(self, request, context):
        return await self.stats()

    async def stats(self) -> node_pb2.NodeStats:
        load = await self.engine.load()
        return node_pb2.NodeStats(
            node_id=self.node_id, role=self.role, total_blocks=load.total_blocks, free_blocks=load.free_blocks,
            running=load.running, waiting=load.waiting, queued_tokens=load.queued_tokens,
            reserved=self.reservations.pending, kv_bytes_received=self.intake.bytes_received,
            kv_bytes_pulled=self.intake.bytes_pulled,
            requests_served=self.requests_served, peers=self.channels.peers(), rank_kv_bytes=self.intake.rank_bytes,
            prefix_cache=node_pb2.PrefixCache(**await self.engine.prefix_cache()),
        )

    async def close(self) -> None:
        self.intake.close()
        await self.reservations.release_all("node shutdown")
        self.channels.close()
        self.threads.close()


# How the intake's refusals and ends answer ReceiveKV and KVWritten. OK, NOT_FOUND (a drained transfer) and
# ABORTED (a cancel header) tell the prefill node that the lane is in step; a Released that could not be
# drained is UNAVAILABLE, like a failed receive: the lane's generation must go.
_INTAKE_STATUS = (
    (LaneBusy, grpc.StatusCode.FAILED_PRECONDITION), (NotAllowed, grpc.StatusCode.FAILED_PRECONDITION),
    (FieldError, grpc.StatusCode.INVALID_ARGUMENT), (NotFound, grpc.StatusCode.NOT_FOUND),
    (TransferCancelled, grpc.StatusCode.ABORTED), (ReceiveFailed, grpc.StatusCode.UNAVAILABLE),
)


def _status_of(e: Exception) -> grpc.StatusCode:
    if isinstance(e, Released):
        return grpc.StatusCode.NOT_FOUND if e.drained else grpc.StatusCode.UNAVAILABLE
    return next(code for kind, code in _INTAKE_STATUS if isinstance(e, kind))


def _choice_ids(request_id: str, forks: int) -> list[str]:
    """The engine's ids of a request's choices: its own, then one per fork."""
    return [request_id] + [f"{request_id}#{k + 1}" for k in range(forks)]


def _forks(request) -> list:
    """The sampling of a request's other choices (`forks` of a Continue or Generate), checked."""
    forks = [sampling_from_proto(f) for f in request.forks]
    if forks and request.resumed.token_ids:
        raise FieldError("forks", "a resumed stream has no other choices")
    if len(forks) >= MAX_CHOICES:
        raise FieldError("forks", f"at most {MAX_CHOICES - 1}, got {len(forks)}")
    return forks
