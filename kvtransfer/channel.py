"""Pair channels between a prefill node and a decode node: 2-rank torch.distributed groups built on demand.

No global process group exists anywhere (no `init_process_group`): each (prefill node, decode node) pair gets its
own `ProcessGroupGloo` (pool on CPU) or `ProcessGroupNCCL` (pool on CUDA) groups, rendezvousing through a
`TCPStore` that the decode node hosts (`KVStoreHost`), each under the prefix
`kv/{prefill_id}/{decode_id}/{generation}/{lane}`. The prefill node is rank 0, the decode node rank 1.

Lanes: a pair has up to `LANES_PER_PAIR` groups per generation, each built on its first use, and a lane carries
one transfer at a time, taken in the same order by both sides (the prefill node hands lanes out, `DecodePeers`,
and tells the decode node which one with each ReceiveKV). Every message goes under tag 0: NCCL ignores the tag
of send/recv, so tags cannot keep concurrent transfers on one group apart, and messages on one group are matched
in the order they were posted. Concurrent transfers therefore use different lanes; a lane is taken again only
once the decode node has answered its previous transfer (all its recvs were posted and matched). Both sides
build a generation's lanes in order, 0 first (see `PairChannels.get`: a store client does one thing at a time).

Generations: the prefill node chooses the generation (from the decode node's store counter,
`PairChannels.next_generation`: a restarted prefill process never reuses one, and a restarted decode node's new
store counts on from above its old one's); after a failure on a generation both sides drop that generation,
every lane of it (never a newer one), and the next transfer uses a newer generation (a newer generation arriving
at the decode node drops its older groups for that peer). A dropped generation is never built again; the decode
side deletes its rendezvous keys, so the store does not grow with failures.

A gloo group's connections close only when its last Python reference goes (`abort()`/`shutdown()` leave them
open), and only then do the peer's pending operations fail: keep references to groups short-lived.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

PREFILL_RANK = 0
DECODE_RANK = 1
LANES_PER_PAIR = 8  # groups per (pair, generation): at most this many transfers in flight between two nodes
WIRE_TAG = 0  # every message's tag: NCCL ignores tags, so nothing may depend on them
GENERATION_KEY = "kv/next-generation"  # in the decode node's store: one counter for all its pairs
# What a gloo group's rendezvous leaves under its prefix (one address per rank, measured on torch 2.13; a
# test counts the store's keys, so a torch that names them otherwise is noticed).
_RENDEZVOUS_KEYS = ("0/0", "0/1")
# Set by the prefill side as it starts to join a pair group: until it is there, the decode side waits in slices
# and can give the set-up up when its transfer is abandoned (the prefill node died before joining).
_JOINING = "joining"
_JOIN_POLL_S = 0.02
_PROBE_S = 5.0  # a connect to a live store's host answers within this even on a loaded machine


class KVTransferError(RuntimeError):
    """A KV transfer or pair channel failed (peer gone, timeout, mismatched sizes, stale generation)."""


class TransferCancelled(Exception):
    """The sender ended the transfer before it began (a cancel header): the channel is fine, the request is
    over. Not a KVTransferError, so that nobody drops a healthy channel for it."""


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(float(seconds), 0.001))


def split_address(address: str) -> tuple[str, int]:
    """`"host:port"` (or `"[v6]:port"`) -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"store address must be 'host:port', got {address!r}")
    return host.strip("[]"), int(port)


def join_address(host: str, port: int | str) -> str:
    """(host, port) -> `"host:port"`, an IPv6 host in brackets (`split_address` reads either)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def pair_prefix(prefill_id: str, decode_id: str, generation: int | str, lane: int | str = 0,
                secret: str = "") -> str:
    """Where a pair group rendezvouses in the decode node's store. With the cluster's member secret (a closed
    cluster) the pair's part is an HMAC of it: the store has no authentication of its own, and a caller that
    can reach its port but holds no secret cannot tell which keys to read or forge."""
    pair = f"{prefill_id}/{decode_id}/{generation}"
    if secret:
        pair = hmac.new(secret.encode(), pair.encode(), hashlib.sha256).hexdigest()[:32]
    return f"kv/{pair}/{lane}"


def check_lane(lane: int) -> int:
    """`lane` if it is one of a pair's lanes, else ValueError naming `lane`."""
    if not 0 <= lane < LANES_PER_PAIR:
        raise ValueError(f"lane: must be in [0, {LANES_PER_PAIR}), got {lane}")
    return lane


