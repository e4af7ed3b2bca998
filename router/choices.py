"""Several choices of one prompt (OpenAI's `n`) from one prefill.

The prompt is computed once, on one prefill node, and its K/V sent once into one decode node's reservation;
the decode node forks the other choices from those blocks (`ContinueRequest.forks`) and streams every choice
in one call, each response tagged with its choice. A colocated node does the same in one Generate call
(`NodeGenerateRequest.forks`): the prompt computed once, the other choices forked from it. `SharedPrefill`
runs that call and hands each choice its own responses, so each choice is then served (relayed, counted,
ended) as a request of its own.

A node lost under the shared call does not end the choices: each one still running resumes alone from what
its client has (`Attempts.stream`, like any migrated stream), so a choice never waits for another.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from baton.v1 import baton_pb2 as pb
from baton.v1 import node_pb2

from .admission import Admitted
from .attempt import NodeLost, Try
from .attempts import Attempts

log = logging.getLogger(__name__)

_LOST = object()  # the shared call ended before a choice's Finish: the choice goes on alone


class SharedPrefill:
    """One call for `reqs` (the same prompt and model; choice j samples with reqs[j].sampling), fanned out to
    one stream per choice (`choice(j)`). The call starts when the first choice is read and is cancelled when
    every choice's stream has closed (a client that leaves frees the blocks of all of them)."""

    def __init__(self, attempts: Attempts, reqs: list[Admitted], deadline, mode: str) -> None:
        self._attempts = attempts
        self._reqs = reqs
        self._deadline = deadline
        self._mode = mode
        self._queues: list[asyncio.Queue] = [asyncio.Queue() for _ in reqs]
        self._task: asyncio.Task | None = None
        self._open = len(reqs)

    async def choice(self, j: int) -> AsyncIterator[pb.GenerateResponse]:
        req, queue = self._reqs[j], self._queues[j]
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        delivered: list[int] = []
        chars = 0
        try:
            while (item := await queue.get()) is not _LOST:
                if isinstance(item, BaseException):
                    raise item
                if item.HasField("finish"):
                    yield item
                    return
                delivered.extend(item.chunk.token_ids)
                chars += len(item.chunk.text)
                yield item
            # Alone from here: a fresh id (the shared call's may still be ending on a live node), the
            # delivered tokens computed with the prompt, decoding from the next index.
            req.internal_id = f"{req.internal_id}~{j}"
            req.resumed, req.resumed_chars = delivered, chars
            self._attempts.metrics.migrations.labels(req.model.name, "failed").inc()
            log.warning("request %s: choice %d goes on alone after %d tokens (its shared call failed)",
                        req.request_id, j, len(delivered))
            async for response in self._attempts.stream(req, self._deadline, self._mode):
                yield response
        finally:
            self._open -= 1
            if not self._open and self._task is not None:
                self._task.cancel()  # cancels the node calls: the decode node frees every choice's blocks

    async def _run(self) -> None:
        attempts, first = self._attempts, self._reqs[0]
        job = Try(first, first.internal_id, node_pb2.Resumed(), self._deadline,
                  forks=[req.sampling for req in self._reqs[1:]])
        try:
            async for response in attempts.one(job, self._mode, set()):
                j = response.choice
                if j:
                    response.ClearField("choice")
                else:  # choice 0's nodes are every choice's
                    for req in self._reqs[1:]:
                        req.nodes = first.nodes
                self._queues[j].put_nowait(response)
        except NodeLost as lost:
            attempts.suspect(lost)
            outcome = lost if not attempts.settings.max_migrations else _LOST
            log.warning("request %s: %s failed under its %d choices (%s)", first.request_id,
                        lost.node_id or " or ".join(sorted(set(first.nodes))), len(self._reqs), lost.details)
            for queue in self._queues:
                queue.put_nowait(outcome)
        except asyncio.CancelledError:
            for queue in self._queues:  # (every choice has ended by now; a late reader would go on alone)
                queue.put_nowait(_LOST)
            raise
        except BaseException as e:  # noqa: BLE001 - each choice ends with it, as a lone request would
            for queue in self._queues:
                queue.put_nowait(e)
        else:
            for queue in self._queues:  # a choice whose Finish did not come (none should) goes on alone
                queue.put_nowait(_LOST)
