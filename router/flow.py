"""The router's waiting room: per model, how many requests are with the nodes at once, and in what order the
others go in when a place frees up.

A model has `slots`: each live decode or colocated node of it counts `max_num_seqs * slots_per_seq` (its batch,
and as many again waiting in its own queue, so it always has the next request at hand; a node that does not
say its batch size leaves the model without a bound). Past that, requests wait here, where the router can be
fair, rather than on the nodes, where they would be served in arrival order:
- by priority first (a key's `priority`: higher first);
- within a priority, by weighted fair queuing across keys: each request gets a virtual finish tag, its flow's
  last tag (or the queue's virtual time, if later) plus its cost (prompt + max_tokens) over its key's
  `weight`, and the lowest tag goes first. A key that floods only lengthens its own queue.
The waiting room is bounded in requests and in tokens. Full, it sheds the newest request of the lowest priority
below the arrival's (negative priorities first), else refuses the arrival; a request that waits longer than
`max_queue_wait` (or its deadline) is refused too. All these are "busy" (RESOURCE_EXHAUSTED / 429, with a
retry hint), told apart from "no node" (UNAVAILABLE / 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

POLICIES = ("fair", "fifo")


class Busy(Exception):
    """No place for the request now (RESOURCE_EXHAUSTED / 429): `reason` for the metrics, `retry_after` in s."""

    def __init__(self, message: str, reason: str, retry_after: float) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class FlowSettings:
    policy: str = "fair"  # "fair": priorities, then weighted fair queuing across keys; "fifo": arrival order
    slots_per_seq: float = 2.0  # requests let through per sequence a node batches
    max_queued: int = 1024  # requests waiting, per model
    max_queued_tokens: int = 1 << 22  # their prompt + max_tokens, per model
    max_queue_wait: float = 60.0  # seconds a request may wait for a place

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"queue_policy: must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if not self.slots_per_seq > 0:
            raise ValueError(f"slots_per_seq: must be > 0, got {self.slots_per_seq}")
        for name in ("max_queued", "max_queued_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not self.max_queue_wait >= 0:
            raise ValueError(f"max_queue_wait: must be >= 0 seconds, got {self.max_queue_wait}")


@dataclass(eq=False, slots=True)
class _Waiter:
    flow: str
    priority: int
    cost: int
    tag: float
    seq: int
    future: asyncio.Future = field(repr=False)

    def order(self) -> tuple:
        return (-self.priority, self.tag, self.seq)


class Slot:
    """A request's place with the nodes; `release()` it when the request ends (again: nothing happens)."""

    __slots__ = ("_queue",)

    def __init__(self, queue: ModelQueue) -> None:
        self._queue: ModelQueue | None = queue

    def release(self) -> None:
        if self._queue is not None:
            queue, self._queue = self._queue, None
            queue.in_flight -= 1
            queue.dispatch()


