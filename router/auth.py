"""Who may call the router's public fronts (`--auth`): every call carries a key (`Authorization: Bearer <key>`,
in gRPC metadata or an HTTP header), checked against the keys in etcd (common/keys.py).

The router keeps a live copy of the keys (`KeyStore`, an etcd watch on the cluster's key prefix), so a key
created, revoked or changed on any machine counts here as soon as the watch delivers it, with no restart and
no etcd read per request. A call without a key, or with one that is unknown, revoked or expired, is refused
UNAUTHENTICATED (HTTP 401); a key used for a model it does not list, PERMISSION_DENIED (403).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable

import aetcd

from baton.common.keys import KeyRecord, digest, key_id_of, keys_prefix
from baton.common.membership import PrefixFollower

log = logging.getLogger(__name__)


class Unauthenticated(Exception):
    """No key, or one that is not valid now."""


class PermissionDenied(Exception):
    """A valid key used for what it may not do."""


def bearer(value: str | None) -> str | None:
    """The key in an `Authorization` value (`Bearer <key>`, the scheme in any case), else None."""
    if not value:
        return None
    scheme, _, key = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return key.strip() or None


def credential_from_metadata(metadata) -> str | None:
    """The key in a gRPC call's invocation metadata (its `authorization` entry)."""
    for name, value in metadata or ():
        if name == "authorization":
            return bearer(value if isinstance(value, str) else value.decode(errors="replace"))
    return None


class KeyStore(PrefixFollower):
    """The cluster's keys, as etcd holds them now (`store = await KeyStore.start(url, cluster, secret)`)."""

    def __init__(self, etcd_url: str, cluster: str, secret: bytes, *, rpc_timeout: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(etcd_url, keys_prefix(cluster), rpc_timeout=rpc_timeout)
        self._secret = secret
        self._records: dict[str, KeyRecord] = {}  # by key id
        self._clock = clock

    @classmethod
    async def start(cls, etcd_url: str, cluster: str, secret: bytes, *, rpc_timeout: float = 5.0) -> KeyStore:
        """Reads the keys (raises if etcd is unreachable), then follows their changes in the background."""
        store = cls(etcd_url, cluster, secret, rpc_timeout=rpc_timeout)
        await store._follow()
        return store

    def authenticate(self, credential: str | None) -> KeyRecord:
        """The record of the key `credential`; Unauthenticated if there is none or it is not valid now."""
        if not credential:
            raise Unauthenticated("an API key is required (Authorization: Bearer <key>)")
        key_id = key_id_of(credential)
        record = self._records.get(key_id) if key_id is not None else None
        # The digest is computed whatever the record, so a call takes as long with an unknown id as with a
        # known one; the comparison takes as long wherever the digests differ.
        mine = digest(self._secret, credential)
        if record is None or not hmac.compare_digest(record.digest, mine):
            raise Unauthenticated("invalid API key")
        state = record.state(self._clock())
        if state != "active":
            raise Unauthenticated(f"API key {record.name!r} is {state}")
        return record

    @staticmethod
    def authorize(record: KeyRecord, model: str) -> None:
        if not record.allows(model):
            raise PermissionDenied(f"API key {record.name!r} may not use model {model!r}")

    def _load(self, kvs) -> None:
        records = {}
        for kv in kvs:
            record = self._parse(kv.key, kv.value)
            if record is not None:
                records[record.key_id] = record
        self._records = records

    def _event(self, event: aetcd.Event) -> None:
        if event.kind == aetcd.EventKind.PUT:
            record = self._parse(event.kv.key, event.kv.value)
            if record is not None:
                self._records[record.key_id] = record
        else:
            self._records.pop(event.kv.key.decode(errors="replace").removeprefix(self._prefix), None)

    def _parse(self, key: bytes, value: bytes) -> KeyRecord | None:
        # A malformed record (a hand-made key, another version) is skipped: it authenticates nobody.
        try:
            record = KeyRecord.from_json(value)
        except ValueError as e:
            log.warning("ignoring a key record that does not parse (%r): %s", key, e)
            return None
        if key.decode(errors="replace") != f"{self._prefix}{record.key_id}":
            log.warning("ignoring the key record at %r: it names key id %s", key, record.key_id)
            return None
        return record
