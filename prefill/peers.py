"""The decode nodes a prefill node sends to, and what it keeps for each: one owner for that state.

Per decode node: a gRPC channel (for ReceiveKV), the pair channel's current generation, its free lanes, and
how many transfers use them now. Nothing else on the prefill node holds per-peer state, so it stays bounded
however many decode nodes come and go: a peer whose transfer failed is forgotten once its last transfer ends
(its next request opens everything afresh, as after a restart), and a peer unused for `idle_seconds` is
forgotten when the next transfer starts (a node that left the cluster sends no failure to learn from).

Lanes (see `kvtransfer.channel`): each transfer gets a lane of the generation that no other transfer holds, and
waits while all are taken. A lane comes back only through `release` on a generation that did not fail, which
the caller does once the decode node has answered the transfer's ReceiveKV (its side is over: every message
of the transfer was matched). A transfer that ended any other way marks its generation `failed`, so its lanes
are never used again: a lane whose receiver may not have posted all its recvs would hand the next transfer's
receiver the previous transfer's messages (NCCL can complete small sends before the recvs are posted).

    peer:  (unknown) ──a transfer starts──▶ OPEN ──a transfer fails──▶ FAILED ──its last one ends──▶ (forgotten)
                                             └──unused idle_seconds, seen as the next transfer starts──▶ (forgotten)
    lane:  FREE ──acquire──▶ HELD ──release, generation good──▶ FREE
                               └──the generation failed──▶ RETIRED (with its generation: never used again)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch

from baton.common.members import MemberStub, node_channel
from baton.common.messages import NODE_CHANNEL_OPTIONS
from baton.kvtransfer.channel import LANES_PER_PAIR, KVTransferError, PairChannels, TransferThreads
from baton.kvtransfer.shared import SharedPool, open_shared
from baton.v1 import node_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class DecodePeer:
    node_id: str
    address: str  # gRPC host:port
    store_address: str  # its KV rendezvous store
    channel: grpc.aio.Channel
    stub: node_pb2_grpc.DecodeNodeStub
    last_used: float
    generation: int | None = None  # None: the next transfer asks the store for a new one
    free_lanes: list[int] = field(default_factory=list)  # lanes of `generation` that no transfer holds
    waiters: deque = field(default_factory=deque)  # futures of transfers waiting for a lane, oldest first
    active: int = 0  # transfers using this entry now (holding a lane or waiting for one)
    broken: bool = False  # a transfer failed: forget the entry once the last one ends
    unreachable: bool = False  # its KV store could not be reached: the entry's waiting transfers fail at once
    # The same-device path: per decode rank, (what was mapped, that rank's storage mapped here).
    mapped: dict[int, tuple] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one generation request at a time


class DecodePeers:
    def __init__(self, channels: PairChannels, threads: TransferThreads, idle_seconds: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, lanes: int = LANES_PER_PAIR,
                 member_token: str | None = None, credentials=None) -> None:
        """`member_token`: carried by every call to a decode node, in a closed cluster (common/members.py);
        `credentials`: its calls go over mutual TLS with them (common/tls.py)."""
        if not 0 < lanes <= LANES_PER_PAIR:
            raise ValueError(f"lanes: must be in [1, {LANES_PER_PAIR}], got {lanes}")
        self.channels = channels
        self.threads = threads
        self.idle_seconds = idle_seconds
        self.lanes = lanes
        self.member_token = member_token
        self.credentials = credentials
        self._clock = clock
        self._peers: dict[str, DecodePeer] = {}
        self._closing: set[asyncio.Task] = set()

    def __len__(self) -> int:
        return len(self._peers)

    def get(self, node_id: str) -> DecodePeer | None:
        return self._peers.get(node_id)

    async def acquire(self, node_id: str, address: str, store_address: str,
                      timeout: float) -> tuple[DecodePeer, int, int]:
        """The peer's entry, the generation to transfer on and a lane of it that this transfer alone holds
        (waiting while every lane is held); pair it with `release`. Raises KVTransferError when the peer's
        store cannot be reached (and then holds nothing for it)."""
        peer = self.entry(node_id, address, store_address)
        try:
            woken = False
            while True:
                async with peer.lock:  # concurrent first transfers would each open a generation
                    if peer.generation is None:
                        if peer.unreachable:
                            raise KVTransferError(f"the KV store of {node_id} at {store_address} cannot be reached")
                        try:
                            generation = await self.threads.run(
                                self.channels.next_generation, node_id, store_address, timeout)
                        except BaseException:
                            # Every transfer queued behind this one fails now, not one connect timeout after
                            # another; the next request after the entry is forgotten tries afresh.
                            peer.broken = peer.unreachable = True
                            self._wake(peer, every=True)
                            raise
                        peer.generation, peer.free_lanes = generation, list(range(self.lanes))
                        log.info("kv path to %s: pair channel (%s), generation %d", node_id,
                                 "nccl" if self.channels.device.type == "cuda" else "gloo", generation)
                    if peer.free_lanes:
                        # The lowest free lane: a node that never has many transfers in flight builds few groups.
                        peer.free_lanes.sort()
                        return peer, peer.generation, peer.free_lanes.pop(0)
                    waiter = asyncio.get_running_loop().create_future()
                    if woken:  # woken, but a newcomer took the lane first: first in line again, not last
                        peer.waiters.appendleft(waiter)
                    else:
                        peer.waiters.append(waiter)
                try:
                    await waiter
                    woken = True
                except BaseException:
                    if waiter.done() and not waiter.cancelled():
                        self._wake(peer)  # woken, but cancelled before it ran: the next waiter takes the lane
                    raise
                finally:
                    if waiter in peer.waiters:
                        peer.waiters.remove(waiter)
        except BaseException:
            self.release(peer)
            raise

    def entry(self, node_id: str, address: str, store_address: str) -> DecodePeer:
        """The peer's entry (its gRPC stub), counted as in use: pair it with `release`. `acquire` adds a
        lane; the same-device path needs none."""
        self._prune()
        peer = self._peers.get(node_id)
        if peer is not None and (peer.address, peer.store_address) != (address, store_address) and not peer.active:
            self._forget(peer)  # restarted elsewhere under the same id
            peer = None
        if peer is None:
            channel = node_channel(address, NODE_CHANNEL_OPTIONS, self.credentials)
            stub = MemberStub(node_pb2_grpc.DecodeNodeStub(channel), self.member_token)
            peer = self._peers[node_id] = DecodePeer(node_id, address, store_address, channel, stub, self._clock())
        peer.active += 1
        peer.last_used = self._clock()
        return peer

    async def mapped_pool(self, peer: DecodePeer, pool: SharedPool, device, rank: int = 0) -> torch.Tensor:
        """Rank `rank` of the decode node's KV storage mapped into this process: once per entry and storage
        (a restarted decode node shares a new one)."""
        key = (pool.device_id, pool.shm_path, pool.cuda_handle, pool.storage_offset)
        known = peer.mapped.get(rank)
        if known is None or known[0] != key:
            tensor = await self.threads.run(open_shared, pool, device)
            known = peer.mapped[rank] = (key, tensor)
            if rank == 0:
                log.info("kv path to %s: shared memory on %s", peer.node_id, pool.device_id)
        return known[1]

    def failed(self, peer: DecodePeer, generation: int | None) -> None:
        """A transfer on `generation` failed, or ended without the decode node's answer: that generation goes,
        every lane of it (a newer one, if any, stays), and the entry is forgotten when its last transfer ends."""
        if generation is not None:
            self.channels.drop(peer.node_id, generation)
            if peer.generation == generation:
                peer.generation, peer.free_lanes = None, []
                self._wake(peer, every=True)  # the waiters open the next generation
        peer.broken = True

    def release(self, peer: DecodePeer, generation: int | None = None, lane: int | None = None) -> None:
        """Ends a transfer's use of the entry. Its lane (when it got one) comes back only if its generation is
        still the current one: call `failed` first when the decode node did not answer the transfer."""
        if lane is not None and generation is not None and generation == peer.generation:
            if lane not in peer.free_lanes:
                peer.free_lanes.append(lane)
                self._wake(peer)
        peer.active -= 1
        peer.last_used = self._clock()
        if peer.active == 0 and peer.broken:
            self._forget(peer)

    @staticmethod
    def _wake(peer: DecodePeer, every: bool = False) -> None:
        while peer.waiters:
            waiter = peer.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if not every:
                    return

    def _prune(self) -> None:
        now = self._clock()
        for peer in [p for p in self._peers.values() if not p.active and now - p.last_used > self.idle_seconds]:
            self._forget(peer)

    def _forget(self, peer: DecodePeer) -> None:
        if self._peers.get(peer.node_id) is peer:
            del self._peers[peer.node_id]
        self.channels.forget(peer.node_id, peer.store_address)
        task = asyncio.get_running_loop().create_task(peer.channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for peer in list(self._peers.values()):
            self._forget(peer)
        await asyncio.gather(*self._closing, return_exceptions=True)
