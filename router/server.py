"""The router: the public `Baton` service.

A request's life in the router (disaggregated):
  admit      validate every field, tokenize, give the request a cluster-unique id
  pick       the least loaded decode node and prefill node from the live membership
  Reserve    the decode node allocates the prompt's blocks (it owns them from here on)
  Prefill    the prefill node computes the prompt and writes its K/V into those blocks; its first token is
             relayed to the client at once
  Continue   the decode node goes on from the first token; its tokens are relayed as they come (every
             stream the router has on a node goes on one `Streams` call: `streams.NodeStreams`)
Whatever ends the request (finish, client cancel, deadline, a node failing), the `finally` releases what the
decode node holds: Release is idempotent, so it is always sent. In colocated mode one node's `Generate` does
it all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass

import grpc

from baton.common.logs import REQUEST_ID
from baton.common.membership import NodeInfo
from baton.common.messages import LOST_NODE_KEY, NODE_CHANNEL_OPTIONS
from baton.engine import FieldError
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc, node_pb2, node_pb2_grpc

from . import resume
from .admission import Admitted, UnknownModel, admit, check_text_size
from .choices import SharedPrefill
from .metrics import RequestMetrics, RouterMetrics
from .models import Models
from .picker import NoNode, Picker
from .streams import FeederFailed, NodeStreams

log = logging.getLogger(__name__)

# Node errors that say something about the request, passed to the client as they are.
_PASS_THROUGH = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


@dataclass(slots=True, eq=False)
class _Node:
    channel: grpc.aio.Channel
    decode: node_pb2_grpc.DecodeNodeStub
    prefill: node_pb2_grpc.PrefillNodeStub
    streams: NodeStreams  # the request streams on it, all on one call
    users: int = 0  # requests using the channel now
    left: bool = False  # its address left the membership: closed when its last request ends


class NodeStubs:
    """One channel and its stubs per node address, shared by the requests that `use` it. A channel to an
    address that left the membership (noticed when a new address is first used) is closed once its last request
    ends, never before: a draining node finishes its streams however long they take, and nodes that come and go
    leak nothing."""

    def __init__(self, live: Callable[[], set[str]]) -> None:
        self._live = live
        self._nodes: dict[str, _Node] = {}
        self._closing: set[asyncio.Task] = set()

    @contextlib.contextmanager
    def use(self, address: str) -> Iterator[_Node]:
        node = self._nodes.get(address)
        if node is not None and node.channel.get_state() == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            # Its node died, and (since it is picked) a node is live on that address again: a restart on the
            # same address. The old channel would fail every call until its reconnect backoff ran out.
            self._retire(address)
            node = None
        if node is None:
            self._prune()
            channel = grpc.aio.insecure_channel(address, options=NODE_CHANNEL_OPTIONS)
            decode = node_pb2_grpc.DecodeNodeStub(channel)
            node = self._nodes[address] = _Node(channel, decode, node_pb2_grpc.PrefillNodeStub(channel),
                                                NodeStreams(decode))
        node.users += 1
        try:
            yield node
        finally:
            node.users -= 1
            if node.left and not node.users:
                self._close(node)

    def _prune(self) -> None:
        live = self._live()
        for address in [a for a in self._nodes if a not in live]:
            self._retire(address)

    def _retire(self, address: str) -> None:
        node = self._nodes.pop(address)
        node.left = True
        if not node.users:
            self._close(node)

    def _close(self, node: _Node) -> None:
        task = asyncio.get_running_loop().create_task(_close(node))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        nodes = list(self._nodes.values())
        self._nodes = {}
        await asyncio.gather(*(_close(node) for node in nodes), *self._closing)


async def _close(node: _Node) -> None:
    await node.streams.close()
    await node.channel.close()


class NodeLost(Exception):
    """A node failed under a request (its calls broke, it stalled, or it said its peer failed): the request can
    resume elsewhere. `node_id` is the node to avoid, None when the failure does not say which of the two.
    `cause`: "failed" (it said so, or its calls broke), "silent" (given up for silence: its call is cancelled,
    so whatever it sends later reaches nobody: the node is fenced off from the stream) or "left" (it left the
    membership, or registered anew, while the attempt waited for its first token)."""

    def __init__(self, node_id: str | None, details: str, cause: str = "failed") -> None:
        super().__init__(details)
        self.node_id = node_id
        self.details = details
        self.cause = cause


class Refused(Exception):
    """Why a request is not served, or ended early: a gRPC status (each front maps it to its own) and a
    message; `field` names the request field at fault for INVALID_ARGUMENT."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


