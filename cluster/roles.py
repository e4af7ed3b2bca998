"""A node that changes role in place: the gRPC face of its roles, and the placement it follows for its role.

A grpc.aio server cannot drop or add a service once it has started, and restarting it on the same port would
drop the routers' connections (their reconnection backs off). So a node serves both internal services from
the start through a `RoleSlot` each: a stand-in whose methods pass every call to the servicer of the role the
node has now, and answer UNAVAILABLE while it has another. The slot counts the calls it passed on, so that a
role is closed only once the calls it took have ended.

`follow_role` watches the cluster's placement (`baton launch` starts its nodes with `--follow-placement`)
and reports each role the placement gives this node: the one source of truth for roles, as for everything
else a placement says.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import aetcd
import grpc

from baton.cluster.placement import Placement, PlacementError
from baton.cluster.placement_store import PlacementWatch
from baton.common.loops import retrying

log = logging.getLogger(__name__)


class RoleSlot:
    """Stands in the gRPC server for the servicer of one service (`service`, a generated servicer base class
    such as `DecodeNodeServicer`; `kind`, the class whose methods say how each call is served: an async
    generator or a coroutine, which the stand-in must match)."""

    def __init__(self, service: type, kind: type, name: str) -> None:
        self.name = name  # the service's full name, for health and messages
        self.servicer: object | None = None
        self.calls = 0  # calls passed on and not ended
        self._idle = asyncio.Event()
        self._idle.set()
        for method in [m for m in vars(service) if m[:1].isupper()]:
            setattr(self, method, self._forward(method, getattr(kind, method)))

    def fill(self, servicer: object) -> None:
        self.servicer = servicer

    async def empty(self, timeout: float) -> bool:
        """Waits up to `timeout` s for the calls passed on to end, then takes no more; says whether they ended."""
        try:
            await asyncio.wait_for(self._idle.wait(), max(0.0, timeout))
            ended = True
        except TimeoutError:
            ended = False
        self.servicer = None
        return ended

    async def _target(self, context: grpc.aio.ServicerContext) -> object:
        if self.servicer is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"this node does not serve {self.name} now (it "
                                "changed role): ask the membership again")
        return self.servicer

    @contextlib.contextmanager
    def _counted(self):
        self.calls += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.calls -= 1
            if not self.calls:
                self._idle.set()

    def _forward(self, method: str, behaviour: Callable) -> Callable:
        if inspect.isasyncgenfunction(behaviour):
            async def streamed(request, context) -> AsyncIterator:
                target = await self._target(context)
                with self._counted():
                    async with contextlib.aclosing(getattr(target, method)(request, context)) as responses:
                        async for response in responses:
                            yield response
            return streamed

        async def awaited(request, context):
            target = await self._target(context)
            with self._counted():
                return await getattr(target, method)(request, context)
        return awaited


async def follow_role(etcd: str, cluster: str, node_id: str, on_role: Callable[[str], Awaitable[None] | None],
                      start_retry_s: float) -> None:
    """Calls `on_role(role)` with the role the cluster's placement gives `node_id`, at start and at each change
    of the placement (a placement without the node, or one this version cannot read, changes nothing: `baton
    launch` stops a node that left it)."""
    watch = await retrying(lambda: PlacementWatch.start(etcd, cluster), (aetcd.ClientError,), start_retry_s,
                           "reading the placement")
    try:
        version = 0
        while True:
            version, value = await watch.newer(version)
            if value is None:
                continue
            try:
                entry = Placement.from_json(value).nodes().get(node_id)
            except PlacementError as e:
                log.error("ignoring a placement this version cannot read: %s", e)
                continue
            if entry is not None:
                done = on_role(entry[1].role)
                if done is not None:
                    await done
    finally:
        await watch.close()
