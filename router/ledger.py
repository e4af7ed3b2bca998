"""Budgets that routers share through etcd and never exceed together: a key's token quota, its requests and
tokens per minute, its requests in flight. The router's limiter (`limits.py`) admits against budget it already
holds; this module takes that budget from etcd and writes back what was charged.

One ledger per key, resource and window, at `/baton/<cluster>/ledger/<key id>/<resource>/<window>/`:
  v               bumped by every grant, the one write that takes budget from the pool (compare-and-swap on it)
  slice/<router>  budget a router holds, taken and not yet charged; on that router's ledger lease
  spent/<router>  what that router has charged; it alone writes it, so charging never contends
The pool has `limit - sum(spent) - sum(slice)` left. A grant reads the ledger and writes its slice only if `v` is
still at the revision it read, so two routers never both take the last of it. Every other write moves budget
from a router's slice to its spent (the sum is unchanged) or hands a slice back (the sum falls), and a slice
whose router died goes back by itself when its lease expires: none of them can make a grant wrong, so none
needs the compare.

Windows: `0` for the token quota and for concurrency (no window); the Unix minute for requests and tokens per
minute, whose spent keys go with a lease that outlives the minute (etcd forgets old windows by itself).
Charged requests leave a record (`done/<hash of request id>`, short-lived) so a router that resumes a stream
its first router charged, and lost before the client got its Finish, does not charge it again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass

import aetcd

from baton.common.membership import close_quietly, etcd_client

log = logging.getLogger(__name__)

RESOURCES = ("quota", "tpm", "rpm", "concurrency")
WINDOW_S = 60  # the rate limits' window
SLICE_DIVISOR = 8  # a grant takes what it needs, or 1/8 of what the pool has left if that is more
_MAX_TXN_OPS = 120  # etcd refuses a transaction of more than 128 operations (its default --max-txn-ops)


def ledger_root(cluster: str) -> str:
    return f"/baton/{cluster}/ledger/"


@dataclass(frozen=True, slots=True)
class LedgerId:
    key_id: str
    resource: str  # one of RESOURCES
    window: int = 0  # the Unix minute of a per-minute limit; 0 for the others

    def prefix(self, cluster: str) -> bytes:
        return f"{ledger_root(cluster)}{self.key_id}/{self.resource}/{self.window}/".encode()


def done_key(cluster: str, key_id: str, request_id: str) -> bytes:
    # The id is the client's (any length, any character): its hash names the record.
    return f"{ledger_root(cluster)}{key_id}/done/{hashlib.sha256(request_id.encode()).hexdigest()}".encode()


@dataclass(frozen=True, slots=True)
class Usage:
    """A ledger as etcd holds it: what all routers have charged, and hold."""

    spent: int
    held: int
    version_revision: int  # `v`'s mod revision (0: never granted)


def read_usage(kvs, prefix: bytes) -> Usage:
    spent = held = revision = 0
    for kv in kvs:
        name = kv.key[len(prefix):]
        if name == b"v":
            revision = kv.mod_revision
        elif name.startswith(b"spent/"):
            spent += _int(kv.value)
        elif name.startswith(b"slice/"):
            held += _int(kv.value)
    return Usage(spent, held, revision)


def _int(value: bytes) -> int:
    try:
        return max(0, int(value))
    except ValueError:
        return 0


class LeaseLost(Exception):
    """The router's ledger lease expired (it was cut off from etcd, or paused, past its TTL)."""


