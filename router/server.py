"""The router's public face: the `Baton` gRPC service, and the admission and serving every front shares
(baton.v1 here, OpenAI HTTP in `openai_http`, KServe v2 in `kserve`).

A request's life in the router:
  admit      the caller's key (`auth`, each front, before it reads the request); validate every field,
             tokenize, give the request a cluster-unique id; screen its prompt (`rules`, `moderation`);
             reserve against its key's limits (`limits`); wait (up to the node wait) for a live node, then
             for a place with the nodes (`flow`: priorities, fair queuing across keys) (`admit`)
  serve      its stream from the nodes (`attempts.Attempts.stream`: pick, Reserve, Prefill, Continue,
             release, and a move to other nodes when one fails under it; `attempt.Attempt` is one try),
             through its output screen (`rules.OutputScreen`), each response rewritten for the client
             (`relay.Relay`) and written within the stall timeout (`deliver`); n > 1 choices of one prompt
             share its prefill (`choices.SharedPrefill`)
  end        charged to its key for what its client received (before its Finish), its place freed, counted
             once with the status it ended with; a failure is answered as `Refused`
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable

import grpc

from baton.common.keys import KeyRecord
from baton.common.logs import REQUEST_ID
from baton.engine import FieldError
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc

from .admission import Admitted, UnknownModel, admit, check_text_size
from .attempt import AttemptSettings, NodeLost
from .attempts import Attempts
from .auth import KeyStore, PermissionDenied, Unauthenticated, credential_from_metadata
from .choices import SharedPrefill
from .flow import Busy, Flow, FlowSettings, Slot
from .limits import Limiter, LimitsUnavailable, OverLimit, limited
from .metrics import RouterMetrics
from .models import Models
from .picker import NoNode, Picker
from .relay import Relay
from .rules import Blocked, ContentFilter, FilterUnavailable
from .usage import KeyUsage

log = logging.getLogger(__name__)

# Node errors that say something about the request, passed to the client as they are.
_PASS_THROUGH = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


class Refused(Exception):
    """Why a request is not served, or ended early: a gRPC status (each front maps it to its own) and a
    message; `field` names the request field at fault for INVALID_ARGUMENT."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after  # seconds after which a refused request may succeed (busy, over a limit)


class Stalled(Exception):
    """A client that stopped reading its stream (`RouterServicer.deliver`)."""


class NoDeadline:
    """What fronts without deadlines (OpenAI's HTTP API) pass where a grpc context gives `time_remaining()`."""

    @staticmethod
    def time_remaining() -> None:
        return None


