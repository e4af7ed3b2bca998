"""The decode node's reservations: the one owner of a request's blocks on this node, from Reserve to release.

A reservation only moves forward:

    RESERVED ──ReceiveKV──▶ RECEIVING ──every layer in──▶ READY ──Continue──▶ DECODING ──▶ RELEASED
       │                                                                          ▲
       └──Continue (prefill_here: this node computes what its cached blocks lack)─┘
       └───────────────────────┴──────────────────────────┴─────────────────────┴──────────▶ RELEASED

Every way to RELEASED, whatever its cause (finish, client cancel, deadline, lease expiry, failed or
cancelled transfer, dead peer, node shutdown), goes through `release`, and only `_free` gives blocks back
(through the engine, which frees a reservation or aborts its sequence alike). While K/V are landing
(RECEIVING) a release is deferred to the receive's end, so blocks being written into are never freed, and so
never reused mid-write; likewise while a prefill node reads cached blocks back from it (`begin_read`: the
pull path), so they are never evicted mid-read. A transition that is not allowed is refused and logged as an
error: never a silent double free. Everything here runs on the event loop: no locks.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from baton.engine.async_engine import AsyncEngine

log = logging.getLogger(__name__)


class Phase(enum.IntEnum):
    RESERVED = 1  # blocks allocated, nothing written yet (leased)
    RECEIVING = 2  # the prefill node's K/V are landing in them
    READY = 3  # the prompt's K/V are in: waiting for Continue (leased)
    DECODING = 4  # adopted by the engine: the Continue stream owns the request
    RELEASED = 5


_NEXT = {Phase.RESERVED: {Phase.RECEIVING}, Phase.RECEIVING: {Phase.READY}, Phase.READY: {Phase.DECODING}}


class NotAllowed(RuntimeError):
    """A transition the lifecycle does not allow (a duplicate ReceiveKV, a second Continue, ...)."""


@dataclass(slots=True, eq=False)
class Reservation:
    request_id: str
    blocks: list[int]
    tag: int  # unique on this node: names the transfer (ReserveResponse.transfer_tag); not on the wire
    expires: float  # lease deadline (clock), for RESERVED and READY
    cached: int = 0  # the first blocks hold the prompt's K/V already (the prefix cache): nothing is written there
    phase: Phase = Phase.RESERVED
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # READY or RELEASED: what Continue waits for
    cause: str = ""  # why it was released (or will be, once its receive or its reads end)
    readers: int = 0  # pulls reading its cached blocks (a release waits for them)


class Reservations:
    def __init__(self, engine: AsyncEngine, clock: Callable[[], float] = time.monotonic) -> None:
        self._engine = engine
        self._clock = clock
        self._by_id: dict[str, Reservation] = {}
        self._tags = itertools.count(1)

    def get(self, request_id: str) -> Reservation | None:
        return self._by_id.get(request_id)

    @property
    def pending(self) -> int:
        """Reservations not yet adopted (RESERVED, RECEIVING, READY)."""
        return sum(r.phase < Phase.DECODING for r in self._by_id.values())

    def lease_left(self, r: Reservation) -> float:
        return max(0.0, r.expires - self._clock())

    async def reserve(self, request_id: str, prompt_tokens: int, max_tokens: int, lease_s: float,
                      token_ids: Sequence[int] = ()) -> Reservation:
        """Allocates the prompt's blocks under a lease, its cached ones first when its `token_ids` are given.
        Raises the engine's InvalidRequest / NoCapacity."""
        try:
            got = await self._engine.reserve(request_id, prompt_tokens, max_tokens, token_ids or None)
        except asyncio.CancelledError:  # the allocation still runs (it is queued): undo it after
            await asyncio.shield(self._engine.release(request_id))
            raise
        r = self._by_id[request_id] = Reservation(request_id, got.blocks, next(self._tags), self._clock() + lease_s,
                                                  cached=got.cached)
        return r

    def advance(self, r: Reservation, to: Phase) -> None:
        """RESERVED -> RECEIVING -> READY -> DECODING; anything else raises NotAllowed (and is logged)."""
        if to not in _NEXT.get(r.phase, ()):
            log.error("reservation %s: %s -> %s is not allowed", r.request_id, r.phase.name, to.name)
            raise NotAllowed(f"request_id: {r.request_id!r} is {r.phase.name.lower()}, cannot become {to.name.lower()}")
        r.phase = to
        if to is Phase.READY:
            r.settled.set()

    def compute_here(self, r: Reservation) -> None:
        """RESERVED -> DECODING with no K/V to come: this node computes what the reservation's cached blocks
        lack (conditional disaggregation). From any other phase: NotAllowed (the K/V are being sent)."""
        if r.phase is not Phase.RESERVED:
            log.error("reservation %s: %s -> DECODING (computed here) is not allowed", r.request_id, r.phase.name)
            raise NotAllowed(f"prefill_here: {r.request_id!r} is {r.phase.name.lower()}: its K/V are sent")
        r.phase = Phase.DECODING

    async def receive_ended(self, r: Reservation, ok: bool, cause: str) -> None:
        """The receive into `r` is over: READY if every layer came and nobody released it meanwhile, else the
        blocks go (now that nothing writes into them)."""
        if r.phase is not Phase.RECEIVING:
            log.error("reservation %s: receive ended in phase %s", r.request_id, r.phase.name)
            return
        if ok and not r.cause:
            self.advance(r, Phase.READY)
        else:
            await self._free(r, r.cause or cause)

    async def release(self, request_id: str, cause: str) -> int:
        """Frees what this node holds for a request, from any cause; deferred while its K/V are landing.
        Safe to call twice, and for requests this node never saw. Returns the blocks freed now."""
        r = self._by_id.get(request_id)
        if r is None:  # nothing reserved (or already released): free whatever the engine still holds
            return await self._engine.release(request_id)
        if r.phase is Phase.RECEIVING or r.readers:
            r.cause = r.cause or cause
            return 0
        return await self._free(r, cause)

    def begin_read(self, r: Reservation) -> None:
        """A prefill node reads `r`'s cached blocks back (a pull): until `end_read`, a release waits."""
        r.readers += 1

    async def end_read(self, r: Reservation) -> None:
        """A read is over: a release that came meanwhile is carried out now (unless K/V are landing: the
        receive's end does it)."""
        r.readers -= 1
        if not r.readers and r.cause and r.phase not in (Phase.RECEIVING, Phase.RELEASED):
            await self._free(r, r.cause)

    async def _free(self, r: Reservation, cause: str) -> int:
        # The record leaves first (no await before): a concurrent release finds nothing to free twice.
        r.phase, r.cause = Phase.RELEASED, r.cause or cause
        if self._by_id.get(r.request_id) is r:
            del self._by_id[r.request_id]
        r.settled.set()
        freed = await asyncio.shield(self._engine.release(r.request_id))
        if cause not in ("finished", "released"):
            log.info("released %s (%s): %d blocks", r.request_id, cause, freed)
        return freed

    async def expire(self) -> None:
        """Releases reservations whose lease ran out while nobody was writing into or decoding them."""
        now = self._clock()
        for r in [r for r in self._by_id.values() if r.phase in (Phase.RESERVED, Phase.READY) and r.expires < now
                  and not r.readers]:
            log.warning("reservation %s expired in phase %s", r.request_id, r.phase.name)
            await self.release(r.request_id, "lease expired")

    async def release_all(self, cause: str) -> None:
        for request_id in list(self._by_id):
            await self.release(request_id, cause)
