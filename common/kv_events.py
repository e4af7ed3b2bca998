"""A node's prefix cache as a stream of changes: what the routers' KV-aware routing reads (router/kv_index.py).

The engine names a block once its K/V are final and forgets the name when it evicts the block
(engine/block_manager.py). Its thread hands those changes over in batches, numbered 1, 2, ... in the order they
happened (`AsyncEngine.watch_kv`). `KVEventPublisher` fans them out to every `KVEvents.Subscribe` call (one per
router): first a snapshot of every named block, taken on the engine thread between two batches (its `seq` is
the last batch it holds), then every later batch. A subscriber more than `buffer` batches behind (a router that
stopped reading) loses the batches that do not fit: its numbering jumps, and the router subscribes again for a
new snapshot. Nothing here writes to etcd: blocks come and go far too often for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from baton.engine.async_engine import AsyncEngine
from baton.engine.block_manager import CacheChanges
from baton.v1 import node_pb2, node_pb2_grpc

DEFAULT_BUFFER = 4096  # batches a subscriber may fall behind by before it loses some


class KVEventPublisher:
    """Owns the subscribers' queues. Runs on the event loop."""

    def __init__(self, node_id: str, engine: AsyncEngine, buffer: int = DEFAULT_BUFFER) -> None:
        self.node_id = node_id
        self.buffer = buffer
        self._engine = engine
        self._queues: set[asyncio.Queue[CacheChanges | None]] = set()
        self._closed = False
        self.dropped = 0  # batches lost by subscribers that fell behind (counted once per subscriber)
        engine.watch_kv(self._publish)

    @property
    def subscribers(self) -> int:
        return len(self._queues)

    def close(self) -> None:
        """The node stops: every subscription ends (after the batches it has queued), so that the server's
        stop does not wait for calls that never end by themselves."""
        self._closed = True
        for queue in self._queues:
            while queue.full():  # the end takes the place of a batch: the caller resubscribes anyway
                queue.get_nowait()
            queue.put_nowait(None)

    def _publish(self, changes: CacheChanges) -> None:
        for queue in self._queues:
            try:
                queue.put_nowait(changes)
            except asyncio.QueueFull:  # that subscriber sees the gap in the numbering and asks again
                self.dropped += 1

    async def subscribe(self) -> AsyncIterator[node_pb2.KVEventBatch]:
        """The snapshot, then each batch after it, until the caller stops reading."""
        if self._closed:
            return
        queue: asyncio.Queue[CacheChanges | None] = asyncio.Queue(self.buffer)
        self._queues.add(queue)  # before the snapshot: nothing after it may be missed
        try:
            snapshot = await self._engine.kv_snapshot()
            seed, block_size = self._engine.kv_identity
            yield _message(snapshot, node_id=self.node_id, model_seed=seed, block_size=block_size)
            while (changes := await queue.get()) is not None:
                if changes.seq > snapshot.seq:  # older ones are in the snapshot already
                    yield _message(changes)
        finally:
            self._queues.discard(queue)


def _message(changes: CacheChanges, **fields) -> node_pb2.KVEventBatch:
    return node_pb2.KVEventBatch(
        seq=changes.seq, snapshot=changes.snapshot, removed=changes.removed,
        stored=[node_pb2.KVBlock(name=name, parent=parent) for name, parent in changes.stored], **fields)


class KVEventsServicer(node_pb2_grpc.KVEventsServicer):
    def __init__(self, publisher: KVEventPublisher) -> None:
        self.publisher = publisher

    async def Subscribe(self, request, context):
        async for batch in self.publisher.subscribe():
            yield batch
