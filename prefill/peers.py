"""The decode nodes a prefill node sends to, and what it keeps for each: one owner for that state.

Per decode node: a gRPC channel (for ReceiveKV), the pair channel's current generation, and how many
transfers use them now. Nothing else on the prefill node holds per-peer state, so it stays bounded however
many decode nodes come and go: a peer whose transfer failed is forgotten once its last transfer ends (its next
request opens everything afresh, as after a restart), and a peer unused for `idle_seconds` is forgotten when
the next transfer starts (a node that left the cluster sends no failure to learn from).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from baton.kvtransfer.channel import PairChannels, TransferThreads
from baton.v1 import node_pb2_grpc


@dataclass(slots=True, eq=False)
class DecodePeer:
    node_id: str
    address: str  # gRPC host:port
    store_address: str  # its KV rendezvous store
    channel: grpc.aio.Channel
    stub: node_pb2_grpc.DecodeNodeStub
    last_used: float
    generation: int | None = None  # None: the next transfer asks the store for a new one
    active: int = 0  # transfers using this entry now
    broken: bool = False  # a transfer failed: forget the entry once the last one ends
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one generation request at a time


class DecodePeers:
    def __init__(self, channels: PairChannels, threads: TransferThreads, idle_seconds: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.channels = channels
        self.threads = threads
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._peers: dict[str, DecodePeer] = {}
        self._closing: set[asyncio.Task] = set()

    def __len__(self) -> int:
        return len(self._peers)

    async def acquire(self, node_id: str, address: str, store_address: str, timeout: float) -> tuple[DecodePeer, int]:
        """The peer's entry and the generation to transfer on; pair it with `release`. Raises KVTransferError
        when the peer's store cannot be reached (and then holds nothing for it)."""
        self._prune()
        peer = self._peers.get(node_id)
        if peer is not None and (peer.address, peer.store_address) != (address, store_address) and not peer.active:
            self._forget(peer)  # restarted elsewhere under the same id
            peer = None
        if peer is None:
            channel = grpc.aio.insecure_channel(address)
            peer = self._peers[node_id] = DecodePeer(node_id, address, store_address, channel,
                                                     node_pb2_grpc.DecodeNodeStub(channel), self._clock())
        peer.active += 1
        peer.last_used = self._clock()
        try:
            async with peer.lock:  # concurrent first transfers would each open a generation
                if peer.generation is None:
                    peer.generation = await self.threads.run(
                        self.channels.next_generation, node_id, store_address, timeout)
                return peer, peer.generation
        except BaseException:
            peer.broken = True
            self.release(peer)
            raise

    def failed(self, peer: DecodePeer, generation: int | None) -> None:
        """A transfer on `generation` failed: that generation goes (a newer one, if any, stays), and the entry
        is forgotten when its last transfer ends."""
        if generation is not None:
            self.channels.drop(peer.node_id, generation)
            if peer.generation == generation:
                peer.generation = None
        peer.broken = True

    def release(self, peer: DecodePeer) -> None:
        peer.active -= 1
        peer.last_used = self._clock()
        if peer.active == 0 and peer.broken:
            self._forget(peer)

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