class KVStoreHost:
    """The decode node's rendezvous store: a `TCPStore` master that prefill nodes connect to as clients.

    `port=0` picks a free port; `.address` ("host:port") is what the decode node publishes. `advertise_host`
    is the name to publish when `host` is a wildcard such as "0.0.0.0". The store lives while anything holds
    it (a `PairChannels` given it as `local_store` does): close both.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, timeout: float = 30.0,
                 advertise_host: str | None = None) -> None:
        self.store = dist.TCPStore(host, port, None, True, _timedelta(timeout), wait_for_workers=False)
        # Generations count on from the store's birth in microseconds: a decode node restarted under the same
        # id (a new store) hands out generations above every one its previous life did, so the prefill nodes
        # that still remember those never take a fresh one for stale.
        self.store.add(GENERATION_KEY, time.time_ns() // 1000)
        self.host = advertise_host or host
        self.port = int(self.store.port)
        self.address = join_address(self.host, self.port)

    def close(self) -> None:
        # A TCPStore has no close(): the listening socket goes with the last reference.
        self.store = None  # type: ignore[assignment]

    def __enter__(self) -> KVStoreHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _release(groups: list) -> None:
    """Lets go of dropped groups on a short-lived thread: destroying a gloo group takes ~10 ms (in C++, without
    the GIL), which neither the caller nor the lock should wait for. A group still held by a transfer lives on
    until that transfer lets go of it (then its destruction costs that thread the ~10 ms)."""
    if groups:
        threading.Thread(target=groups.clear, name="kv-group-release", daemon=True).start()


@dataclass
class _Pending:
    """A value being created by one thread while others wait for it (creation blocks: no lock held). It
    stands in the table under the value's key until `settle` puts the value there (or takes it out)."""

    done: threading.Event = field(default_factory=threading.Event)
    value: object = None
    error: BaseException | None = None

    @staticmethod
    def claim(table: dict, key) -> tuple[object, bool]:
        """(the value, False) if `key` is ready; (its _Pending, False) if another thread is creating it;
        (a new _Pending, True) if the caller must create it. Call with the table's lock held."""
        entry = table.get(key)
        if entry is None:
            entry = table[key] = _Pending()
            return entry, True
        return entry, False

    def wait(self, timeout: float, what: str) -> object:
        if not self.done.wait(timeout):
            raise KVTransferError(f"timed out after {timeout:.1f}s waiting for {what}")
        if self.error is not None:
            raise KVTransferError(f"{what} failed: {self.error}") from self.error
        return self.value

    def settle(self, table: dict, key, lock: threading.Lock, value: object = None,
               error: BaseException | None = None, what: str = "it") -> BaseException | None:
        """Publishes the outcome and wakes the waiters: the value replaces this entry in `table`, an error
        removes it. An entry already taken out (dropped or closed meanwhile) becomes an error: returned."""
        with lock:
            present = table.get(key) is self
            if present and error is None:
                table[key] = value
            elif present:
                del table[key]
        if not present and error is None:
            error = KVTransferError(f"{what} was dropped while it was being made")
        self.value, self.error = (value, None) if error is None else (None, error)
        self.done.set()
        return error


def _await_peer(store, timeout: float, abandoned: Callable[[], bool] | None, peer_id: str) -> float:
    """Waits (checking, never blocking in the store: a timed-out wait would leave its answer on the
    connection) until the prefill side starts to join; returns what is left of `timeout`."""
    deadline = time.monotonic() + timeout
    while not store.check([_JOINING]):
        if abandoned is not None and abandoned():
            raise KVTransferError(f"the transfer was abandoned before {peer_id!r} joined the pair group")
        if time.monotonic() >= deadline:
            raise KVTransferError(f"timed out after {timeout:.1f}s waiting for {peer_id!r} to join the pair group")
        time.sleep(_JOIN_POLL_S)  # pacing the check: the store has no wait that can be given up
    return max(0.001, deadline - time.monotonic())


