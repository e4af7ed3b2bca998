"""The router's node side: it picks a request's nodes, runs its attempts (`attempt.Attempt`) and moves a stream
to other nodes when one fails under it.

A stream survives the loss of a node: when an attempt ends with `NodeLost`, the request resumes on live nodes
from what its client already has (the prompt and the delivered tokens computed again, decoding from the next
index with the same sampler state), avoiding the nodes that failed under it, at most `max_migrations` times,
each move logged and counted. Each attempt has a fresh internal id: a failed attempt's state may still be
ending on a node that lives.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

from baton.v1 import baton_pb2 as pb
from baton.v1 import node_pb2

from . import resume
from .admission import Admitted
from .attempt import Attempt, AttemptSettings, NodeLost, Try
from .kv_index import PromptBlocks
from .metrics import RouterMetrics
from .node_stubs import NodeStubs
from .picker import Picker

log = logging.getLogger(__name__)


class Attempts:
    """Owns the node channels (`stubs`) and the releases still under way on nodes a request moved away from."""

    def __init__(self, picker: Picker, settings: AttemptSettings, metrics: RouterMetrics) -> None:
        self.picker = picker
        self.settings = settings
        self.metrics = metrics
        self.stubs = NodeStubs(lambda: {n.address for n in picker.membership.nodes()}, settings.member_token,
                               settings.member_credentials)
        self._releasing: set[asyncio.Future] = set()

    def node_wait(self, deadline) -> float:
        """How long a request may wait for a live node: the node wait, within its deadline."""
        left = deadline.time_remaining()
        return self.settings.node_wait if left is None else max(0.0, min(self.settings.node_wait, left))

    async def one(self, job: Try, mode: str, avoid: set[str]) -> AsyncIterator[pb.GenerateResponse]:
        """One attempt of `job` on nodes picked now (none of `avoid`): its responses; NodeLost if a node fails
        under it. `mode`: "disaggregated" or "colocated"."""
        attempt = await self._pick(job, mode, avoid)
        async for response in attempt.responses():
            yield response

    async def stream(self, req: Admitted, deadline, mode: str) -> AsyncIterator[pb.GenerateResponse]:
        """The request's stream, through attempt after attempt until one ends it (see the module docstring)."""
        delivered, chars = list(req.resumed), req.resumed_chars  # a client resuming has these already
        avoid: set[str] = set()  # nodes that failed under this request
        if (rest := _end(req, delivered, chars)) is not None:  # its router failed just before the Finish
            for response in rest:
                yield response
            return
        for migration in range(self.settings.max_migrations + 1):
            internal = req.internal_id if not migration else f"{req.internal_id}~{migration}"
            job = Try(req, internal, node_pb2.Resumed(token_ids=delivered, text_chars=chars), deadline)
            try:
                async for response in self.one(job, mode, avoid):
                    if response.HasField("chunk"):
                        delivered.extend(response.chunk.token_ids)
                        chars += len(response.chunk.text)
                    yield response
                return
            except NodeLost as lost:
                self.suspect(lost)
                if migration == self.settings.max_migrations:
                    raise
                if (rest := _end(req, delivered, chars)) is not None:  # lost just before its Finish
                    for response in rest:
                        yield response
                    return
                if lost.node_id is not None:
                    avoid.add(lost.node_id)
                self.metrics.migrations.labels(req.model.name, lost.cause).inc()
                log.warning("request %s: %s failed after %d tokens (%s); resuming on other nodes (migration %d of "
                            "at most %d)", req.request_id, lost.node_id or " or ".join(sorted(set(req.nodes))),
                            len(delivered), lost.details, migration + 1, self.settings.max_migrations)

    def suspect(self, lost: NodeLost) -> None:
        """Other requests stay off the node that failed until it leaves etcd (when the failure names it)."""
        if lost.node_id is not None:
            self.picker.suspect(lost.node_id)

    async def close(self) -> None:
        await self.stubs.close()

    async def _pick(self, job: Try, mode: str, avoid: set[str]) -> Attempt:
        req, wait, picker = job.req, self.node_wait(job.deadline), self.picker
        # The tokens whose K/V the attempt needs: named once, for every node routing weighs.
        prompt = PromptBlocks([*req.prompt_ids, *job.resumed.token_ids])
        prefill = None
        if mode == "colocated":
            decode = await picker.when_live(lambda: picker.pick("colocated", avoid, req.model.name, prompt), wait)
        else:
            decode = await picker.when_live(lambda: picker.pick("decode", avoid, req.model.name, prompt), wait)
            prefill = await picker.when_live(
                lambda: picker.pick("prefill", avoid, req.model.name, prompt, decode), wait)
        req.nodes = ((prefill or decode).node_id, decode.node_id)
        tokens, _ = picker.routing.prompt_work(prefill or decode, prompt, decode if prefill else None)
        decided = lambda where: self.metrics.prefill_decisions.labels(req.model.name, where).inc()  # noqa: E731
        return Attempt(job, decode, prefill, picker, self.stubs, self.settings, self._release_later, tokens, decided)

    def _release_later(self, release: asyncio.Future) -> None:
        self._releasing.add(release)
        release.add_done_callback(self._releasing.discard)


def _end(req: Admitted, delivered: Sequence[int], chars: int) -> list[pb.GenerateResponse] | None:
    """What the client still lacks of a stream that its delivered tokens already end (None: it goes on)."""
    return resume.end(req.model.tokenizer, req.prompt_ids, list(delivered), chars, req.params,
                      req.model.card.eos_token_ids, req.internal_id)
