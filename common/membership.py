"""Live cluster membership in etcd: nodes announce themselves under a lease, the router watches.

Key layout: `/baton/<cluster>/nodes/<role>/<node_id>` -> `NodeInfo` as JSON, attached to the node's lease.

- `NodeRegistration` (one per node process) grants a lease, puts its key under it and keeps the lease alive
  from a background task (aetcd has no keep-alive of its own). A node that stops cleanly revokes the lease, so
  its key goes at once; a node that dies stops refreshing and etcd deletes the key when the TTL runs out.
- `MembershipWatcher` (in the router) keeps a local copy (`PrefixFollower`: one range read, then a watch from
  the revision after it, resumed or read again after a lost connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
from dataclasses import asdict, dataclass, field, fields
from typing import Callable
from urllib.parse import urlsplit

import aetcd

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "colocated")

# grpc's default reconnect backoff grows to 120 s: an etcd that restarts would be seen again only minutes
# later, long after every lease expired. Keepalive pings find a dead peer behind a half-open TCP connection;
# etcd refuses pings more often than every 5 s (--grpc-keepalive-min-time).
_CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
}


# -- the record ----------------------------------------------------------------------------------------
@dataclass(slots=True)
class NodeInfo:
    node_id: str
    role: str  # one of ROLES
    model: str
    address: str  # gRPC host:port
    capacity: int = 0  # KV blocks in all
    free_blocks: int = 0
    running: int = 0
    waiting: int = 0
    # Added later: a record without them (an older node's) reads as no metrics endpoint, one rank.
    metrics_address: str = ""  # host:port of its Prometheus metrics (GET /metrics); "" -> none
    tensor_parallel_size: int = 1
    model_path: str = ""  # the checkpoint folder, as the node sees it (a router loads the tokenizer from it)
    aliases: list[str] = field(default_factory=list)  # other names requests may give the model
    queued_tokens: int = 0  # prompt tokens waiting to be computed on it (KV-aware routing weighs them)
    kv_pull_min_tokens: int = 0  # a prefill node's --kv-pull-min-tokens: it reads back a prefix this long (0: never)
    max_num_seqs: int = 0  # sequences it batches at once (the router's queue counts its slots); 0: not said

    def __post_init__(self) -> None:
        if not isinstance(self.aliases, list) or not all(isinstance(a, str) and a for a in self.aliases):
            raise ValueError(f"NodeInfo.aliases must be a list of non-empty strings, got {self.aliases!r}")
        for name in ("node_id", "role", "model", "address", "metrics_address", "model_path"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"NodeInfo.{name} must be a string, got {getattr(self, name)!r}")
        if not self.node_id or "/" in self.node_id:
            raise ValueError(f"NodeInfo.node_id must be non-empty and contain no '/', got {self.node_id!r}")
        if self.role not in ROLES:
            raise ValueError(f"NodeInfo.role must be one of {ROLES}, got {self.role!r}")
        if not self.address:
            raise ValueError("NodeInfo.address must be host:port, got ''")
        for name in ("capacity", "free_blocks", "running", "waiting", "queued_tokens", "kv_pull_min_tokens",
                     "max_num_seqs"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"NodeInfo.{name} must be an int >= 0, got {v!r}")
        tp = self.tensor_parallel_size
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ValueError(f"NodeInfo.tensor_parallel_size must be an int >= 1, got {tp!r}")
        if self.free_blocks > self.capacity:
            raise ValueError(f"NodeInfo.free_blocks ({self.free_blocks}) exceeds capacity ({self.capacity})")

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> NodeInfo:
        return record_from_json(cls, data)


WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def advertised_host(host: str) -> str:
    """The address to publish for a server bound to `host`: a wildcard cannot be dialled, so this machine's
    own address (what its host name resolves to) goes in its place."""
    if host not in WILDCARDS:
        return host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def published_address(address: str, advertise_host: str = "") -> str:
    """What a server listening at `address` (host:port) publishes for others to dial: `advertise_host` in place
    of its host, or this machine's address where it listens on a wildcard."""
    host, _, port = address.rpartition(":")
    public = advertise_host or advertised_host(host.strip("[]"))
    return f"[{public}]:{port}" if ":" in public else f"{public}:{port}"


