"""A key's limits, enforced exactly across routers: its token quota, requests and tokens per minute, requests in
flight (`KeyRecord`). Each router admits only against budget it already holds, taken from etcd in slices
(`ledger.py`), so the common path is local and the routers together never go past a limit.

At admission a request reserves, against each of its key's limits: 1 request in flight, 1 request this minute,
and prompt + max_tokens tokens this minute and from the quota. It is charged when it ends, for what its client
received: the prompt and the tokens relayed (nothing if no token was: a request cancelled or failed before its
first token pays nothing); the rest of its reservation goes back to this router's slice. The charge is in etcd
before the client gets its Finish (one write covers every request that ended meanwhile), so a router that dies
has charged every request it finished; a stream it was serving is charged by the router its client resumes on
(for everything the client has), and the budget it held returns to the pool when its ledger lease expires.

Budget idle in a router goes back after `idle_return_s` without use; a minute's goes back when the minute ends.
Worst case: a request is refused while other routers hold, idle, up to 1/8 of what the pool had each time they
took a slice, for at most `idle_return_s`.

etcd out of reach when a slice is needed: `fail_open` admits without budget (charged once etcd is back: the
limits may be exceeded meanwhile); otherwise the request is refused UNAVAILABLE. Charges not yet written wait in
memory and are written when etcd is back. A router cut off from etcd past its lease TTL loses its slices to
the pool; it takes back what its requests in flight had reserved (so only those can go past a limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aetcd

from baton.common.keys import KeyRecord

from .ledger import WINDOW_S, LeaseLost, LedgerId, LedgerStore, done_key

log = logging.getLogger(__name__)

_ETCD_ERRORS = (aetcd.ClientError, TimeoutError, OSError)


class OverLimit(Exception):
    """A key's limit leaves no room for the request (RESOURCE_EXHAUSTED / 429); `retry_after`: seconds until it
    may, when that is known (None: not by waiting, or not known)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LimitsUnavailable(Exception):
    """etcd cannot be reached to take budget, and the limiter fails closed (UNAVAILABLE)."""


@dataclass(slots=True)
class Account:
    """This router's share of one ledger. `taken` (its slice in etcd) = `free` + `reserved` + `pending`."""

    ledger: LedgerId
    limit: int
    taken: int = 0
    free: int = 0  # held, not reserved
    reserved: int = 0  # by requests in flight
    pending: int = 0  # charged here, not yet written to spent
    unbacked: int = 0  # charged for requests admitted without budget (fail_open), not yet written
    spent: int = 0  # this router's spent total in etcd
    last_used: float = 0.0


@dataclass(slots=True)
class Part:
    account: Account
    amount: int
    backed: bool  # taken from held budget (False: admitted without it, fail_open)


@dataclass(slots=True)
class Hold:
    """What one request reserved, settled once (`Limiter.settle`)."""

    key: KeyRecord
    request_id: str
    parts: list[Part] = field(default_factory=list)
    settled: bool = False
    charged_before: int | None = None  # a resumed stream: what the router that lost it charged, if it did


_WHAT = {"quota": "token quota", "tpm": "tokens per minute", "rpm": "requests per minute",
         "concurrency": "requests in flight"}


def limited(key: KeyRecord | None) -> bool:
    return key is not None and bool(key.quota_tokens or key.tpm or key.rpm or key.max_concurrency)