class NoDeadline:
    """What fronts without deadlines (OpenAI's HTTP API) pass where a grpc context gives `time_remaining()`."""

    @staticmethod
    def time_remaining() -> None:
        return None


class RouterServicer(baton_pb2_grpc.BatonServicer):
    def __init__(self, models: Models, picker: Picker, lease_ms: int = 30_000, max_migrations: int = 3,
                 inactivity_timeout: float = 10.0, node_wait: float = 5.0,
                 metrics: RouterMetrics | None = None) -> None:
        self.models = models
        self.picker = picker
        self.stubs = NodeStubs(lambda: {n.address for n in picker.membership.nodes()})
        self.lease_ms = lease_ms
        self.max_migrations = max_migrations
        self.inactivity_timeout = inactivity_timeout  # a decode stream silent this long is given up (and moved)
        self.node_wait = node_wait  # how long a request waits for a live node of a role that has none
        self.metrics = metrics or RouterMetrics(lambda: picker.membership.nodes())
        self._releasing: set[asyncio.Task] = set()  # releases on nodes a request moved away from
        self._rng = random.Random()

    async def ListModels(self, request, context):
        """The models a live node serves (what /v1/models and KServe's metadata list too)."""
        infos = [pb.ModelInfo(id=c.id, architecture=c.architecture, max_model_len=c.max_model_len,
                              vocab_size=c.vocab_size, dtype=c.dtype) for c in (m.card for m in self.models.live())]
        return pb.ListModelsResponse(models=infos)

    async def Tokenize(self, request, context):
        try:
            model = self.models.resolve(request.model)
            check_text_size("text", request.text, model.card)  # the bound Generate puts on a prompt
        except UnknownModel as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except FieldError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        special = request.add_special_tokens if request.HasField("add_special_tokens") else True
        return pb.TokenizeResponse(token_ids=model.tokenizer.encode(request.text, special))

    async def Generate(self, request, context):
        start = time.perf_counter()
        if not request.request_id:  # the id a proxy or tracing layer gave the call, when the message has none
            metadata_id = dict(context.invocation_metadata() or ()).get("x-request-id", "")
            if metadata_id:
                request.request_id = metadata_id
        try:
            req, mode = await self.admit(request, context, "grpc")
            async for response in self.serve(req, mode, context, "grpc", start, request.HasField("resume")):
                yield response
        except Refused as e:
            await context.abort(e.code, e.message)

    async def admit(self, request: pb.GenerateRequest, deadline, front: str) -> tuple[Admitted, str]:
        """Validates the request and waits (up to the node wait, within the deadline) for a node to serve it:
        what every front does before it answers anything. Raises `Refused` (counted as the request's end).
        `deadline` has `time_remaining()` (a grpc context, or `NoDeadline`)."""
        model = None
        try:
            model = self.models.resolve(request.model)
            request.model = model.name  # an alias, or none: the name from here on
            req = admit(request, model.card, model.tokenizer, self._rng)
            req.model = model
            return req, await self.picker.when_live(lambda: self.picker.mode(model.name), self._node_wait(deadline))
        except FieldError as e:
            refused = Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e), e.field)
        except UnknownModel as e:
            refused = Refused(grpc.StatusCode.NOT_FOUND, str(e))
        except NoNode as e:
            refused = Refused(grpc.StatusCode.UNAVAILABLE, str(e))
        # Labelled with the model it named when it is served (bounded), else none.
        self.metrics.requests.labels(model.name if model else "", front, refused.code.name).inc()
        raise refused

    def serve_choices(self, admitted: list[tuple[Admitted, str]], deadline, front: str,
                      start: float) -> list[AsyncIterator[pb.GenerateResponse]]:
        """The responses of each of several choices of one prompt (admitted alike but for their seeds), one
        stream each, as `serve` gives them. The prompt is computed once and the choices fork from its K/V, on the
        decode node or the colocated node (`choices.SharedPrefill`)."""
        mode = admitted[0][1]
        if len(admitted) == 1:
            return [self.serve(req, mode, deadline, front, start) for req, mode in admitted]
        shared = SharedPrefill(self, [req for req, _ in admitted], deadline, mode)
        return [self.serve(req, mode, deadline, front, start, source=shared.choice(j))
                for j, (req, mode) in enumerate(admitted)]

    async def serve(self, req: Admitted, mode: str, deadline, front: str, start: float,
                    resumed_by_client: bool = False, source: AsyncIterator[pb.GenerateResponse] | None = None):
        """The admitted request's responses, for the client (its own request id, usage in the Finish; `start`:
        when the front received it, on `time.perf_counter`). A failure that ends it raises `Refused`;
        cancelling the consumer cancels the request on every node. Each request is counted once, as it ends.
        `source`: its node responses, when another call gets them (a choice of a shared prefill)."""
        REQUEST_ID.set(req.request_id)  # in every line logged about it, in this task and those it starts
        relay = Relay(req, start, self.metrics.request(req.model.name, front, start))
        status = ""  # set on a failure; else "ok" once the Finish is relayed, "CANCELLED" if the consumer stopped
        if resumed_by_client:
            self.metrics.client_resumes.labels(req.model.name).inc()
            log.info("request %s: resumed by its client after %d tokens (its router failed)", req.request_id,
                     len(req.resumed))
        try:
            async with contextlib.aclosing(source or self.resuming(req, deadline, mode)) as responses:
                async for response in responses:
                    yield relay.see(response)
        except grpc.aio.AioRpcError as e:
            if e.code() in _PASS_THROUGH:
                refused = Refused(e.code(), e.details() or str(e.code()))
            else:
                prefill_node, decode_node = req.nodes  # a node failed: say which pair served the request
                refused = Refused(grpc.StatusCode.UNAVAILABLE,
                                  f"{e.details() or e.code().name} (prefill {prefill_node}, decode {decode_node})")
            status = refused.code.name
            raise refused from None
        except NoNode as e:
            status = "UNAVAILABLE"
            raise Refused(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        except NodeLost as e:  # and no migration left
            prefill_node, decode_node = req.nodes
            status = "UNAVAILABLE"
            raise Refused(grpc.StatusCode.UNAVAILABLE,
                          f"{e.details} (prefill {prefill_node}, decode {decode_node})") from None
        finally:
            relay.track.end(status or ("ok" if relay.finished else "CANCELLED"), len(req.prompt_ids))

    def _node_wait(self, context) -> float:
        left = context.time_remaining()
        return self.node_wait if left is None else max(0.0, min(self.node_wait, left))

    async def resuming(self, req: Admitted, context, mode: str):
        """The request's stream (what `serve` relays, and a choice of a shared prefill runs once it goes on
        alone), through a prefill and a decode node or a colocated one. A node that fails under
        it (a broken stream, a node that cannot be reached, a decode stream gone silent) does not end the
        stream: it resumes on live nodes from what the client already has (the prompt and the delivered tokens
        computed again, decoding from the next index with the same sampler state), at most `max_migrations`
        times, each one logged and counted."""
        delivered, chars = list(req.resumed), req.resumed_chars  # a client resuming has these already
        avoid: set[str] = set()  # nodes that failed under this request
        if (reason := resume.ended(delivered, req.params, req.model.card.eos_token_ids)) is not None:
            for response in self._rest(req, delivered, chars, reason):  # its router failed just before the Finish
                yield response
            return
        attempt_on = self.colocated if mode == "colocated" else self.disaggregated
        for attempt in range(self.max_migrations + 1):
            resumed = node_pb2.Resumed(token_ids=delivered, text_chars=chars)
            # A fresh id per attempt: the failed attempt's state may still be ending on a node that lives.
            internal = req.internal_id if not attempt else f"{req.internal_id}~{attempt}"
            try:
                async for response in attempt_on(req, internal, resumed, context, avoid):
                    if response.HasField("chunk"):
                        delivered.extend(response.chunk.token_ids)
                        chars += len(response.chunk.text)
                    yield response
                return
            except NodeLost as lost:
                if lost.node_id is not None:
                    self.picker.suspect(lost.node_id)  # other requests stay off it until it leaves etcd
                if attempt == self.max_migrations:
                    raise
                if (reason := resume.ended(delivered, req.params, req.model.card.eos_token_ids)) is not None:
                    for response in self._rest(req, delivered, chars, reason):  # lost just before its Finish
                        yield response
                    return
                if lost.node_id is not None:
                    avoid.add(lost.node_id)
                self.metrics.migrations.labels(req.model.name, lost.cause).inc()
                log.warning("request %s: %s failed after %d tokens (%s); resuming on other nodes (migration %d of "
                            "at most %d)", req.request_id, lost.node_id or " or ".join(sorted(set(req.nodes))),
                            len(delivered), lost.details, attempt + 1, self.max_migrations)

    async def colocated(self, req: Admitted, internal: str, resumed: node_pb2.Resumed, context, avoid: set[str],
                        forks: Sequence[pb.SamplingParams] = ()):
        """One attempt on a colocated node (the whole request there); a node that fails raises NodeLost.
        `forks`: more choices of the prompt, as in `disaggregated`."""
        node = await self.picker.when_live(lambda: self.picker.pick("colocated", avoid, req.model.name),
                                           self._node_wait(context))
        req.nodes = (node.node_id, node.node_id)
        self.picker.acquire(node.node_id)
        call = None
        try:
            with self.stubs.use(node.address) as stubs:
                call = stubs.streams.generate(
                    node_pb2.NodeGenerateRequest(request_id=internal, prompt_token_ids=req.prompt_ids,
                                                 sampling=req.sampling, resumed=resumed, forks=forks),
                    context.time_remaining(), self.inactivity_timeout,
                )
                async for response in call:
                    yield response
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            raise NodeLost(_lost_node(e, node.node_id), e.details() or e.code().name) from e
        except TimeoutError:  # the node went silent: given up, its call cancelled (which frees its blocks)
            raise NodeLost(node.node_id, f"no token within {self.inactivity_timeout:g} s", "silent") from None
        finally:
            if call is not None:
                call.cancel()  # a no-op on what has ended
            self.picker.release(node.node_id)

    async def disaggregated(self, req: Admitted, internal: str, resumed: node_pb2.Resumed, context,
                            avoid: set[str], forks: Sequence[pb.SamplingParams] = ()):
        """One attempt through a prefill and a decode node (`_through`); a node that fails under it raises
        NodeLost. What `resuming` runs for each attempt, and `choices.SharedPrefill` for its shared call."""
        wait = self._node_wait(context)
        decode = await self.picker.when_live(lambda: self.picker.pick("decode", avoid, req.model.name), wait)
        prefill = await self.picker.when_live(lambda: self.picker.pick("prefill", avoid, req.model.name), wait)
        req.nodes = (prefill.node_id, decode.node_id)
        with self.stubs.use(decode.address) as d, self.stubs.use(prefill.address) as p:
            async for response in self._through(req, internal, resumed, context, decode, prefill, d, p.prefill,
                                                forks):
                yield response

    async def _through(self, req: Admitted, internal: str, resumed: node_pb2.Resumed, context, decode, prefill,
                       decode_node: _Node, prefill_stub, forks: Sequence[pb.SamplingParams] = ()):
        """One attempt: reserve on the decode node, prefill the prompt (and the tokens `resumed` delivered) into
        it, relay the first token, then the decode node's stream. A node that fails under it raises NodeLost.
        `forks`: the sampling of more choices of the prompt, decoded from its K/V on the decode node (their
        responses tagged with `choice`; the first token, from the prefill node, is choice 0's)."""
        timeout = context.time_remaining()
        decode_stub = decode_node.decode
        # Which registration of each node was picked (`_first_event` tells a node that left or restarted).
        attempt_nodes = [(n, self.picker.membership.registration(n)) for n in (prefill, decode)]
        self.picker.acquire(decode.node_id)
        self.picker.acquire(prefill.node_id)
        prefill_call = continue_call = transfer = None
        lost = False
        try:
            phase = decode.node_id
            # A Reserve answers at once from a live node: one that does not within the inactivity deadline is
            # stopped or hung (its other streams are being moved off it too), and this request moves on.
            bound = self.inactivity_timeout if timeout is None else min(timeout, self.inactivity_timeout)
            try:
                reservation = await decode_stub.Reserve(
                    node_pb2.ReserveRequest(request_id=internal,
                                            prompt_tokens=len(req.prompt_ids) + len(resumed.token_ids),
                                            max_tokens=req.params.max_tokens, lease_ms=self.lease_ms),
                    timeout=bound,
                )
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and bound != timeout:
                    lost = True
                    raise NodeLost(decode.node_id, f"no answer to Reserve within {bound:g} s", "silent") from None
                raise
            sampling = req.sampling
            target = node_pb2.KVTarget(
                decode_node_id=decode.node_id, decode_address=decode.address,
                kv_store_address=reservation.kv_store_address, block_ids=reservation.block_ids,
                transfer_tag=reservation.transfer_tag, layout=reservation.layout, share=reservation.share,
                rank_shares=reservation.rank_shares,
            )
            phase = prefill_id = prefill.node_id
            prefill_call = prefill_stub.Prefill(
                node_pb2.PrefillRequest(request_id=internal, prompt_token_ids=req.prompt_ids, sampling=sampling,
                                        target=target, resumed=resumed),
                timeout=context.time_remaining(),
            )
            events = prefill_call.__aiter__()
            first = (await self._first_event(events, attempt_nodes)).first_token
            self.picker.release(prefill.node_id)
            prefill = None
            yield pb.GenerateResponse(request_id=internal, chunk=first.chunk)
            if first.finish:
                yield pb.GenerateResponse(request_id=internal, finish=pb.Finish(reason=first.finish))
                if not forks:
                    return
            phase = decode.node_id
            # The decode node waits for the K/V itself (a failed transfer fails its stream), so the prefill
            # call's end is not waited for: once the stream is over, it has nothing to add.
            transfer = asyncio.ensure_future(_drain(events))
            transfer.add_done_callback(lambda t: t.cancelled() or t.exception())
            # Until the decode node's first message, though, a prefill node that fails (it died before its K/V
            # were all sent) fails this attempt at once (the transfer is the stream's feeder): the decode node
            # may not learn of it for a whole lease.
            continue_call = decode_node.streams.cont(
                node_pb2.ContinueRequest(request_id=internal, prompt_token_ids=req.prompt_ids,
                                         first_token=first.chunk.token_ids[0],
                                         first_logprob=first.chunk.logprobs[0] if first.chunk.logprobs else 0.0,
                                         sampling=sampling, resumed=resumed, forks=forks),
                context.time_remaining(), self.inactivity_timeout, transfer,
            )
            async for response in continue_call:
                yield response
        except NodeLost:  # one of its nodes left (`_first_event`): the release may wait on a dead node
            lost = True
            raise
        except FeederFailed as failed:
            e = failed.error  # the prefill call's
            if not isinstance(e, grpc.aio.AioRpcError) or e.code() != grpc.StatusCode.UNAVAILABLE:
                raise e from None
            lost = True
            raise NodeLost(_lost_node(e, prefill_id), e.details() or e.code().name) from e
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            lost = True
            raise NodeLost(_lost_node(e, phase), e.details() or e.code().name) from e
        except TimeoutError:  # the decode node went silent (stopped, hung, cut off): given up, its call cancelled
            lost = True
            raise NodeLost(decode.node_id, f"no token within {self.inactivity_timeout:g} s", "silent") from None
        finally:
            if prefill is not None:
                self.picker.release(prefill.node_id)
            self.picker.release(decode.node_id)
            for call in (prefill_call, continue_call, transfer):
                if call is not None:
                    call.cancel()  # a no-op on what has ended
            # Always: frees the reservation or the sequence if anything above ended early. Shielded from
            # the client's cancellation, bounded in time; in the background when the request moves on.
            release = _release(decode_stub, internal)
            if lost:
                task = asyncio.ensure_future(release)
                self._releasing.add(task)
                task.add_done_callback(self._releasing.discard)
            else:
                await asyncio.shield(release)

    async def _first_event(self, events, nodes: list[tuple[NodeInfo, int | None]]):
        """The prefill call's first event. Not timed (a long prompt behind a long queue may rightly take
        minutes), but every inactivity deadline the attempt's nodes are looked up: one that left the
        membership, or registered anew (it restarted), since they were picked fails the attempt
        (NodeLost), which would otherwise wait for its deadline for a token that cannot come."""
        first = asyncio.ensure_future(events.__anext__())
        try:
            while not (await asyncio.wait([first], timeout=self.inactivity_timeout))[0]:
                for node, registration in nodes:
                    if self.picker.membership.registration(node) != registration:
                        raise NodeLost(node.node_id, "left the membership while the prompt was computed", "left")
            return first.result()
        finally:
            first.cancel()  # a no-op once it has completed

    def _rest(self, req: Admitted, delivered: list[int], chars: int, reason: int) -> list[pb.GenerateResponse]:
        return resume.rest(req.model.tokenizer, req.prompt_ids, delivered, chars, req.params, reason,
                           req.internal_id)

    async def close(self) -> None:
        await self.stubs.close()


class Relay:
    """Rewrites node responses for the client (its own request id), keeps the usage figures and feeds the
    request's metrics: one look at each response, once per relayed token."""

    def __init__(self, req: Admitted, start: float, track: RequestMetrics) -> None:
        self.req = req
        self.start = start
        self.track = track
        self.ttft_ms = 0.0
        self.completion_tokens = len(req.resumed)  # a resumed stream's count goes on from what its client has
        self.first = True
        self.finished = False  # its Finish was relayed

    def see(self, response: pb.GenerateResponse) -> pb.GenerateResponse:
        response.request_id = self.req.request_id
        if response.HasField("chunk"):
            if n := len(response.chunk.token_ids):
                if self.first:
                    self.ttft_ms = (time.perf_counter() - self.start) * 1e3
                    self.first = False
                self.completion_tokens += n
                self.track.tokens(n)
        else:
            self.finished = True
            prefill_node, decode_node = self.req.nodes
            response.finish.usage.CopyFrom(pb.Usage(
                prompt_tokens=len(self.req.prompt_ids), completion_tokens=self.completion_tokens,
                ttft_ms=self.ttft_ms, e2e_ms=(time.perf_counter() - self.start) * 1e3,
                prefill_node=prefill_node, decode_node=decode_node,
            ))
        return response


async def _drain(events) -> None:
    async for _ in events:
        pass


def _lost_node(e: grpc.aio.AioRpcError, caller: str) -> str | None:
    """Which node an UNAVAILABLE from `caller` is about: the one a live node names in its answer (a prefill
    node whose transfer to the decode node failed; "" from a decode node whose transfer failed, either side
    may be at fault), else the caller itself (it died, or could not be reached)."""
    metadata = dict(e.trailing_metadata() or ())
    if LOST_NODE_KEY in metadata:
        return metadata[LOST_NODE_KEY] or None
    return caller


async def _release(stub: node_pb2_grpc.DecodeNodeStub, request_id: str) -> None:
    try:
        await stub.Release(node_pb2.ReleaseRequest(request_id=request_id), timeout=5.0)
    except grpc.aio.AioRpcError as e:  # the node is gone: its blocks went with it
        log.warning("release of %s failed: %s", request_id, e.code())
    except grpc.aio.UsageError as e:  # the channel was closed (the router is stopping): nothing to free through it
        log.warning("release of %s failed: %s", request_id, e)

