"""Where each prompt's prefix lives: the router's index of every live node's prefix cache, built from the
nodes' KV events (common/kv_events.py) and read by KV-aware routing (routing.py).

One subscription per live member (the membership in etcd says who; a node that registers anew is subscribed
anew). A node's entry in the index:

    (none) ──snapshot in──▶ SYNCED ──batch seq + 1──▶ SYNCED
      ▲                        │
      └──── a gap in seq, the call broke, the node left ──┘   (the entry goes; subscribed again after a pause)

While a node has no entry the index says it holds nothing, so a router that starts, reconnects or lost
events routes as if by load alone until the snapshot is in. A snapshot that names another node than the
member at that address is refused: only members' events enter the index. Entries are sets of block names
(engine/prefix.py): a name stands for its whole prefix, so the blocks a node holds of a prompt are the
longest run of the prompt's names found in its set. Routers never talk to each other: each builds the same
index from the same events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from baton.common.members import MemberStub, node_channel
from baton.common.membership import MembershipWatcher, NodeInfo
from baton.engine.prefix import block_names
from baton.v1 import node_pb2, node_pb2_grpc

log = logging.getLogger(__name__)

RETRY_FIRST_S = 0.05  # the pause before subscribing again, doubled after each failure up to RETRY_MAX_S
RETRY_MAX_S = 2.0


@dataclass(slots=True)
class NodeCache:
    """What one node holds named, as of its batch `seq`."""

    node_id: str
    seed: bytes  # its model's identity: the root of its block names
    block_size: int
    seq: int
    names: set[bytes] = field(default_factory=set)

    def apply(self, batch: node_pb2.KVEventBatch) -> None:
        self.names.update(block.name for block in batch.stored)
        self.names.difference_update(batch.removed)
        self.seq = batch.seq


class PromptBlocks:
    """A prompt's block names, computed once per request and per (model seed, block size) asked for: what
    routing compares with each node's names. Only the blocks before the one holding the last token count
    (that one is always computed: its logits give the first token)."""

    def __init__(self, token_ids: Sequence[int]) -> None:
        self.token_ids = token_ids
        self._names: dict[tuple[bytes, int], list[bytes]] = {}

    def names(self, seed: bytes, block_size: int) -> list[bytes]:
        key = (seed, block_size)
        if key not in self._names:
            limit = (len(self.token_ids) - 1) // block_size
            self._names[key] = block_names(seed, self.token_ids, block_size, limit=limit)
        return self._names[key]


class KVIndex:
    """Owns the subscriptions and the entries. `on_resync(node_id, cause)`: counts each loss of sync."""

    def __init__(self, membership: MembershipWatcher, on_resync=lambda node_id, cause: None,
                 member_token: str | None = None, credentials=None) -> None:
        self.membership = membership
        self._on_resync = on_resync
        self._member_token = member_token  # a closed cluster's nodes answer calls that carry it
        self._credentials = credentials  # grpc.ChannelCredentials: to nodes over mutual TLS
        self._entries: dict[str, NodeCache] = {}
        self._follows: dict[tuple[str, str, int | None], asyncio.Task] = {}  # (node, address, registration)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._follows.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._follows.clear()
        self._entries.clear()

    def entry(self, node_id: str) -> NodeCache | None:
        return self._entries.get(node_id)

    def sizes(self) -> dict[str, int]:
        """Per node in sync, the blocks it holds named."""
        return {node_id: len(entry.names) for node_id, entry in self._entries.items()}

    def follow(self, node: NodeInfo) -> asyncio.Task:
        """Follows one node's events in the background (what the membership does for every live node)."""
        return asyncio.create_task(self._follow(node))

    def held_tokens(self, node_id: str, prompt: PromptBlocks) -> int:
        """Of `prompt`, the tokens whose K/V `node_id` holds cached (0 while its entry is not in sync)."""
        entry = self._entries.get(node_id)
        if entry is None:
            return 0
        held = 0
        for name in prompt.names(entry.seed, entry.block_size):
            if name not in entry.names:
                break
            held += 1
        return held * entry.block_size

    async def _run(self) -> None:
        """Follows the membership: a subscription per live node, ended when it leaves or registers anew."""
        while True:
            version = self.membership.version
            live = {(n.node_id, n.address, self.membership.registration(n)): n for n in self.membership.nodes()}
            for key in [k for k in self._follows if k not in live]:
                self._follows.pop(key).cancel()
                if not any(k[0] == key[0] for k in live):
                    self._entries.pop(key[0], None)
            for key, node in live.items():
                if key not in self._follows:
                    self._follows[key] = self.follow(node)
            try:
                await self.membership.wait_for(lambda: self.membership.version != version, 3600)
            except TimeoutError:
                pass

    async def _follow(self, node: NodeInfo) -> None:
        """Subscribes to one node's events, and again after each loss of sync, until cancelled."""
        pause = RETRY_FIRST_S
        while True:
            cause = await self._subscribe(node)
            self._entries.pop(node.node_id, None)  # says nothing until the next snapshot is in
            if cause is None:
                return  # the node serves no KV events: it stays out of the index
            self._on_resync(node.node_id, cause)
            if cause == "gap":
                pause = RETRY_FIRST_S  # the node is fine: ask again at once
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX_S)

    async def _subscribe(self, node: NodeInfo) -> str | None:
        """One subscription, until it loses sync: why ("gap", "broken", "refused"), or None if the node has no
        KV events service."""
        async with node_channel(node.address, (), self._credentials) as channel:
            call = MemberStub(node_pb2_grpc.KVEventsStub(channel), self._member_token).Subscribe(
                node_pb2.KVEventsRequest())
            try:
                async for batch in call:
                    if batch.snapshot:
                        if batch.node_id != node.node_id or not batch.block_size:
                            log.warning("kv events from %s name node %r: refused", node.address, batch.node_id)
                            return "refused"
                        entry = NodeCache(node.node_id, bytes(batch.model_seed), batch.block_size, batch.seq)
                        entry.apply(batch)
                        self._entries[node.node_id] = entry
                        continue
                    entry = self._entries.get(node.node_id)
                    if entry is None or batch.seq != entry.seq + 1:
                        log.info("kv events of %s: batch %d after %s: subscribing again", node.node_id, batch.seq,
                                 entry.seq if entry else "none")
                        return "gap"
                    entry.apply(batch)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return None
                log.debug("kv events of %s: %s", node.node_id, e.code().name)
            finally:
                call.cancel()
            return "broken"