@dataclass(slots=True)
class RouterInfo:
    """A router's record (`/baton/<cluster>/routers/<router_id>`): where clients and scrapers find it. Routers
    keep no state that others read; the record is for operators (`baton status`, Prometheus discovery)."""

    router_id: str
    address: str  # gRPC host:port (baton.v1 and KServe)
    http_address: str = ""  # host:port of its OpenAI-compatible HTTP front; "" -> none
    metrics_address: str = ""  # host:port of its Prometheus metrics (GET /metrics)

    def __post_init__(self) -> None:
        for name in ("router_id", "address", "http_address", "metrics_address"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"RouterInfo.{name} must be a string, got {getattr(self, name)!r}")
        if not self.router_id or "/" in self.router_id:
            raise ValueError(f"RouterInfo.router_id must be non-empty and contain no '/', got {self.router_id!r}")
        if not self.address:
            raise ValueError("RouterInfo.address must be host:port, got ''")

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> RouterInfo:
        return record_from_json(cls, data)


def record_from_json(cls, data: bytes | str):
    """A record of type `cls` from its JSON; ValueError names what is wrong (not an object, a field unknown
    or missing, a value refused by the record's own checks)."""
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise ValueError(f"{cls.__name__} JSON must be an object, got {type(obj).__name__}")
    unknown = set(obj) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    try:
        return cls(**obj)
    except TypeError as e:  # a required field is missing
        raise ValueError(f"{cls.__name__}: {e}") from None


def routers_prefix(cluster: str) -> str:
    return nodes_prefix(cluster).removesuffix("nodes/") + "routers/"


def router_key(cluster: str, router_id: str) -> str:
    return f"{routers_prefix(cluster)}{router_id}"


async def read_routers(client: aetcd.Client, cluster: str) -> list[RouterInfo]:
    """The routers registered in `cluster`, by id (a record that does not parse is skipped)."""
    routers = []
    for kv in await client.get_prefix(routers_prefix(cluster).encode()):
        try:
            routers.append(RouterInfo.from_json(kv.value))
        except ValueError as e:
            log.warning("skipping a router record that does not parse (%s): %s", kv.key, e)
    return sorted(routers, key=lambda r: r.router_id)


def nodes_prefix(cluster: str) -> str:
    if not cluster or "/" in cluster:
        raise ValueError(f"cluster name must be non-empty and contain no '/', got {cluster!r}")
    return f"/baton/{cluster}/nodes/"


def node_key(cluster: str, role: str, node_id: str) -> str:
    return f"{nodes_prefix(cluster)}{role}/{node_id}"


def etcd_client(etcd_url: str, timeout: float) -> aetcd.Client:
    """An aetcd client for "http://host:port" (or bare "host:port"); `timeout` bounds each unary call."""
    parts = urlsplit(etcd_url if "://" in etcd_url else f"http://{etcd_url}")
    if parts.scheme != "http" or not parts.hostname or not parts.port:
        raise ValueError(f"etcd URL must look like http://host:port, got {etcd_url!r}")
    return aetcd.Client(parts.hostname, parts.port, timeout=timeout, options=dict(_CHANNEL_OPTIONS))


async def close_quietly(client: aetcd.Client) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.close(), 2.0)


def _lease_not_found(e: Exception) -> bool:
    # aetcd maps grpc NOT_FOUND to a bare ClientError; the text is etcd's ErrGRPCLeaseNotFound.
    return isinstance(e, aetcd.ClientError) and "lease not found" in str(e)