class LedgerStore:
    """One router's reads and writes of the ledgers: its own ledger lease (slices), a lease per minute window
    (spent), a lease for the records of charged requests. All writes go through one lock, so a grant and a
    charge of the same slice never interleave."""

    def __init__(self, etcd_url: str, cluster: str, router_id: str, *, lease_ttl: int = 5,
                 rpc_timeout: float = 2.0) -> None:
        self.cluster = cluster
        self.router_id = router_id
        self._client = etcd_client(etcd_url, timeout=rpc_timeout)
        self._tx = self._client.transactions
        self._lease_ttl = lease_ttl
        self._lease: int | None = None
        self._window_leases: dict[int, int] = {}
        self._done_lease: tuple[int, int] | None = None  # (minute granted, lease id)
        self.lock = asyncio.Lock()

    async def close(self) -> None:
        if self._lease is not None:
            try:
                await self._client.revoke_lease(self._lease)  # the slices go back to the pool at once
            except Exception as e:
                log.warning("could not revoke the ledger lease (its slices return within %d s): %s",
                            self._lease_ttl, e)
        await close_quietly(self._client)

    @property
    def lease_ttl(self) -> int:
        return self._lease_ttl

    async def lease(self) -> int:
        if self._lease is None:
            self._lease = (await self._client.lease(self._lease_ttl)).id
        return self._lease

    async def refresh(self) -> None:
        """Keeps the ledger lease alive; raises LeaseLost if it had expired (its slices are gone)."""
        if self._lease is None:
            return
        reply = await self._client.refresh_lease(self._lease)
        if reply is None or reply.TTL <= 0:
            self._lease = None
            raise LeaseLost()

    async def _window_lease(self, window: int) -> int | None:
        if not window:
            return None
        if window not in self._window_leases:
            # The minute's spent keys outlive it by two more, then etcd drops them.
            self._window_leases[window] = (await self._client.lease(3 * WINDOW_S)).id
            for old in [w for w in self._window_leases if w < window - 3]:
                del self._window_leases[old]
        return self._window_leases[window]

    async def _record_lease(self, minute: int) -> int:
        if self._done_lease is None or self._done_lease[0] != minute:
            self._done_lease = (minute, (await self._client.lease(3 * WINDOW_S)).id)
        return self._done_lease[1]

    async def read(self, ledger: LedgerId) -> Usage:
        prefix = ledger.prefix(self.cluster)
        return read_usage(await self._client.get_prefix(prefix), prefix)

    async def grant(self, ledger: LedgerId, limit: int, slice_now: int, need: int, force: bool = False) -> int:
        """Takes budget from the pool for this router's slice (now `slice_now`): at least `need`, more when the
        pool has plenty. Returns what it took, 0 if the pool has less than `need` (`force`: take `need` all the
        same, for reservations a lost lease had already returned). Call with `lock` held."""
        prefix = ledger.prefix(self.cluster)
        tx = self._tx
        while True:
            usage = await self.read(ledger)
            left = limit - usage.spent - usage.held
            take = need if force else min(left, max(need, left // SLICE_DIVISOR))
            if take < need or take <= 0:
                return 0
            lease = await self.lease()
            version = prefix + b"v"
            unchanged = tx.mod(version) == usage.version_revision if usage.version_revision else \
                tx.version(version) == 0
            ok = await self._transaction(
                compare=[unchanged],
                success=[tx.put(prefix + f"slice/{self.router_id}".encode(), str(slice_now + take).encode(),
                                lease=lease), tx.put(version, b"")])
            if ok:
                return take
            # Another router granted between the read and the write: read again.

    async def write(self, slices: dict[LedgerId, int], spent: dict[LedgerId, int],
                    done: dict[bytes, int]) -> None:
        """Sets this router's slices and spent totals, and records charged requests, in as few transactions as
        etcd allows (one, usually). A slice of 0 is deleted. Call with `lock` held. Raises LeaseLost if the
        ledger lease has expired (nothing was written: the transaction is all or nothing)."""
        ops = []
        for ledger, value in spent.items():
            lease = await self._window_lease(ledger.window)
            key = ledger.prefix(self.cluster) + f"spent/{self.router_id}".encode()
            value = str(value).encode()
            ops.append(self._tx.put(key, value, lease=lease) if lease else self._tx.put(key, value))
        if done:
            lease = await self._record_lease(_minute())
            ops += [self._tx.put(key, str(charged).encode(), lease=lease) for key, charged in done.items()]
        # Slices last: should etcd take the operations in more than one transaction, a charge lands before the
        # slice it came from shrinks (the pool looks smaller for a moment, never larger).
        for ledger, value in slices.items():
            key = ledger.prefix(self.cluster) + f"slice/{self.router_id}".encode()
            ops.append(self._tx.put(key, str(value).encode(), lease=await self.lease()) if value else
                       self._tx.delete(key))
        for i in range(0, len(ops), _MAX_TXN_OPS):
            await self._transaction(compare=[], success=ops[i:i + _MAX_TXN_OPS])

    async def _transaction(self, compare: list, success: list) -> bool:
        try:
            ok, _ = await self._client.transaction(compare=compare, success=success, failure=[])
            return ok
        except aetcd.ClientError as e:
            if "lease not found" in str(e):  # etcd's words for a lease that expired
                self._lease = None
                raise LeaseLost() from e
            raise

    async def charged(self, key_id: str, request_id: str) -> int | None:
        """What a router charged for `request_id` (a stream resumed here), if it recorded a charge."""
        kv = await self._client.get(done_key(self.cluster, key_id, request_id))
        return _int(kv.value) if kv is not None else None


def _minute() -> int:
    return int(time.time() // WINDOW_S)
