"""Per-key usage as this router sees it, and the signal of a resold key: how many client addresses use it.

Counted per key name in the router's metrics: requests by outcome, prompt and completion tokens relayed,
refusals by reason (limits.py, flow.py), distinct client addresses in the current window. A key used from
more than `flag_addresses` addresses in one window is flagged (`baton_router_key_flagged`), and logged once
per window: a free tier resold, or a key leaked, shows up so. Each router also publishes, per account and
window, the hashes of the addresses it saw (`/baton/<cluster>/usage/<account>/<window>/<router>`, gone after two
windows), so `baton keys usage` counts distinct addresses across every router.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable

import aetcd

from baton.common.keys import KeyRecord

log = logging.getLogger(__name__)

WINDOW_S = 600  # the address window
MAX_ADDRESSES = 1000  # addresses kept per key and window (past that, the key is flagged anyway)


def usage_prefix(cluster: str) -> str:
    return f"/baton/{cluster}/usage/"


def address_of(peer: str) -> str:
    """The client's host in a gRPC peer ("ipv4:1.2.3.4:5678", "ipv6:[::1]:5678") or an HTTP remote ("1.2.3.4")."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host = rest.rpartition(":")[0]
        return host.strip("[]")
    return peer


def _hash(address: str) -> str:
    # Addresses are personal data: etcd and the metrics get a short hash, enough to count distinct ones.
    return hashlib.sha256(address.encode()).hexdigest()[:16]


class KeyUsage:
    """Owns the per-key address sets of the current window; the counters live in the router's metrics."""

    def __init__(self, metrics, *, flag_addresses: int = 20, clock: Callable[[], float] = time.time) -> None:
        self.metrics = metrics
        self.flag_addresses = flag_addresses
        self._clock = clock
        self._window = self._now_window()
        self._addresses: dict[str, set[str]] = {}  # by key name
        self._accounts: dict[str, str] = {}  # key name -> account (ledger id)
        self._flagged: set[str] = set()
        self._changed = False
        self._lease: tuple[int, int] | None = None  # (window, lease id) of the published address sets
        metrics.watch_key_usage(self)

    def _now_window(self) -> int:
        return int(self._clock() // WINDOW_S)

    def _roll(self) -> None:
        window = self._now_window()
        if window != self._window:
            self._window, self._addresses, self._flagged, self._changed = window, {}, set(), True

    def seen(self, key: KeyRecord | None, peer: str) -> None:
        """A request of `key` from `peer` (a gRPC peer or an HTTP remote address)."""
        if key is None or not peer:
            return
        self._roll()
        addresses = self._addresses.setdefault(key.name, set())
        self._accounts[key.name] = key.ledger_id
        if len(addresses) < MAX_ADDRESSES:
            before = len(addresses)
            addresses.add(_hash(address_of(peer)))
            self._changed |= len(addresses) != before
        if len(addresses) > self.flag_addresses and key.name not in self._flagged:
            self._flagged.add(key.name)
            log.warning("API key %r used from %d client addresses in %d s (more than %d): resold or leaked?",
                        key.name, len(addresses), WINDOW_S, self.flag_addresses)

    def ended(self, key: KeyRecord | None, status: str, prompt_tokens: int, completion_tokens: int) -> None:
        if key is None:
            return
        m = self.metrics
        m.key_requests.labels(key.name, status).inc()
        if prompt_tokens:
            m.key_tokens.labels(key.name, "prompt").inc(prompt_tokens)
        if completion_tokens:
            m.key_tokens.labels(key.name, "completion").inc(completion_tokens)

    def addresses(self) -> dict[str, int]:
        """Distinct client addresses per key name, this window."""
        self._roll()
        return {name: len(a) for name, a in self._addresses.items()}

    def flagged(self) -> set[str]:
        self._roll()
        return set(self._flagged)

    async def publish(self, client: aetcd.Client, cluster: str, router_id: str) -> None:
        """Writes this window's address hashes per account to etcd, if they changed (run every few seconds)."""
        self._roll()
        if not self._changed:
            return
        window = self._window
        self._changed = False  # before the snapshot: addresses seen while it is written count as a change
        per_account: dict[str, set[str]] = {}
        for name, addresses in self._addresses.items():
            per_account.setdefault(self._accounts[name], set()).update(addresses)
        try:
            if self._lease is None or self._lease[0] != window:
                self._lease = (window, (await client.lease(2 * WINDOW_S)).id)
            for account, addresses in per_account.items():
                key = f"{usage_prefix(cluster)}{account}/{window}/{router_id}".encode()
                await client.put(key, json.dumps(sorted(addresses)).encode(), lease=self._lease[1])
        except BaseException:
            self._changed = True
            raise