class PairChannels:
    """One per node: the pair groups this node holds, keyed by (peer node id, generation, lane), one live
    generation per peer (its lanes built as they are first used).

    `device` is where this node's KV pool lives: "cpu" gives gloo groups, "cuda[:i]" NCCL groups.
    `local_store` (the decode node's own `KVStoreHost`) is used for its own address instead of a client.
    Thread-safe: `get` blocks in the group's rendezvous (run it on a worker thread) without holding the lock.
    """

    def __init__(self, node_id: str, device: str | torch.device = "cpu", *,
                 local_store: KVStoreHost | None = None, gloo_hostname: str | None = None, secret: str = "") -> None:
        """`secret`: the cluster's member token, which names the rendezvous keys (`pair_prefix`)."""
        self.node_id = node_id
        self._secret = secret
        self.device = torch.device(device)
        self._gloo_hostname = gloo_hostname
        self._gloo_device = None  # one gloo device (listener + I/O thread) for all of this node's groups
        self._lock = threading.Lock()
        self._stores: dict[str, object] = {}  # address -> TCPStore client (or _Pending while connecting)
        self._local_address = local_store.address if local_store is not None else None
        if local_store is not None:
            self._stores[local_store.address] = local_store.store
        self._groups: dict[tuple[str, int, int], object] = {}  # (peer, generation, lane) -> group (or _Pending)
        self._generation: dict[str, int] = {}  # peer -> newest generation asked for
        self._retired: dict[str, int] = {}  # peer -> newest generation dropped
        self._last_used: dict[str, float] = {}  # peer -> time.monotonic() of its last `get`
        self._closed = False

    # -- groups ---------------------------------------------------------------------------------------

    def get(self, peer_id: str, generation: int, store_address: str, rank: int, timeout: float, lane: int = 0,
            abandoned: Callable[[], bool] | None = None):
        """The group for (peer, generation, lane): reused if it exists, else created (blocks until the peer
        joins, at most `timeout` seconds). Drops this node's older generations for that peer, every lane of
        them. Raises `KVTransferError` on timeout, on a generation older than one already used, or on a closed
        object; ValueError for a lane out of range.

        A generation's lanes are built in order, one at a time, on both sides: lane k only once lanes 0..k-1
        are there (building them first if need be). A `TCPStore` client does one operation at a time, and a
        rendezvous blocks in it until the peer's key comes: with two lanes of one pair built at once, each
        side could wait for the other's key of one lane while its own key of the other lane waits behind.

        `abandoned` (decode side): polled while the peer has not started to join; once true, the set-up fails
        at once instead of at `timeout` (the transfer's caller went away: a prefill node that died before
        joining would otherwise hold the reservation it was to fill for the whole timeout)."""
        if rank not in (PREFILL_RANK, DECODE_RANK):
            raise ValueError(f"rank must be {PREFILL_RANK} (prefill) or {DECODE_RANK} (decode), got {rank}")
        check_lane(lane)
        deadline = time.monotonic() + timeout
        for below in range(lane):
            self._get(peer_id, generation, store_address, rank, deadline - time.monotonic(), below, abandoned)
        return self._get(peer_id, generation, store_address, rank, deadline - time.monotonic(), lane, abandoned)

    def _get(self, peer_id: str, generation: int, store_address: str, rank: int, timeout: float, lane: int,
             abandoned: Callable[[], bool] | None = None):
        key = (peer_id, generation, lane)
        with self._lock:
            self._last_used[peer_id] = time.monotonic()
            if self._closed:
                raise KVTransferError("pair channels are closed")
            newest = self._generation.get(peer_id, -1)
            if generation < newest or generation <= self._retired.get(peer_id, -1):
                raise KVTransferError(f"stale generation {generation} for peer {peer_id!r} (newest {newest}, "
                                      f"dropped up to {self._retired.get(peer_id)})")
            stale, superseded = [], []
            if generation > newest:
                self._generation[peer_id] = generation
                superseded = [k for k in self._groups if k[0] == peer_id and k[1] < generation]
                stale = [self._groups.pop(k) for k in superseded]
            entry, creator = _Pending.claim(self._groups, key)
        self._delete_rendezvous(peer_id, {k[1] for k in superseded})
        if not isinstance(entry, _Pending):
            return entry
        if not creator:
            _release(stale)
            return entry.wait(timeout, f"the pair group with {peer_id!r}")
        store = None
        # The decode side rendezvouses over a connection of its own per peer: a store client does one operation
        # at a time, and a rendezvous waits in it for the peer's key, so with one shared connection a peer that
        # died before joining would hold every other peer's set-up until its timeout.
        store_key = f"{store_address}|{peer_id}" if rank == DECODE_RANK else store_address
        try:
            store = self._store(store_key, timeout)
            prefill_id, decode_id = (self.node_id, peer_id) if rank == PREFILL_RANK else (peer_id, self.node_id)
            prefixed = dist.PrefixStore(pair_prefix(prefill_id, decode_id, generation, lane, self._secret), store)
            if rank == PREFILL_RANK:
                prefixed.set(_JOINING, b"1")
            else:
                timeout = _await_peer(prefixed, timeout, abandoned, peer_id)
            group = self._make_group(prefixed, rank, timeout)
        except BaseException as exc:
            _release(stale)
            entry.settle(self._groups, key, self._lock, error=exc)
            # A broken store connection (the decode node restarted) is rebuilt on the next call.
            if store is not None:
                self._forget_store(store_key, store)
            if isinstance(exc, KVTransferError):
                raise
            raise KVTransferError(f"cannot build the pair group with {peer_id!r} (generation {generation}, "
                                  f"lane {lane}): {exc}") from exc
        # Older generations go only now: destroying a group on the shared gloo device while another connects
        # through it makes the connection wait for the destruction (~10 ms).
        _release(stale)
        # Dropped (or superseded by a newer generation, or closed) while it was being built: an error.
        dropped = entry.settle(self._groups, key, self._lock, value=group,
                               what=f"the pair group with {peer_id!r} generation {generation} lane {lane}")
        if dropped is not None:
            raise dropped
        return group

    def next_generation(self, peer_id: str, store_address: str, timeout: float) -> int:
        """A generation never used before on the decode node's store (prefill side: for the first transfer to
        a decode node and after every failure). Counted by that store, so a prefill process that restarts
        does not reuse a generation whose rendezvous keys are still there, and a restarted decode node
        (a new store) counts on from above its previous life's generations."""
        store = self._store(store_address, timeout)
        try:
            return int(store.add(GENERATION_KEY, 1))
        except Exception as exc:
            self._forget_store(store_address, store)  # the next call connects afresh (a restarted peer)
            raise KVTransferError(f"cannot reach the KV store at {store_address}: {exc}") from exc

    def drop(self, peer_id: str, generation: int | None = None) -> None:
        """Forgets the groups (every lane) of `generation` with `peer_id` and of any older one (after a failure
        on it); None drops them all. A newer generation, already in use by other transfers, is kept: a late
        failure of an old generation must not take down the pair's current channel. A gloo group closes its connections,
        failing the peer's pending operations at once, when its last reference goes (`abort()`/`shutdown()`
        do not close them): transfers still holding it keep it open until they end. A dropped generation is
        never built again."""
        with self._lock:
            names = self._ranks_of(peer_id)
            dropped = []
            for name in names:
                newest = self._generation.get(name, -1)
                upto = newest if generation is None else generation
                self._retired[name] = max(self._retired.get(name, -1), upto)
                dropped += [(k, self._groups.pop(k)) for k in list(self._groups) if k[0] == name and k[1] <= upto]
        for name in names:
            self._delete_rendezvous(name, {k[1] for k, _ in dropped if k[0] == name})
        _release([g for _, g in dropped])

    def _ranks_of(self, peer_id: str) -> list[str]:
        """The peer and, if it is a node, its other ranks' names (`ranks.rank_name`: "node/rank"), as far as
        this node holds anything for them: a node's failure or departure is every one of its ranks'."""
        known = {k[0] for k in self._groups} | set(self._generation) | set(self._retired) | set(self._last_used)
        return [peer_id, *sorted(n for n in known if n.startswith(peer_id + "/"))]

    def forget(self, peer_id: str, store_address: str | None = None) -> None:
        """Lets go of everything held for a peer that left: its groups, what it knew of its generations and
        (prefill side) the connection to its store. State for peers that come and go stays bounded."""
        self.drop(peer_id)
        box = []
        with self._lock:
            names = self._ranks_of(peer_id)
            for name in names:
                self._generation.pop(name, None)
                self._retired.pop(name, None)
                self._last_used.pop(name, None)
            keys = [k for k in self._stores if k.partition("|")[2] in names]  # the decode side's, per peer
            if store_address and store_address != self._local_address:
                keys.append(store_address)
            for key in keys:
                if not isinstance(self._stores.get(key), _Pending):
                    box.append(self._stores.pop(key, None))
        # Closing a TCPStore client takes ~100 ms: on a short-lived thread, not the caller's (an event loop).
        _release(box)

    def prune(self, idle_seconds: float) -> None:
        """Forgets peers not used for `idle_seconds` (nodes that left without a failure to learn it from)."""
        cutoff = time.monotonic() - idle_seconds
        with self._lock:
            idle = [peer for peer, at in self._last_used.items() if at < cutoff]
            known = {k[0] for k in self._groups} | set(self._generation) | set(self._retired)
            idle += [peer for peer in known if peer not in self._last_used]
        for peer in idle:
            self.forget(peer)

    def peers(self) -> int:
        """How many peer nodes this node holds any state for (groups or generation records; a node's ranks
        count as one)."""
        with self._lock:
            names = {k[0] for k in self._groups} | set(self._generation) | set(self._retired)
        return len({name.partition("/")[0] for name in names})

    def generation(self, peer_id: str) -> int | None:
        """The newest generation asked for with `peer_id`, None if none."""
        with self._lock:
            return self._generation.get(peer_id)

    def lanes(self, peer_id: str, generation: int) -> list[int]:
        """The lanes of (peer, generation) whose group is built or being built."""
        with self._lock:
            return sorted(k[2] for k in self._groups if k[0] == peer_id and k[1] == generation)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            groups = list(self._groups.values())  # cleared in place: a group being built finds its entry gone
            self._groups.clear()
            self._stores.clear()
            self._gloo_device = None
        groups.clear()

    # -- internals ------------------------------------------------------------------------------------

    def _forget_store(self, address: str, store) -> None:
        if address == self._local_address:
            return
        with self._lock:
            if self._stores.get(address) is store:
                del self._stores[address]

    def _delete_rendezvous(self, peer_id: str, generations: set[int]) -> None:
        """Decode side (the store's owner): a generation that will never be built again needs its rendezvous
        keys no more, on any lane (one the prefill node built alone has its key there too); deleting them
        keeps the store from growing with every dropped channel."""
        if self._local_address is None or not generations:
            return
        with self._lock:
            store = self._stores.get(self._local_address)
        if store is None:
            return
        for generation in sorted(generations):
            for lane in range(LANES_PER_PAIR):
                prefix = pair_prefix(peer_id, self.node_id, generation, lane, self._secret)
                for key in (*_RENDEZVOUS_KEYS, _JOINING):
                    try:
                        store.delete_key(f"{prefix}/{key}")
                    except Exception:  # noqa: BLE001 - a key that is not there is fine
                        pass

    def _store(self, key: str, timeout: float):
        """A client of the store at `key` ("host:port", or "host:port|peer": the decode side's own connection
        for that peer). Connections are kept: torch 2.13's TCPStore client stalls 5 s on every 25th
        connection a process makes (measured here, any store), so one per key, made again only after a
        failure or once its peer is forgotten."""
        address = key.partition("|")[0]
        with self._lock:
            entry, creator = _Pending.claim(self._stores, key)
        if not isinstance(entry, _Pending):
            return entry
        if not creator:
            return entry.wait(timeout, f"the connection to the KV store at {address}")
        try:
            host, port = split_address(address)
            # A TCPStore client retries a refused connection until its timeout: a store whose node died (it is
            # still in the membership until its lease ends) would cost every transfer to it that long. A plain
            # connect says at once whether anything listens there.
            socket.create_connection((host, port), timeout=max(0.1, min(timeout, _PROBE_S))).close()
            store = dist.TCPStore(host, port, None, False, _timedelta(timeout), wait_for_workers=False)
        except BaseException as exc:
            entry.settle(self._stores, key, self._lock, error=exc)
            raise KVTransferError(f"cannot connect to the KV store at {address}: {exc}") from exc
        closed = entry.settle(self._stores, key, self._lock, value=store,
                              what=f"the connection to the KV store at {address}")
        if closed is not None:
            raise closed
        return store

    def _device(self):
        """This node's gloo device, shared by all its groups: one listening socket and one I/O thread for the
        node instead of one per group. With a device per group, quick drop-and-re-create cycles failed now and
        then in the rendezvous ("Gloo connectFullMesh failed ... Connection closed by peer", 3 of ~550
        re-creations on a 2-core VM; none in ~1000 with one shared device): probably a late connection for a
        closed group's port, which a new device's listener may reuse, while one device numbers its pairs
        without reusing a number."""
        with self._lock:
            if self._gloo_device is None:
                if self._gloo_hostname:
                    self._gloo_device = dist.ProcessGroupGloo.create_device(hostname=self._gloo_hostname)
                else:
                    self._gloo_device = dist.ProcessGroupGloo.create_default_device()
            return self._gloo_device

    def _make_group(self, store, rank: int, timeout: float):
        if self.device.type == "cpu":
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = _timedelta(timeout)
            opts._devices = [self._device()]
            opts._threads = 1  # point-to-point only: gloo runs send/recv without its worker threads
            return dist.ProcessGroupGloo(store, rank, 2, opts)
        if self.device.type == "cuda":
            nccl = getattr(dist, "ProcessGroupNCCL", None)
            if nccl is None:
                raise KVTransferError("this torch build has no NCCL")
            opts = nccl.Options()
            opts._timeout = _timedelta(timeout)
            group = nccl(store, rank, 2, opts)
            # NCCL builds its point-to-point communicator lazily, on the first send/recv, blocking until the
            # peer joins: do it here (on the caller's worker thread), not in the engine thread's first send.
            with torch.cuda.device(self.device):
                probe = torch.zeros(1, device=self.device)
                if rank == PREFILL_RANK:
                    work = group.send([probe], 1 - rank, WIRE_TAG)
                else:
                    work = group.recv([probe], 1 - rank, WIRE_TAG)
                work.wait(_timedelta(timeout))
            return group
        raise KVTransferError(f"no pair channel backend for device {self.device}")


class TransferThreads:
    """Worker threads for a node's blocking transfer calls (channel set-up, receives, waits on sends).

    Not asyncio's default executor: it has a handful of threads (cores + 4), and every in-flight transfer
    holds one for as long as its peer takes. With more transfers in flight than threads, receives that could
    complete wait behind ones whose sender is still queued, while their own senders wait for them: each side
    then times out and the channel breaks. A thread per transfer in flight, up to `max_threads`, avoids it
    (they wait in C++ without the GIL)."""

    def __init__(self, name: str, max_threads: int = 512, thread_setup: Callable[[], object] | None = None) -> None:
        """`thread_setup` runs first on each thread (a node passes the engine's `omp.serial_torch`: its OpenMP
        team stays the engine thread's)."""
        self._pool = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix=name, initializer=thread_setup)

    def run(self, fn, *args):
        """An asyncio future for `fn(*args)` on a worker thread."""
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
