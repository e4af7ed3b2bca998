"""One try of a request on its nodes: reserve, prefill, continue, release.

An attempt's phases, forward only (`Attempt._enter` refuses a move back and logs it):

    PICKED ──▶ RESERVING ──▶ PREFILLING ──▶ DECODING ──▶ ENDED
      │            │              │             │           ▲
      └────────────┴──────────────┴─────────────┴───────────┘   whatever ends it: its end, a failure, a cancel

    PICKED      its nodes are chosen and hold a place in the picker's load count (`NodeHolds`)
    RESERVING   Reserve sent to the decode node, which answers with the reservation (`KVTarget`)
    PREFILLING  the prefill node computes the prompt and writes its K/V into the reserved blocks; its first
                token is awaited (then relayed at once), and its hold is given back
    DECODING    the decode node goes on from the first token (a colocated attempt goes PICKED ─▶ DECODING:
                its node's Generate does it all)
    ENDED       every hold given back, every call cancelled, and (disaggregated) Release sent: Release is
                idempotent, so it is always sent, in the background when a node was lost (it may hang)

The phase also says which node an UNAVAILABLE is about (`_at_fault`): the decode node's while reserving and
decoding, the prefill node's while prefilling. A node lost under the attempt ends it with `NodeLost`, which
`attempts.Attempts.stream` answers by resuming the request on other nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from baton.common.membership import NodeInfo
from baton.common.messages import LOST_NODE_KEY
from baton.v1 import baton_pb2 as pb
from baton.v1 import node_pb2, node_pb2_grpc

from .admission import Admitted
from .node_stubs import NodeChannel, NodeStubs
from .picker import Picker
from .streams import FeederFailed

log = logging.getLogger(__name__)


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


class Phase(enum.IntEnum):
    PICKED = 0
    RESERVING = 1
    PREFILLING = 2
    DECODING = 3
    ENDED = 4


# The crossover measured by bench/local_prefill.py: none on the 2-core VM (bench/README.md), so off by default.
DEFAULT_MAX_LOCAL_PREFILL_TOKENS = 0


@dataclass(frozen=True, slots=True)
class AttemptSettings:
    """How the router tries a request on its nodes (`baton router` options)."""

    lease_ms: int = 30_000  # how long a decode node keeps blocks reserved for a prefill that never comes
    max_migrations: int = 3  # times a stream may resume on other nodes after a node failed under it
    inactivity_timeout: float = 10.0  # a node silent this long under a stream is given up (and the stream moved)
    node_wait: float = 5.0  # how long a request waits for a live node of a role that has none
    # Conditional disaggregation: when the decode node holds a prompt's prefix cached and at most this many of
    # its tokens are not, the decode node computes them itself and no prefill node is involved (0: never).
    max_local_prefill_tokens: int = DEFAULT_MAX_LOCAL_PREFILL_TOKENS
    member_token: str | None = None  # carried by every call to a node of a closed cluster (common/members.py)
    member_credentials: Any = None  # grpc.ChannelCredentials: calls to nodes over mutual TLS (common/tls.py)


@dataclass(slots=True)
class Try:
    """What one attempt is asked to do: `req`'s prompt (and the tokens `resumed` delivered) under the id
    `internal_id` (fresh per attempt), within `deadline` (it has `time_remaining()`); `forks`: the sampling
    of more choices of the prompt, decoded from its K/V (their responses tagged with `choice`)."""

    req: Admitted
    internal_id: str
    resumed: node_pb2.Resumed
    deadline: Any
    forks: Sequence[pb.SamplingParams] = ()


class NodeHolds:
    """The load an attempt puts on its nodes in the picker's count (requests, and prompt tokens to compute,
    that their reports may not show yet): taken for each node as the attempt starts, given back once each:
    early for a prefill node that has sent its first token, and for all that are left whatever ends the
    attempt (`with`). `nodes`: node id -> the prompt tokens it is to compute."""

    def __init__(self, picker: Picker, nodes: dict[str, int]) -> None:
        self._picker = picker
        self._held = dict(nodes)
        for node_id, tokens in self._held.items():
            picker.acquire(node_id, tokens)

    def give_back(self, node_id: str) -> None:
        if node_id in self._held:
            self._picker.release(node_id, self._held.pop(node_id))

    def __enter__(self) -> NodeHolds:
        return self

    def __exit__(self, *exc: object) -> None:
        for node_id in list(self._held):
            self.give_back(node_id)


@dataclass(slots=True, eq=False)
class Attempt:
    """One try of `job` on `decode` (the colocated node when `prefill` is None) and `prefill`: iterate
    `responses()` for its stream. Its phase (`phase`) only moves forward; `lost` is set when a node failed
    under it (its Release then goes in the background, handed to `release_later`)."""

    job: Try
    decode: NodeInfo
    prefill: NodeInfo | None
    picker: Picker
    stubs: NodeStubs
    settings: AttemptSettings
    release_later: Callable[[asyncio.Future], None]
    tokens: int = 0  # the prompt tokens its prefill (or colocated) node is to compute, as routing sees it
    decided: Callable[[str], None] = lambda where: None  # counts where its prompt was computed: remote, local
    phase: Phase = Phase.PICKED
    lost: bool = False
    _calls: list = field(default_factory=list)  # node calls and tasks, cancelled when it ends

    async def responses(self) -> AsyncIterator[pb.GenerateResponse]:
        computing = self.prefill or self.decode
        holds = {computing.node_id: self.tokens, self.decode.node_id: 0} if self.prefill else {
            self.decode.node_id: self.tokens}
        with contextlib.ExitStack() as channels:
            decode = channels.enter_context(self.stubs.use(self.decode.address))
            prefill = channels.enter_context(self.stubs.use(self.prefill.address)) if self.prefill else None
            holds = NodeHolds(self.picker, holds)
            try:
                with holds:
                    run = self._generate(decode) if prefill is None else self._disaggregated(decode, prefill, holds)
                    async for response in run:
                        yield response
            except NodeLost:
                self.lost = True
                raise
            except FeederFailed as failed:  # the prefill call failed while the decode node waited for its K/V
                e = failed.error
                if not isinstance(e, grpc.aio.AioRpcError) or e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise e from None
                self.lost = True
                raise NodeLost(_lost_node(e, self.prefill.node_id), e.details() or e.code().name) from e
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                self.lost = True
                raise NodeLost(_lost_node(e, self._at_fault()), e.details() or e.code().name) from e
            except TimeoutError:  # the node went silent (stopped, hung, cut off): given up, its call cancelled
                self.lost = True
                raise NodeLost(self.decode.node_id, f"no token within {self.settings.inactivity_timeout:g} s",
                               "silent") from None
            finally:
                await self._end(decode)

    async def _generate(self, node: NodeChannel) -> AsyncIterator[pb.GenerateResponse]:
        """Colocated: the whole request on one node, in one stream."""
        job = self.job
        self._enter(Phase.DECODING)
        call = node.streams.generate(
            node_pb2.NodeGenerateRequest(request_id=job.internal_id, prompt_token_ids=job.req.prompt_ids,
                                         sampling=job.req.sampling, resumed=job.resumed, forks=job.forks),
            job.deadline.time_remaining(), self.settings.inactivity_timeout,
        )
        self._calls.append(call)
        async for response in call:
            yield response

    async def _disaggregated(self, decode: NodeChannel, prefill: NodeChannel,
                             holds: NodeHolds) -> AsyncIterator[pb.GenerateResponse]:
        job, req = self.job, self.job.req
        # Which registration of each node was picked (`_first_event` tells a node that left or restarted).
        registrations = [(n, self.picker.membership.registration(n)) for n in (self.prefill, self.decode)]
        target = await self._reserve(decode)
        if self._local(target):
            # The decode node holds most of the prompt: it computes the rest itself, no prefill node involved.
            self.decided("local")
            holds.give_back(self.prefill.node_id)
            self._enter(Phase.DECODING)
            call = decode.streams.cont(
                node_pb2.ContinueRequest(request_id=job.internal_id, prompt_token_ids=req.prompt_ids,
                                         sampling=req.sampling, resumed=job.resumed, prefill_here=True),
                job.deadline.time_remaining(), self.settings.inactivity_timeout)
            self._calls.append(call)
            async for response in call:
                yield response
            return
        self.decided("remote")
        self._enter(Phase.PREFILLING)
        prefill_call = prefill.prefill.Prefill(
            node_pb2.PrefillRequest(request_id=job.internal_id, prompt_token_ids=req.prompt_ids,
                                    sampling=req.sampling, target=target, resumed=job.resumed),
            timeout=job.deadline.time_remaining(),
        )
        self._calls.append(prefill_call)
        events = prefill_call.__aiter__()
        first = (await self._first_event(events, registrations)).first_token
        holds.give_back(self.prefill.node_id)
        yield pb.GenerateResponse(request_id=job.internal_id, chunk=first.chunk)
        if first.finish:
            yield pb.GenerateResponse(request_id=job.internal_id, finish=pb.Finish(reason=first.finish))
            if not job.forks:
                return
        self._enter(Phase.DECODING)
        # The decode node waits for the K/V itself (a failed transfer fails its stream), so the prefill call's
        # end is not waited for: once the stream is over, it has nothing to add.
        transfer = asyncio.ensure_future(_drain(events))
        transfer.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._calls.append(transfer)
        # Until the decode node's first message, though, a prefill node that fails (it died before its K/V were
        # all sent) fails this attempt at once (the transfer is the stream's feeder): the decode node may not
        # learn of it for a whole lease.
        continue_call = decode.streams.cont(
            node_pb2.ContinueRequest(request_id=job.internal_id, prompt_token_ids=req.prompt_ids,
                                     first_token=first.chunk.token_ids[0],
                                     first_logprob=first.chunk.logprobs[0] if first.chunk.logprobs else 0.0,
                                     sampling=req.sampling, resumed=job.resumed, forks=job.forks),
            job.deadline.time_remaining(), self.settings.inactivity_timeout, transfer,
        )
        self._calls.append(continue_call)
        async for response in continue_call:
            yield response

    def _local(self, target: node_pb2.KVTarget) -> bool:
        """Whether the decode node computes the prompt's rest itself: it holds some of it cached, and the rest
        is short (`max_local_prefill_tokens`). Never for several choices (they fork from K/V computed once)."""
        job = self.job
        cached = target.cached_blocks * target.layout.block_size
        rest = len(job.req.prompt_ids) + len(job.resumed.token_ids) - cached
        return cached > 0 and rest <= self.settings.max_local_prefill_tokens and not job.forks

    async def _reserve(self, decode: NodeChannel) -> node_pb2.KVTarget:
        """The decode node's reservation, as the prefill node is to get it. A Reserve answers at once from a
        live node: one that does not within the inactivity deadline is stopped or hung (its other streams are
        being moved off it too), and the request moves on."""
        self._enter(Phase.RESERVING)
        job = self.job
        timeout = job.deadline.time_remaining()
        bound = self.settings.inactivity_timeout if timeout is None else min(timeout,
                                                                             self.settings.inactivity_timeout)
        try:
            reservation = await decode.decode.Reserve(
                # With the tokens, so that the decode node holds the blocks it has cached for them: the prefill
                # node sends only the rest.
                node_pb2.ReserveRequest(request_id=job.internal_id,
                                        prompt_tokens=len(job.req.prompt_ids) + len(job.resumed.token_ids),
                                        max_tokens=job.req.params.max_tokens, lease_ms=self.settings.lease_ms,
                                        token_ids=[*job.req.prompt_ids, *job.resumed.token_ids]),
                timeout=bound,
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and bound != timeout:
                raise NodeLost(self.decode.node_id, f"no answer to Reserve within {bound:g} s", "silent") from None
            raise
        return reservation.target

    async def _first_event(self, events, registrations: list[tuple[NodeInfo, int | None]]):
        """The prefill call's first event. Not timed (a long prompt behind a long queue may rightly take
        minutes), but every inactivity deadline the attempt's nodes are looked up: one that left the
        membership, or registered anew (it restarted), since they were picked fails the attempt (NodeLost),
        which would otherwise wait for its deadline for a token that cannot come."""
        first = asyncio.ensure_future(events.__anext__())
        try:
            while not (await asyncio.wait([first], timeout=self.settings.inactivity_timeout))[0]:
                for node, registration in registrations:
                    if self.picker.membership.registration(node) != registration:
                        raise NodeLost(node.node_id, "left the membership while the prompt was computed", "left")
            return first.result()
        finally:
            first.cancel()  # a no-op once it has completed

    async def _end(self, decode: NodeChannel) -> None:
        reserved = self.prefill is not None and self.phase >= Phase.RESERVING
        self._enter(Phase.ENDED)
        for call in self._calls:
            call.cancel()  # a no-op on what has ended
        if not reserved:
            return  # a colocated node frees its blocks as its call is cancelled
        # Frees the reservation or the sequence if anything above ended early. Shielded from the client's
        # cancellation, bounded in time; in the background when the request moves on.
        release = asyncio.ensure_future(_release(decode.decode, self.job.internal_id))
        if self.lost:
            self.release_later(release)
        else:
            await asyncio.shield(release)

    def _at_fault(self) -> str:
        """The node an UNAVAILABLE in the present phase is about, when the error names none."""
        return self.prefill.node_id if self.phase == Phase.PREFILLING else self.decode.node_id

    def _enter(self, phase: Phase) -> None:
        if phase < self.phase:
            log.error("attempt %s: refused move from %s back to %s", self.job.internal_id, self.phase.name,
                      phase.name)
            return
        self.phase = phase


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