class Limiter:
    """Owns this router's accounts; `start()` runs the writer, `close()` hands every slice back."""

    def __init__(self, store: LedgerStore, *, fail_open: bool = False, idle_return_s: float = 1.0,
                 flush_wait_s: float = 2.0, grant_timeout_s: float = 2.0,
                 clock: Callable[[], float] = time.time,
                 on_refusal: Callable[[KeyRecord, str], None] = lambda key, reason: None) -> None:
        self.store = store
        self.fail_open = fail_open
        self.idle_return_s = idle_return_s
        self.flush_wait_s = flush_wait_s
        self.grant_timeout_s = grant_timeout_s
        self._clock = clock
        self._on_refusal = on_refusal
        self._accounts: dict[LedgerId, Account] = {}
        self._done: dict[bytes, int] = {}  # records of charged requests, not yet written
        self._dirty = asyncio.Event()
        self._written: asyncio.Future | None = None  # resolved by the next write that lands
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._writer(), name="limits-writer")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(*_ETCD_ERRORS, LeaseLost):
            async with self.store.lock:
                await asyncio.wait_for(self._write(everything=True), self.flush_wait_s)
        await self.store.close()

    # -- admission ---------------------------------------------------------------------------------------------

    async def reserve(self, key: KeyRecord, request_id: str, tokens: int, *, new_request: bool = True,
                      wait_s: float = 0.0) -> Hold:
        """Reserves one request of `tokens` (prompt + max_tokens) against every limit of `key`. Raises OverLimit
        or LimitsUnavailable (nothing is then held). `new_request`: False for a stream another router counted
        already (not counted again in the requests per minute). `wait_s`: how long to wait for budget to come
        back before OverLimit, for a stream resumed from a router that died: what that router held for it
        returns to the pool when its ledger lease expires, and the client has tokens that must be paid for."""
        now = self._clock()
        minute = int(now // WINDOW_S)
        wants = []
        if key.max_concurrency:
            wants.append((LedgerId(key.ledger_id, "concurrency"), key.max_concurrency, 1))
        if key.rpm and new_request:
            wants.append((LedgerId(key.ledger_id, "rpm", minute), key.rpm, 1))
        if key.tpm and tokens:
            wants.append((LedgerId(key.ledger_id, "tpm", minute), key.tpm, tokens))
        if key.quota_tokens and tokens:
            wants.append((LedgerId(key.ledger_id, "quota"), key.quota_tokens, tokens))
        hold = Hold(key, request_id)
        try:
            for ledger, limit, amount in wants:
                account = self._account(ledger, limit)
                if amount > limit:
                    raise OverLimit(f"the request needs {amount} tokens (prompt + max_tokens), more than its "
                                    f"{_WHAT[ledger.resource]} ({limit})")
                hold.parts.append(Part(account, amount, await self._waiting(account, amount, wait_s)))
        except OverLimit as e:
            self.settle(hold, 0, count_request=False)
            self._on_refusal(key, "limit")
            raise OverLimit(f"API key {key.name!r}: {e}", e.retry_after) from None
        except LimitsUnavailable:
            self.settle(hold, 0, count_request=False)
            self._on_refusal(key, "limits_unavailable")
            raise
        except BaseException:
            self.settle(hold, 0, count_request=False)
            raise
        return hold

    def _account(self, ledger: LedgerId, limit: int) -> Account:
        account = self._accounts.get(ledger)
        if account is None:
            account = self._accounts[ledger] = Account(ledger, limit)
        account.limit = limit  # a limit changed in etcd counts from the next grant
        account.last_used = self._clock()
        return account

    async def _waiting(self, account: Account, amount: int, wait_s: float) -> bool:
        until = time.monotonic() + wait_s
        while True:
            try:
                return await self._take(account, amount)
            except OverLimit:
                if time.monotonic() >= until:
                    raise
            await asyncio.sleep(0.25)  # a dead router's lease expires on etcd's clock: nothing to wait on here

    async def _take(self, account: Account, amount: int) -> bool:
        if account.free < amount:
            async with self.store.lock:
                if account.free < amount:  # still: no other request's grant covered it meanwhile
                    if not await self._grant(account, amount - account.free):
                        return False
        account.free -= amount
        account.reserved += amount
        return True

    async def _grant(self, account: Account, need: int) -> bool:
        """Adds at least `need` to the account's free budget; False if admitted without budget (fail_open)."""
        try:
            took = await asyncio.wait_for(self.store.grant(account.ledger, account.limit, account.taken, need),
                                          self.grant_timeout_s)
        except LeaseLost:
            await self._lease_lost()
            return await self._grant(account, need)
        except _ETCD_ERRORS as e:
            if self.fail_open:
                log.warning("limits: etcd unreachable (%s); admitting %s without budget (fail_open)", e,
                            account.ledger)
                return False
            raise LimitsUnavailable(f"the key's limits cannot be checked now (etcd: {e})") from None
        if not took:
            resource = account.ledger.resource
            retry = None
            if account.ledger.window:
                retry = (account.ledger.window + 1) * WINDOW_S - self._clock()
            elif resource == "concurrency":
                retry = 1.0
            raise OverLimit(f"{_WHAT[resource]} limit reached ({account.limit})", retry)
        account.taken += took
        account.free += took
        return True

    # -- the end of a request -----------------------------------------------------------------------------------

    def settle(self, hold: Hold, charge: int, count_request: bool = True) -> asyncio.Future | None:
        """Charges the request `charge` tokens (what its client received; 0 for nothing), and 1 request to the
        per-minute requests if `count_request`; the rest of its reservation is free again. Returns a future
        that the write of this charge to etcd resolves (None if there is nothing to write)."""
        if hold.settled:
            return None
        hold.settled = True
        write = False
        for part in hold.parts:
            account, amount = part.account, part.amount
            resource = account.ledger.resource
            if resource == "concurrency":
                used = 0
            elif resource == "rpm":
                used = amount if count_request else 0
            else:
                used = min(charge, amount)
            if part.backed:
                account.reserved -= amount
                account.free += amount - used
                account.pending += used
            else:
                account.unbacked += used
            write = write or used > 0
        if charge and any(p.account.ledger.resource in ("quota", "tpm") for p in hold.parts):
            self._done[done_key(self.store.cluster, hold.key.ledger_id, hold.request_id)] = charge
        if not write:
            return None
        if self._written is None:
            self._written = asyncio.get_running_loop().create_future()
        self._dirty.set()
        return self._written

    async def settle_written(self, hold: Hold, charge: int) -> None:
        """`settle`, then wait (up to `flush_wait_s`) until the charge is in etcd: before a client gets its
        Finish. etcd out of reach: the charge stays to be written, and the request goes on."""
        written = self.settle(hold, charge)
        if written is not None:
            try:
                await asyncio.wait_for(asyncio.shield(written), self.flush_wait_s)
            except TimeoutError:
                log.warning("limits: a charge of %d tokens is not in etcd yet (written when it can be)", charge)

    async def charged(self, key: KeyRecord, request_id: str) -> int | None:
        """What another router charged for a stream resumed here, if it recorded one before it failed."""
        try:
            return await asyncio.wait_for(self.store.charged(key.ledger_id, request_id), self.grant_timeout_s)
        except _ETCD_ERRORS as e:
            log.warning("limits: cannot read whether %r was charged (%s): charging it here", request_id, e)
            return None

    # -- the writer ---------------------------------------------------------------------------------------------

    async def _writer(self) -> None:
        refresh_every = max(1.0, self.store.lease_ttl / 3)
        refreshed = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), min(0.5, self.idle_return_s / 2))
            try:
                if time.monotonic() - refreshed >= refresh_every:
                    await self.store.refresh()
                    refreshed = time.monotonic()
                async with self.store.lock:
                    await self._write()
            except LeaseLost:
                with contextlib.suppress(*_ETCD_ERRORS, LeaseLost):
                    async with self.store.lock:
                        await self._lease_lost()
                self._dirty.set()
            except _ETCD_ERRORS as e:
                log.warning("limits: cannot write to etcd (%s); retrying", e)
                await asyncio.sleep(0.2)

    async def _write(self, everything: bool = False) -> None:
        """One write of every charge not yet in etcd, every idle slice handed back (`everything`: all that is
        free). Call with the store's lock held."""
        self._dirty.clear()
        written, self._written = self._written, None
        now = self._clock()
        minute = int(now // WINDOW_S)
        spent: dict[LedgerId, int] = {}
        slices: dict[LedgerId, int] = {}
        moves = []
        for ledger, account in self._accounts.items():
            over = ledger.window and ledger.window < minute  # a past minute: its budget is no use
            idle = everything or over or now - account.last_used >= self.idle_return_s
            back = account.free if idle else 0
            pending, unbacked = account.pending, account.unbacked
            if not (pending or unbacked or back):
                continue
            account.free -= back  # before the write: a request admitted meanwhile must not take it
            if pending or unbacked:
                spent[ledger] = account.spent + pending + unbacked
            if pending or back:
                slices[ledger] = account.taken - pending - back
            moves.append((account, pending, unbacked, back))
        done, self._done = self._done, {}
        try:
            if spent or slices or done:
                await self.store.write(slices, spent, done)
        except BaseException:
            for account, _, _, back in moves:
                account.free += back
            self._done = done | self._done
            self._dirty.set()
            if written is not None:  # the charges it covered go with the next write
                self._written = written
            raise
        for account, pending, unbacked, back in moves:
            account.spent += pending + unbacked
            account.pending -= pending
            account.unbacked -= unbacked
            account.taken -= pending + back
        for ledger in [ledger for ledger, a in self._accounts.items() if ledger.window and ledger.window < minute
                       and not (a.taken or a.reserved or a.pending or a.unbacked)]:
            del self._accounts[ledger]
        if written is not None and not written.done():
            written.set_result(None)

    async def _lease_lost(self) -> None:
        """(With the store's lock held.) The slices went back to the pool (this router was cut off from etcd past
        its lease TTL): what its requests in flight reserved, and what was charged and not yet written, is taken
        again whatever the pool has left; the rest is gone."""
        log.warning("limits: the ledger lease expired; taking back what the requests in flight hold")
        for account in self._accounts.values():
            need = account.reserved + account.pending
            account.free = 0
            account.taken = 0
            if need:
                account.taken = await self.store.grant(account.ledger, account.limit, 0, need, force=True)