class ModelQueue:
    """One model's places and waiting requests. `slots()`: how many it has now (math.inf: no bound)."""

    def __init__(self, model: str, settings: FlowSettings, slots: Callable[[], float]) -> None:
        self.model = model
        self.settings = settings
        self.slots = slots
        self.in_flight = 0
        self.queued_tokens = 0
        self._heap: list[tuple[tuple, _Waiter]] = []
        self._waiting: set[_Waiter] = set()
        self._vtime = 0.0  # the tag of the request let in last
        self._last_tag: dict[str, float] = {}  # per flow (key)
        self._seq = itertools.count()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def acquire(self, flow: str, weight: int, priority: int, cost: int, timeout: float) -> Slot:
        """A place for a request of `flow` (its key's account; "" without keys); raises Busy."""
        if not self._waiting and self.in_flight < self.slots():
            self.in_flight += 1
            return Slot(self)
        s = self.settings
        if len(self._waiting) >= s.max_queued or self.queued_tokens + cost > s.max_queued_tokens:
            self._shed_for(priority, cost)
        if s.policy == "fair":
            tag = max(self._vtime, self._last_tag.get(flow, 0.0)) + cost / max(1, weight)
            self._last_tag[flow] = tag
        else:
            tag, priority = float(next(self._seq)), 0
        waiter = _Waiter(flow, priority, cost, tag, next(self._seq), asyncio.get_running_loop().create_future())
        heapq.heappush(self._heap, (waiter.order(), waiter))
        self._waiting.add(waiter)
        self.queued_tokens += cost
        self.dispatch()  # places may have come that no release or membership change has handed out yet
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.future), timeout)
        except TimeoutError:
            if waiter.future.done() and not waiter.future.exception():  # let in as the wait ran out: keep it
                return waiter.future.result()
            self._forget(waiter)
            raise Busy(f"model {self.model}: no place for the request within {timeout:.3g} s "
                       f"({self.in_flight} requests with the nodes, {self.waiting} waiting)", "queue_timeout",
                       self._retry_after()) from None
        except asyncio.CancelledError:
            self._forget(waiter)
            if waiter.future.done() and not waiter.future.exception():
                waiter.future.result().release()  # let in as its caller left: the place goes to the next
            raise

    def _shed_for(self, priority: int, cost: int) -> None:
        """Makes room for an arrival of `priority`: sheds the newest waiting requests of lower priority (lowest
        first), else raises Busy."""
        s = self.settings
        lower = sorted((w for w in self._waiting if w.priority < priority), key=lambda w: (w.priority, -w.seq))
        shed = []
        while (len(self._waiting) - len(shed) >= s.max_queued
               or self.queued_tokens - sum(w.cost for w in shed) + cost > s.max_queued_tokens):
            if not lower:
                raise Busy(f"model {self.model}: {len(self._waiting)} requests ({self.queued_tokens} tokens) "
                           f"waiting already, the most it queues", "queue_full", self._retry_after())
            shed.append(lower.pop(0))
        for w in shed:
            self._forget(w)
            w.future.set_exception(Busy(f"model {self.model}: shed for a request of higher priority "
                                        f"(this one's is {w.priority})", "shed", self._retry_after()))

    def _forget(self, waiter: _Waiter) -> None:
        if waiter in self._waiting:
            self._waiting.discard(waiter)
            self.queued_tokens -= waiter.cost
            # Its heap entry stays until it surfaces (skipped then): removal from a heap's middle costs O(n).

    def dispatch(self) -> None:
        """Lets waiting requests in, best first, while there are places."""
        while self._waiting and self.in_flight < self.slots():
            _, waiter = heapq.heappop(self._heap)
            if waiter not in self._waiting:
                continue
            self._forget(waiter)
            self._vtime = max(self._vtime, waiter.tag)
            self.in_flight += 1
            waiter.future.set_result(Slot(self))
        if not self._waiting:
            self._heap.clear()
            # Flows at or behind the virtual time start from it anyway: their tags are no longer needed.
            self._last_tag = {f: t for f, t in self._last_tag.items() if t > self._vtime}

    def _retry_after(self) -> float:
        slots = self.slots()
        per_place = 1.0 if math.isinf(slots) or slots <= 0 else self.waiting / slots
        return min(60.0, max(1.0, per_place))


class Flow:
    """The waiting rooms of every model, their places counted from the membership (`nodes(model)`: the live
    decode and colocated nodes of a model), re-counted whenever it changes."""

    def __init__(self, settings: FlowSettings, nodes: Callable[[str], list]) -> None:
        self.settings = settings
        self._nodes = nodes
        self.queues: dict[str, ModelQueue] = {}

    def queue(self, model: str) -> ModelQueue:
        if model not in self.queues:
            self.queues[model] = ModelQueue(model, self.settings, lambda: self.slots(model))
        return self.queues[model]

    def slots(self, model: str) -> float:
        total = 0.0
        for node in self._nodes(model):
            if not node.max_num_seqs:
                return math.inf
            total += node.max_num_seqs * self.settings.slots_per_seq
        return math.floor(total)

    def dispatch(self) -> None:
        """The membership changed: places may have come."""
        for queue in self.queues.values():
            queue.dispatch()

    async def follow(self, membership) -> None:
        """Dispatches on every membership change (run as a task)."""
        while True:
            version = membership.version
            with contextlib.suppress(TimeoutError):
                await membership.wait_for(lambda: membership.version != version, 5.0)
            self.dispatch()
