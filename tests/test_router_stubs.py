"""The router's per-node channels: reused while a node is live, closed once it has left the membership and its
last request has ended (never under a request: a draining node finishes its streams)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from baton.router.node_stubs import NodeStubs
from baton.v1 import node_pb2


def test_channels_are_reused_and_closed_after_their_node_left():
    async def main():
        live = {"127.0.0.1:1", "127.0.0.1:2"}
        stubs = NodeStubs(lambda: set(live))
        with stubs.use("127.0.0.1:1") as a, stubs.use("127.0.0.1:1") as again:
            assert again is a
        with stubs.use("127.0.0.1:2") as b:
            pass
        live.discard("127.0.0.1:1")
        with stubs.use("127.0.0.1:3"):  # a new address: the channel to the node that left is closed
            pass
        await asyncio.gather(*list(stubs._closing))  # no call was open on it: closed at once
        with stubs.use("127.0.0.1:2") as b_again:
            assert b_again is b
        with stubs.use("127.0.0.1:1") as back:  # it came back: a fresh channel
            assert back is not a
        with pytest.raises(grpc.aio.UsageError):  # the old channel is closed
            await a.decode.GetStats(node_pb2.GetStatsRequest(), timeout=1)
        await stubs.close()

    asyncio.run(main())


def test_a_node_that_left_keeps_its_channel_until_its_last_request_ends():
    """The failure this replaces: a node leaving the membership (draining) had its channel closed under the
    requests still using it, 30 s later or (when another node's address came up meanwhile) as their Release
    went out, which then failed with UsageError instead of freeing the blocks."""

    async def main():
        live = {"127.0.0.1:1"}
        stubs = NodeStubs(lambda: set(live))
        with stubs.use("127.0.0.1:1") as draining:
            live.clear()
            live.add("127.0.0.1:2")
            with stubs.use("127.0.0.1:2"):  # prunes: the left node is still in use
                pass
            assert not stubs._closing
            with pytest.raises(grpc.aio.AioRpcError) as e:  # the channel still works: the call reaches the wire
                await draining.decode.GetStats(node_pb2.GetStatsRequest(), timeout=0.5)
            assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert len(stubs._closing) == 1  # its last request ended: closed now
        await asyncio.gather(*list(stubs._closing))
        with pytest.raises(grpc.aio.UsageError):
            await draining.decode.GetStats(node_pb2.GetStatsRequest(), timeout=1)
        await stubs.close()

    asyncio.run(main())


def test_a_node_restarted_on_its_address_is_reached_by_the_first_call_after_it_is_up():
    """A channel that failed (its node died) while a request still holds it is replaced by a fresh one as
    soon as a node is picked on that address again. The failure this replaces: grpc shares subchannels
    between channels to the same address, so the fresh channel took over the old one's failed connection,
    and its first call failed with the dead node's "Connection refused" until the reconnect backoff ran
    out (the restart test once failed this way, 42 ms after the node was up)."""
    from baton.cluster.etcd_server import free_port

    async def main():
        address = f"127.0.0.1:{free_port()}"
        stubs = NodeStubs(lambda: {address})
        with stubs.use(address) as dead:  # a request holds it: closing the old channel waits for it
            for _ in range(2):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await dead.decode.GetStats(node_pb2.GetStatsRequest(), timeout=1)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            server = grpc.aio.server()
            server.add_insecure_port(address)
            await server.start()
            try:
                with stubs.use(address) as fresh:
                    assert fresh is not dead
                    with pytest.raises(grpc.aio.AioRpcError) as e:  # reached: no servicer behind it
                        await fresh.decode.GetStats(node_pb2.GetStatsRequest(), timeout=5)
                    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
            finally:
                await server.stop(0)
        await stubs.close()

    asyncio.run(main())