# -- the node's side -----------------------------------------------------------------------------------
class NodeRegistration:
    """`reg = await NodeRegistration.register(url, cluster, info)`; `await reg.update_load(...)`; `await reg.close()`.
    A router registers its `RouterInfo` the same way (under its key; it has no load to update)."""

    def __init__(self, etcd_url: str, cluster: str, info: NodeInfo | RouterInfo, ttl: float = 3.0) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be > 0, got {ttl!r}")
        self.info = info
        self.key = router_key(cluster, info.router_id) if isinstance(info, RouterInfo) else \
            node_key(cluster, info.role, info.node_id)
        # etcd leases count whole seconds, and etcd raises a TTL below its minimum (1.5 election timeouts).
        self._ttl = max(1, math.ceil(ttl))
        self._granted_ttl = self._ttl
        # A call that hangs longer than this would let the lease lapse anyway: fail it and retry.
        self._client = etcd_client(etcd_url, timeout=max(1.0, ttl / 2))
        self._lease_id: int | None = None
        self._dirty = False  # self.info not yet in etcd (an update_load failed): the keep-alive re-puts it
        self._lock = asyncio.Lock()  # one of grant+put / put / refresh at a time, so a lease is granted once
        self._task: asyncio.Task | None = None
        self._closed = False

    @classmethod
    async def register(cls, etcd_url: str, cluster: str, info: NodeInfo | RouterInfo,
                       ttl: float = 3.0) -> NodeRegistration:
        reg = cls(etcd_url, cluster, info, ttl)
        try:
            async with reg._lock:
                await reg._grant_and_put()
        except BaseException:
            await close_quietly(reg._client)
            raise
        reg._task = asyncio.get_running_loop().create_task(reg._keep_alive(), name=f"lease:{reg.key}")
        return reg

    @property
    def lease_id(self) -> int | None:
        return self._lease_id

    @property
    def ttl(self) -> int:
        """The TTL etcd granted, in seconds."""
        return self._granted_ttl

    async def update_load(
        self, *, free_blocks: int | None = None, running: int | None = None, waiting: int | None = None,
        capacity: int | None = None, queued_tokens: int | None = None,
    ) -> None:
        """Publish new load figures (same key, same lease).

        Raises aetcd.ClientError if etcd cannot be reached; the figures are kept and the keep-alive task
        publishes them once it can, so a periodic reporter may log the error and go on.
        """
        if self._closed:
            raise RuntimeError("registration is closed")
        new = {k: v for k, v in (("free_blocks", free_blocks), ("running", running), ("waiting", waiting),
                                 ("capacity", capacity), ("queued_tokens", queued_tokens)) if v is not None}
        info = NodeInfo(**{**asdict(self.info), **new})  # validates before anything is sent
        async with self._lock:
            self.info = info
            self._dirty = True
            if self._lease_id is None:  # the keep-alive task lost it and has not re-granted yet
                await self._grant_and_put()
                return
            try:
                await self._client.put(self.key.encode(), info.to_json(), lease=self._lease_id)
                self._dirty = False
            except aetcd.ClientError as e:
                if not _lease_not_found(e):
                    raise
                await self._grant_and_put()

    async def close(self) -> None:
        """Revoke the lease so the node disappears at once. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._lease_id is not None:
            try:
                await self._client.revoke_lease(self._lease_id)
            except Exception as e:  # etcd unreachable: the lease runs out on its own within the TTL
                log.warning("could not revoke lease of %s: %s", self.key, e)
            self._lease_id = None
        await close_quietly(self._client)

    async def __aenter__(self) -> NodeRegistration:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _grant_and_put(self) -> None:
        self._lease_id = None
        lease = await self._client.lease(self._ttl)
        self._lease_id, self._granted_ttl = lease.id, lease.ttl
        # If the put fails the lease lives on without the key: the keep-alive sees `_dirty` and puts it.
        self._dirty = True
        await self._client.put(self.key.encode(), self.info.to_json(), lease=lease.id)
        self._dirty = False

    async def _keep_alive(self) -> None:
        retry, failures = 0.05, 0
        while True:
            interval = self._granted_ttl / 3
            try:
                async with self._lock:
                    if self._lease_id is None:
                        await self._grant_and_put()
                        log.info("re-registered %s under a new lease", self.key)
                    else:
                        reply = await self._client.refresh_lease(self._lease_id)
                        if reply is None or reply.TTL <= 0:
                            # The lease expired (we were paused or cut off longer than the TTL) or etcd lost
                            # it: the key is gone, so register again.
                            log.warning("lease of %s expired; re-registering", self.key)
                            await self._grant_and_put()
                        elif self._dirty:
                            await self._client.put(self.key.encode(), self.info.to_json(), lease=self._lease_id)
                            self._dirty = False
                if failures:
                    log.info("lease refresh of %s works again after %d failures", self.key, failures)
                retry, failures = 0.05, 0
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # etcd unreachable or slow. The lease may well be alive there still: try again soon rather
                # than after a full interval, so a short outage does not cost the registration.
                failures += 1
                log.log(logging.WARNING if failures == 1 else logging.DEBUG,
                        "lease refresh of %s failed: %s", self.key, e)
                interval = min(retry, interval)
                retry = min(retry * 2, 1.0)
            await asyncio.sleep(interval)


# -- the router's side ---------------------------------------------------------------------------------
class PrefixFollower:
    """A live local copy of what etcd holds under one prefix: one range read (`_load`), then a watch from the
    revision after it, each change handed to `_event`. aetcd's watch ends when the connection drops; the copy
    reconnects and resumes from the last revision it applied + 1, or reads everything again if that revision
    was compacted away or the store was replaced. Subclasses keep the copy in their own form; both hooks run
    under the copy's condition, and every change is counted in `version`."""

    def __init__(self, etcd_url: str, prefix: str, *, rpc_timeout: float = 5.0) -> None:
        self._url = etcd_url
        self._prefix = prefix
        self._rpc_timeout = rpc_timeout
        self._revision = 0  # the store revision our copy reflects
        self._cluster_id = 0  # etcd's, to notice a different store behind the same URL
        self._version = 0  # bumped on every change to the copy
        self._connected = False
        self._changed = asyncio.Condition()
        self._task: asyncio.Task | None = None

    def _load(self, kvs) -> None:
        """Replaces the copy with `kvs` (every key under the prefix)."""
        raise NotImplementedError

    def _event(self, event: aetcd.Event) -> None:
        """Applies one change to the copy."""
        raise NotImplementedError

    async def _follow(self) -> None:
        """Reads the current copy (raises if etcd is unreachable), then follows changes in the background."""
        client = etcd_client(self._url, self._rpc_timeout)
        try:
            await self._resync(client)
        except BaseException:
            await close_quietly(client)
            raise
        self._task = asyncio.get_running_loop().create_task(self._run(client), name=f"watch:{self._prefix}")

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def version(self) -> int:
        """Counts changes to the copy: `wait_for(lambda: w.version > v, ...)` waits for the next one."""
        return self._version

    @property
    def connected(self) -> bool:
        """True while a watch is established (the copy is current, not just last known)."""
        return self._connected

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Return once `predicate()` holds (checked now and after every change); TimeoutError after `timeout` s."""
        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(predicate)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _run(self, client: aetcd.Client) -> None:
        backoff, failures = 0.05, 0
        resync = False
        reconnected = False  # the first watch follows start()'s read directly: nothing to check
        while True:
            try:
                if resync:
                    await self._resync(client)
                    resync = False
                elif reconnected:
                    # Resuming from our revision is only right against the same store: one that was wiped or
                    # replaced behind the same URL has another cluster id, or an older revision.
                    probe = await client.get_prefix(self._prefix.encode(), keys_only=True)
                    if probe.header.cluster_id != self._cluster_id or probe.header.revision < self._revision:
                        await self._resync(client)
                watch = await client.watch_prefix(self._prefix.encode(), start_revision=self._revision + 1)
                await self._set_connected(True)
                if failures:
                    log.info("etcd watch on %s resumed at revision %d", self._prefix, self._revision + 1)
                backoff, failures = 0.05, 0
                async for event in watch:
                    await self._apply(event)
                failures += 1
                log.warning("etcd watch on %s ended; reconnecting", self._prefix)
            except asyncio.CancelledError:
                await close_quietly(client)
                raise
            except aetcd.RevisionCompactedError as e:
                log.warning("watch revision %d compacted (now %d); re-reading %s",
                            self._revision + 1, e.compacted_revision, self._prefix)
                resync = True
            except Exception as e:
                failures += 1  # say it once per outage, not on every retry
                log.log(logging.WARNING if failures == 1 else logging.DEBUG,
                        "etcd watch on %s failed (%s: %s); reconnecting", self._prefix, type(e).__name__, e)
            await self._set_connected(False)
            # A fresh client: aetcd's watcher does not always recover on the channel that failed.
            await close_quietly(client)
            await asyncio.sleep(backoff)  # pacing retries while etcd is down, not synchronisation
            backoff = min(backoff * 2, 1.0)
            client = etcd_client(self._url, self._rpc_timeout)
            reconnected = True

    async def _resync(self, client: aetcd.Client) -> None:
        result = await client.get_prefix(self._prefix.encode())
        async with self._changed:
            self._load(result)
            self._revision = result.header.revision
            self._cluster_id = result.header.cluster_id
            self._version += 1
            self._changed.notify_all()

    async def _apply(self, event: aetcd.Event) -> None:
        async with self._changed:
            self._event(event)
            self._revision = event.kv.mod_revision
            self._version += 1
            self._changed.notify_all()

    async def _set_connected(self, value: bool) -> None:
        if self._connected != value:
            async with self._changed:
                self._connected = value
                self._changed.notify_all()


class MembershipWatcher(PrefixFollower):
    """A live local copy of the cluster's nodes. `w = await MembershipWatcher.start(url, cluster)`."""

    def __init__(self, etcd_url: str, cluster: str, *, rpc_timeout: float = 5.0) -> None:
        super().__init__(etcd_url, nodes_prefix(cluster), rpc_timeout=rpc_timeout)
        self._by_role: dict[str, dict[str, NodeInfo]] = {r: {} for r in ROLES}
        # (role, node id) -> the revision that created its key: a new one each time the node registers anew.
        self._created: dict[tuple[str, str], int] = {}

    @classmethod
    async def start(cls, etcd_url: str, cluster: str, *, rpc_timeout: float = 5.0) -> MembershipWatcher:
        """Read the current nodes (raises if etcd is unreachable), then follow changes in the background."""
        w = cls(etcd_url, cluster, rpc_timeout=rpc_timeout)
        await w._follow()
        return w

    # -- reading the copy (no I/O) ------------------------------------------------------------------
    def nodes(self, role: str | None = None) -> list[NodeInfo]:
        """Live nodes of `role` (all roles if None), by node id. Treat them as read-only snapshots."""
        if role is not None and role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        roles = ROLES if role is None else (role,)
        return sorted((n for r in roles for n in self._by_role[r].values()), key=lambda n: (n.node_id, n.role))

    def get(self, node_id: str) -> NodeInfo | None:
        for by_id in self._by_role.values():
            if node_id in by_id:
                return by_id[node_id]
        return None

    def registration(self, node: NodeInfo) -> int | None:
        """Which registration of the node is live: the etcd revision that created its key (a node that
        restarted, or lost its lease and registered again, has another), None while it is not live."""
        return self._created.get((node.role, node.node_id))

    # -- keeping it current -------------------------------------------------------------------------
    def _load(self, kvs) -> None:
        by_role: dict[str, dict[str, NodeInfo]] = {r: {} for r in ROLES}
        created: dict[tuple[str, str], int] = {}
        for kv in kvs:
            parsed = self._parse(kv.key, kv.value)
            if parsed is not None:
                by_role[parsed.role][parsed.node_id] = parsed
                created[parsed.role, parsed.node_id] = kv.create_revision
        self._by_role, self._created = by_role, created

    def _event(self, event: aetcd.Event) -> None:
        if event.kind == aetcd.EventKind.PUT:
            info = self._parse(event.kv.key, event.kv.value)
            if info is not None:
                self._by_role[info.role][info.node_id] = info
                self._created[info.role, info.node_id] = event.kv.create_revision
        else:
            where = self._split_key(event.kv.key)
            if where is not None:
                self._by_role[where[0]].pop(where[1], None)
                self._created.pop(where, None)

    def _split_key(self, key: bytes) -> tuple[str, str] | None:
        rest = key.decode(errors="replace").removeprefix(self._prefix)
        role, _, node_id = rest.partition("/")
        if role not in ROLES or not node_id or "/" in node_id:
            return None
        return role, node_id

    def _parse(self, key: bytes, value: bytes) -> NodeInfo | None:
        # One malformed entry (another version of Baton, a hand-made key) must not stop the watcher.
        where = self._split_key(key)
        if where is None:
            log.warning("ignoring unexpected key %r", key)
            return None
        try:
            info = NodeInfo.from_json(value)
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            log.warning("ignoring malformed node %r: %s", key, e)
            return None
        if (info.role, info.node_id) != where:
            log.warning("ignoring node %r whose value says role=%r node_id=%r", key, info.role, info.node_id)
            return None
        return info
