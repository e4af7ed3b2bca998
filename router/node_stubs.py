"""One gRPC channel per node address, with the node's stubs and its `Streams` call (`streams.NodeStreams`),
shared by every request the router sends there."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from baton.common.members import MemberStub, node_channel
from baton.common.messages import NODE_CHANNEL_OPTIONS
from baton.v1 import node_pb2_grpc

from .streams import NodeStreams


@dataclass(slots=True, eq=False)
class NodeChannel:
    channel: grpc.aio.Channel
    decode: node_pb2_grpc.DecodeNodeStub
    prefill: node_pb2_grpc.PrefillNodeStub
    streams: NodeStreams  # the request streams on it, all on one call
    users: int = 0  # requests using the channel now
    left: bool = False  # its address left the membership: closed when its last request ends


class NodeStubs:
    """One channel and its stubs per node address, shared by the requests that `use` it. A channel to an
    address that left the membership (noticed when a new address is first used) is closed once its last request
    ends, never before: a draining node finishes its streams however long they take, and nodes that come and go
    leak nothing."""

    def __init__(self, live: Callable[[], set[str]], member_token: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self._live = live
        self._member_token = member_token  # a closed cluster's nodes answer calls that carry it
        self._credentials = credentials  # and, with mutual TLS, over channels that present a member certificate
        self._nodes: dict[str, NodeChannel] = {}
        self._closing: set[asyncio.Task] = set()

    @contextlib.contextmanager
    def use(self, address: str) -> Iterator[NodeChannel]:
        node = self._nodes.get(address)
        if node is not None and node.channel.get_state() == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            # Its node died, and (since it is picked) a node is live on that address again: a restart on the
            # same address. The old channel would fail every call until its reconnect backoff ran out.
            self._retire(address)
            node = None
        if node is None:
            self._prune()
            channel = node_channel(address, NODE_CHANNEL_OPTIONS, self._credentials)
            decode = MemberStub(node_pb2_grpc.DecodeNodeStub(channel), self._member_token)
            prefill = MemberStub(node_pb2_grpc.PrefillNodeStub(channel), self._member_token)
            node = self._nodes[address] = NodeChannel(channel, decode, prefill, NodeStreams(decode))
        node.users += 1
        try:
            yield node
        finally:
            node.users -= 1
            if node.left and not node.users:
                self._close(node)

    def _prune(self) -> None:
        live = self._live()
        for address in [a for a in self._nodes if a not in live]:
            self._retire(address)

    def _retire(self, address: str) -> None:
        node = self._nodes.pop(address)
        node.left = True
        if not node.users:
            self._close(node)

    def _close(self, node: NodeChannel) -> None:
        task = asyncio.get_running_loop().create_task(_close(node))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        nodes = list(self._nodes.values())
        self._nodes = {}
        await asyncio.gather(*(_close(node) for node in nodes), *self._closing)


async def _close(node: NodeChannel) -> None:
    await node.streams.close()
    await node.channel.close()