class RouterServicer(baton_pb2_grpc.BatonServicer):
    def __init__(self, models: Models, picker: Picker, settings: AttemptSettings = AttemptSettings(),
                 metrics: RouterMetrics | None = None, keys: KeyStore | None = None,
                 flow: FlowSettings = FlowSettings(), rules: ContentFilter | None = None,
                 flag_addresses: int = 20, stall_timeout: float = 30.0) -> None:
        self.models = models
        self.rules = rules  # content rules on prompts and output (None: none)
        self.stall_timeout = stall_timeout  # seconds a write to a client may wait (`deliver`)
        self.picker = picker
        self.flow = Flow(flow, lambda model: [n for n in picker.membership.nodes() if n.model == model
                                              and n.role in ("decode", "colocated")])
        self.keys = keys  # None: no key needed (`--auth` off)
        self.metrics = metrics or RouterMetrics(lambda: picker.membership.nodes())
        self.metrics.watch_queues(lambda: self.flow.queues)
        self.usage = KeyUsage(self.metrics, flag_addresses=flag_addresses)
        self.attempts = Attempts(picker, settings, self.metrics)
        self.limiter: Limiter | None = None  # the keys' limits (with `--auth`), set once the router has its id
        self._rng = random.Random()

    def authenticate(self, credential: str | None, front: str | None = None) -> KeyRecord | None:
        """The caller's key record (None without `--auth`); raises Refused (UNAUTHENTICATED), counted as a
        request's end on `front` when one is given (a generation's front; not a listing or a tokenization)."""
        if self.keys is None:
            return None
        try:
            return self.keys.authenticate(credential)
        except Unauthenticated as e:
            if front is not None:
                self.metrics.requests.labels("", front, grpc.StatusCode.UNAUTHENTICATED.name).inc()
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, str(e)) from None

    def authorize(self, key: KeyRecord | None, model: str) -> None:
        """Raises Refused (PERMISSION_DENIED) if `key` may not use `model`."""
        if key is not None:
            try:
                self.keys.authorize(key, model)
            except PermissionDenied as e:
                raise Refused(grpc.StatusCode.PERMISSION_DENIED, str(e)) from None

    def live_models(self, key: KeyRecord | None) -> list:
        """The models a live node serves that `key` may use (all of them without `--auth`)."""
        return [m for m in self.models.live() if key is None or key.allows(m.name)]

    async def ListModels(self, request, context):
        """The models a live node serves (what /v1/models and KServe's metadata list too)."""
        try:
            key = self.authenticate(credential_from_metadata(context.invocation_metadata()))
        except Refused as e:
            await context.abort(e.code, e.message)
        infos = [pb.ModelInfo(id=c.id, architecture=c.architecture, max_model_len=c.max_model_len,
                              vocab_size=c.vocab_size, dtype=c.dtype) for c in (m.card for m in self.live_models(key))]
        return pb.ListModelsResponse(models=infos)

    async def Tokenize(self, request, context):
        try:
            key = self.authenticate(credential_from_metadata(context.invocation_metadata()))
            model = self.models.resolve(request.model)
            self.authorize(key, model.name)
            check_text_size("text", request.text, model.card)  # the bound Generate puts on a prompt
        except Refused as e:
            await context.abort(e.code, e.message)
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
            key = self.authenticate(credential_from_metadata(context.invocation_metadata()), "grpc")
            req, mode = await self.admit(request, context, "grpc", key, context.peer())
            responses = self.serve(req, mode, context, "grpc", start, request.HasField("resume"))
            async with contextlib.aclosing(responses):
                async for response in responses:
                    await self.deliver(context.write(response), "grpc")
        except Stalled as e:  # its request is cancelled on every node (the stream above is closed)
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
        except Refused as e:
            if e.retry_after is not None:  # gRPC's retry pushback, and the seconds as HTTP says them
                context.set_trailing_metadata((("grpc-retry-pushback-ms", str(int(e.retry_after * 1000))),
                                               ("retry-after", str(max(1, round(e.retry_after))))))
            await context.abort(e.code, e.message)

    async def deliver(self, write: Awaitable[object], front: str) -> None:
        """One write of a response to a client (`context.write(...)`, `response.write(...)`): Stalled if it takes
        longer than the stall timeout. A write waits while the client's flow-control window (gRPC) or the
        socket's buffers (HTTP) are full, so a client that stops reading holds at most those bytes, and this
        long; then its request is cancelled and its KV blocks freed."""
        try:
            await asyncio.wait_for(write, self.stall_timeout)
        except TimeoutError:
            self.metrics.stalled.labels(front).inc()
            raise Stalled(f"the client read nothing for {self.stall_timeout:g} s: its request is cancelled") from None

    async def admit(self, request: pb.GenerateRequest, deadline, front: str, key: KeyRecord | None = None,
                    peer: str = "") -> tuple[Admitted, str]:
        """Validates the request against what the caller's key allows (`key`: its record, from `authenticate`,
        which each front calls before it reads the request, with `--auth`) and waits (up to the node wait, within
        the deadline) for a node to serve it: what every front does before it answers anything. Raises `Refused`
        (counted as the request's end). `deadline` has `time_remaining()` (a grpc context, or `NoDeadline`);
        `peer`: the client's address (gRPC peer, or HTTP remote), counted per key (usage.py)."""
        self.usage.seen(key, peer)
        model = None
        try:
            model = self.models.resolve(request.model)
            self.authorize(key, model.name)
            request.model = model.name  # an alias, or none: the name from here on
            req = admit(request, model.card, model.tokenizer, self._rng)
            if key is not None and key.max_tokens_per_request and req.params.max_tokens > key.max_tokens_per_request:
                raise FieldError("max_tokens", f"{req.params.max_tokens}, more than the {key.max_tokens_per_request} "
                                               f"tokens per request that API key {key.name!r} allows")
            req.model, req.key = model, key
            if self.rules is not None:
                await self._screen_prompt(request, req)
            await self._reserve(req)
            try:
                mode = await self.picker.when_live(lambda: self.picker.mode(model.name),
                                                   self.attempts.node_wait(deadline))
                req.slot = await self._place(req, deadline)
                return req, mode
            except BaseException:
                self.release(req)
                raise
        except Busy as e:
            self.metrics.busy.labels(model.name, e.reason).inc()
            refused = Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), retry_after=e.retry_after)
        except OverLimit as e:
            refused = Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), retry_after=e.retry_after)
        except (LimitsUnavailable, FilterUnavailable) as e:
            refused = Refused(grpc.StatusCode.UNAVAILABLE, str(e))
        except FieldError as e:
            refused = Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e), e.field)
        except UnknownModel as e:
            refused = Refused(grpc.StatusCode.NOT_FOUND, str(e))
        except NoNode as e:
            refused = Refused(grpc.StatusCode.UNAVAILABLE, str(e))
        except Refused as e:  # the key may not use the model
            refused = e
        # Labelled with the model it named when it is served (bounded), else none.
        self.metrics.requests.labels(model.name if model else "", front, refused.code.name).inc()
        self.usage.ended(key, refused.code.name, 0, 0)
        raise refused

    async def _screen_prompt(self, request: pb.GenerateRequest, req: Admitted) -> None:
        """Raises FieldError (INVALID_ARGUMENT on `prompt`) if a content rule matches the prompt's text; else sets
        the screen its output goes through (the rules as they are now, for the whole stream)."""
        # A token-id prompt is decoded only if a filter looks at its text (most requests meet no prompt rule).
        text = (lambda: request.text) if request.WhichOneof("prompt") == "text" else \
            functools.cache(lambda: req.model.tokenizer.decode(req.prompt_ids))
        try:
            await self.rules.check_prompt(text, req.key)
        except Blocked as e:
            self.metrics.content_blocked.labels(e.rule, "prompt").inc()
            raise FieldError("prompt", str(e)) from None
        req.screen = self.rules.screen(req.key)

    async def _reserve(self, req: Admitted) -> None:
        """Reserves the request's tokens (prompt + max_tokens) and its place against its key's limits."""
        if self.limiter is None or not limited(req.key):
            return
        tokens, before = len(req.prompt_ids) + req.params.max_tokens, None
        if req.resumed:
            # The router that lost the stream may have charged it (its Finish then lost): only tokens still to
            # come are reserved and paid. Else the client pays here for all it has, and waits for what that
            # router held for it to come back to the pool (its ledger lease expires).
            before = await self.limiter.charged(req.key, req.request_id)
            if before is not None:
                tokens = max(0, req.params.max_tokens - len(req.resumed))
        wait = 2.0 * self.limiter.store.lease_ttl + 1.0 if req.resumed and before is None else 0.0
        req.hold = await self.limiter.reserve(req.key, req.request_id, tokens, new_request=before is None,
                                              wait_s=wait)
        req.hold.charged_before = before

    async def _place(self, req: Admitted, deadline) -> Slot:
        """Waits for the request's place with the nodes (flow.py): by its key's priority and weight."""
        key = req.key
        left = deadline.time_remaining()
        wait = self.flow.settings.max_queue_wait if left is None else min(self.flow.settings.max_queue_wait, left)
        return await self.flow.queue(req.model.name).acquire(
            key.ledger_id if key is not None else "", key.weight if key is not None else 1,
            key.priority if key is not None else 0, len(req.prompt_ids) + req.params.max_tokens, max(0.0, wait))

    def release(self, req: Admitted) -> None:
        """Frees what an admitted request holds (its place with the nodes, its reservation against its key's
        limits) if it was never served (a front whose other requests were refused, or whose client left before
        its stream began): nothing is charged."""
        if req.slot is not None:
            req.slot.release()
        if req.hold is not None and self.limiter is not None:
            self.limiter.settle(req.hold, 0, count_request=False)

    def serve_choices(self, admitted: list[tuple[Admitted, str]], deadline, front: str,
                      start: float) -> list[AsyncIterator[pb.GenerateResponse]]:
        """The responses of each of several choices of one prompt (admitted alike but for their seeds), one
        stream each, as `serve` gives them. The prompt is computed once and the choices fork from its K/V, on the
        decode node or the colocated node (`choices.SharedPrefill`)."""
        mode = admitted[0][1]
        if len(admitted) == 1:
            return [self.serve(req, mode, deadline, front, start) for req, mode in admitted]
        shared = SharedPrefill(self.attempts, [req for req, _ in admitted], deadline, mode)
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
            async with contextlib.aclosing(source or self.attempts.stream(req, deadline, mode)) as responses:
                if req.screen is not None:
                    responses = self._screened(responses, req)
                async for response in responses:
                    if req.hold is not None and response.HasField("finish"):  # charged before the client knows
                        await self.limiter.settle_written(req.hold, _charge(req, relay))
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
            status = status or ("ok" if relay.finished else "CANCELLED")
            relay.track.end(status, len(req.prompt_ids))
            self.usage.ended(req.key, status, len(req.prompt_ids) if relay.completion_tokens else 0,
                             relay.completion_tokens - len(req.resumed))
            if req.slot is not None:
                req.slot.release()
            if req.hold is not None:
                self.limiter.settle(req.hold, _charge(req, relay))  # cancelled or failed: what it received

    async def _screened(self, responses: AsyncIterator[pb.GenerateResponse],
                        req: Admitted) -> AsyncIterator[pb.GenerateResponse]:
        """`responses` through the request's output screen (rules.py): held back until no rule can match across
        them, and ended with finish reason CONTENT_FILTER where one does (the stream's nodes are then cancelled,
        as the caller closes `responses`)."""
        screen = req.screen
        async for response in responses:
            if response.HasField("chunk"):
                for passed in screen.push(response):
                    yield passed
            else:
                for passed in screen.finish():
                    yield passed
                if screen.blocked is None:
                    yield response
            if screen.blocked is not None:
                self.metrics.content_blocked.labels(screen.blocked, "output").inc()
                log.info("request %s: output blocked by content rule %r", req.request_id, screen.blocked)
                yield pb.GenerateResponse(finish=pb.Finish(reason=pb.FINISH_REASON_CONTENT_FILTER))
                return

    async def close(self) -> None:
        await self.attempts.close()


def _charge(req: Admitted, relay: Relay) -> int:
    """The tokens a request is charged: its prompt and the tokens its client has (with a resumed stream's), once
    it has one; only those relayed here if the router that lost the stream had charged it."""
    if not relay.completion_tokens:
        return 0
    if req.hold.charged_before is not None:
        return relay.completion_tokens - len(req.resumed)
    return len(req.prompt_ids) + relay.completion_tokens
