"""The router's per-node channels: reused while a node is live, closed once it has left the membership."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from baton.router.server import NodeStubs
from baton.v1 import node_pb2


def test_channels_are_reused_and_closed_after_their_node_left():
    async def main():
        live = {"127.0.0.1:1", "127.0.0.1:2"}
        stubs = NodeStubs(lambda: set(live))
        a = stubs.decode("127.0.0.1:1")
        assert stubs.decode("127.0.0.1:1") is a and stubs.prefill("127.0.0.1:1") is stubs.prefill("127.0.0.1:1")
        b = stubs.prefill("127.0.0.1:2")
        live.discard("127.0.0.1:1")
        stubs.decode("127.0.0.1:3")  # a new address: the channel to the node that left is closed
        await asyncio.gather(*list(stubs._closing))  # no call was open on it: no grace to wait out
        assert stubs.prefill("127.0.0.1:2") is b
        with_new_channel = stubs.decode("127.0.0.1:1")  # it came back: a fresh channel
        assert with_new_channel is not a
        with pytest.raises(grpc.aio.UsageError):  # the old channel is closed
            await a.GetStats(node_pb2.GetStatsRequest(), timeout=1)
        await stubs.close()

    asyncio.run(main())
