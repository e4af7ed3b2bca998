"""A prefill node's pair channel lanes, end to end in one process: a real PrefillServicer and DecodeServicer
(stories260K engines, real gloo pair groups, real gRPC on loopback), the router's part played by the test.

The decode node here holds each ReceiveKV answer until the test lets it go, after its side of the transfer is
over: what the prefill node does with the lane in between is what these tests look at.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import grpc
import pytest

from baton.decode.server import DecodeServicer
from baton.engine import LLM
from baton.engine.async_engine import AsyncEngine
from baton.kvtransfer.channel import LANES_PER_PAIR, KVStoreHost
from baton.prefill.server import PrefillServicer
from baton.v1 import baton_pb2 as pb
from baton.v1 import node_pb2, node_pb2_grpc

BOUND = 60.0  # seconds: an upper bound on a whole test; a hang fails it instead of blocking CI
TIMEOUT = 20.0  # the nodes' transfer timeout: nothing below may come near it
PROMPT = [1, 400, 92, 17, 305, 44, 9, 211, 60, 3]


class HeldDecode(DecodeServicer):
    """The real decode node, whose ReceiveKV answers (a response or an error status) wait for `let_go` once
    its side of the transfer is over."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, int]] = []  # (request id, lane) in the order ReceiveKV came
        self.over: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.gates: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)

    async def ReceiveKV(self, request, context):
        rid = request.request_id
        self.calls.append((rid, request.lane))

        async def hold() -> None:
            self.over[rid].set()
            await self.gates[rid].wait()

        response = await super().ReceiveKV(request, _Held(context, hold))
        await hold()
        return response

    def let_go(self, request_id: str) -> None:
        self.gates[request_id].set()


class _Held:
    """A ReceiveKV call's context whose `abort` (grpc.aio sends the status at once) waits for `hold` first."""

    def __init__(self, context, hold) -> None:
        self._context, self._hold = context, hold

    async def abort(self, code, details=""):
        await self._hold()
        await self._context.abort(code, details)

    def __getattr__(self, name):
        return getattr(self._context, name)


class Nodes:
    """A prefill node and a decode node on one gRPC server, with the router's two calls. `decode`: the decode
    node's class (`HeldDecode`, or the plain one); `shared`: its KV storage in /dev/shm, so that the prefill
    node writes into it on the same-device path."""

    def __init__(self, stories_path, decode: type[DecodeServicer] = HeldDecode, shared: bool = False) -> None:
        self.stories_path = stories_path
        self.decode_class = decode
        self.shared = shared

    async def __aenter__(self) -> Nodes:
        loop = asyncio.get_running_loop()
        engines = [await asyncio.to_thread(
            lambda shared: LLM(str(self.stories_path), num_kv_blocks=64, share_kv_cache=shared).engine, shared)
            for shared in (False, self.shared)]
        self.vocab = engines[0].model_config.vocab_size
        self.prefill_engine, self.decode_engine = (AsyncEngine(e, loop) for e in engines)
        self.store = KVStoreHost()
        self.decode = self.decode_class("decode-0", "decode", self.decode_engine, self.store, TIMEOUT)
        self.prefill = PrefillServicer("prefill-0", self.prefill_engine, TIMEOUT)
        self.server = grpc.aio.server()
        node_pb2_grpc.add_DecodeNodeServicer_to_server(self.decode, self.server)
        node_pb2_grpc.add_PrefillNodeServicer_to_server(self.prefill, self.server)
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.decode.advertise(self.address)
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(self.address)
        self.decode_stub = node_pb2_grpc.DecodeNodeStub(self.channel)
        self.prefill_stub = node_pb2_grpc.PrefillNodeStub(self.channel)
        return self

    async def __aexit__(self, *exc) -> None:
        for gate in getattr(self.decode, "gates", {}).values():
            gate.set()
        await self.channel.close()
        await self.server.stop(grace=None)
        await self.prefill.close()
        await self.decode.close()
        await self.prefill_engine.close()
        await self.decode_engine.close()
        self.store.close()

    async def reserve(self, rid: str, prompt: list[int]) -> node_pb2.KVTarget:
        response = await self.decode_stub.Reserve(
            node_pb2.ReserveRequest(request_id=rid, prompt_tokens=len(prompt), max_tokens=4, lease_ms=60_000))
        return response.target

    async def prefill_call(self, rid: str, prompt: list[int], reservation=None) -> list[node_pb2.PrefillEvent]:
        """The router's Prefill call; returns its events, or raises its AioRpcError."""
        target = reservation or await self.reserve(rid, prompt)  # the reservation, as the router passes it on
        call = self.prefill_stub.Prefill(node_pb2.PrefillRequest(
            request_id=rid, prompt_token_ids=prompt, sampling=pb.SamplingParams(max_tokens=4, temperature=0),
            target=target))
        return [event async for event in call]

    def peer(self):
        return self.prefill.peers.get("decode-0")


def run(stories_path, test) -> None:
    async def main():
        async with asyncio.timeout(BOUND):
            async with Nodes(stories_path) as nodes:
                await test(nodes)

    asyncio.run(main())


async def until(condition) -> None:
    """Yields to the event loop until `condition()` holds (the test's BOUND ends a hang)."""
    while not condition():
        await asyncio.sleep(0.001)


def transferred(events) -> int:
    assert [e.WhichOneof("kind") for e in events] == ["first_token", "transfer_done"], events
    return events[-1].transfer_done.bytes_sent


def test_a_lane_goes_back_only_once_the_decode_node_answered(stories_path):
    """LANES_PER_PAIR + 1 requests at once: the first ones take every lane; their transfers are over on the
    decode node, but while its answers are held the lanes stay taken and the last request waits. Letting one
    answer go hands exactly that lane to the waiting request. No generation fails, and the groups are one per
    lane, reused."""

    async def test(nodes: Nodes) -> None:
        rids = [f"r{i}" for i in range(LANES_PER_PAIR + 1)]
        calls = {rid: asyncio.ensure_future(nodes.prefill_call(rid, PROMPT)) for rid in rids}
        await until(lambda: len(nodes.decode.calls) == LANES_PER_PAIR)
        holding = dict(nodes.decode.calls)
        assert sorted(holding.values()) == list(range(LANES_PER_PAIR))
        for rid in holding:
            await nodes.decode.over[rid].wait()  # the decode node's side is over: every message matched
        peer = nodes.peer()
        generation = peer.generation
        await until(lambda: len(peer.waiters) == 1)  # the last request waits for a lane
        assert peer.free_lanes == [] and len(nodes.decode.calls) == LANES_PER_PAIR
        assert not any(call.done() for call in calls.values())  # no TransferDone before the answer

        first, lane = next((rid, lane) for rid, lane in holding.items() if lane == 2)
        nodes.decode.let_go(first)
        assert transferred(await calls[first]) > 0
        await until(lambda: len(nodes.decode.calls) == LANES_PER_PAIR + 1)
        last, last_lane = nodes.decode.calls[-1]
        assert last_lane == lane and last not in holding  # the lane just answered, and only it

        for rid in rids:
            nodes.decode.let_go(rid)
        sizes = {transferred(await call) for call in calls.values()}
        assert len(sizes) == 1 and sizes.pop() > 0
        assert peer.generation == generation and not peer.broken
        assert sorted(peer.free_lanes) == list(range(LANES_PER_PAIR)) and peer.active == 0
        assert nodes.decode.channels.lanes("prefill-0", generation) == list(range(LANES_PER_PAIR))
        assert nodes.prefill.channels.lanes("decode-0", generation) == list(range(LANES_PER_PAIR))

    run(stories_path, test)


def test_a_transfer_ended_early_keeps_its_lane_until_answered_and_leaves_it_in_step(stories_path):
    """A request refused by the prefill engine after its ReceiveKV went (a cancel header instead of its K/V:
    the call ends at once), then one whose reservation the decode node had released (drained there): each
    keeps its lane until the decode node answered, then gives it back with the generation whole, and the next
    transfer on that same lane lands."""

    async def test(nodes: Nodes) -> None:
        # A token id past the vocabulary: the engine refuses the prompt once the transfer was announced.
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await nodes.prefill_call("bad", [1, 2, nodes.vocab])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in e.value.details()
        await nodes.decode.over["bad"].wait()  # it read the cancel header: its side is over, the answer held
        peer = nodes.peer()
        generation = peer.generation
        assert nodes.decode.calls == [("bad", 0)]
        assert 0 not in peer.free_lanes and peer.active == 1
        nodes.decode.let_go("bad")
        await until(lambda: peer.active == 0)
        assert 0 in peer.free_lanes and peer.generation == generation and not peer.broken

        # Released on the decode node before its K/V came: drained there, NOT_FOUND.
        reservation = await nodes.reserve("late", PROMPT)
        await nodes.decode_stub.Release(node_pb2.ReleaseRequest(request_id="late"))
        late = asyncio.ensure_future(nodes.prefill_call("late", PROMPT, reservation))
        await nodes.decode.over["late"].wait()
        assert nodes.decode.calls[-1] == ("late", 0)
        assert 0 not in peer.free_lanes and peer.active == 1 and not late.done()
        nodes.decode.let_go("late")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await late
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "dropped" in e.value.details()
        await until(lambda: peer.active == 0)
        assert 0 in peer.free_lanes and peer.generation == generation and not peer.broken

        nodes.decode.let_go("next")
        assert transferred(await nodes.prefill_call("next", PROMPT)) > 0
        assert nodes.decode.calls[-1] == ("next", 0)
        assert peer.generation == generation and nodes.decode.channels.lanes("prefill-0", generation) == [0]

        # A lane past the pair's is refused before anything is received.
        r = await nodes.reserve("far", PROMPT)
        nodes.decode.let_go("far")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await nodes.decode_stub.ReceiveKV(node_pb2.ReceiveKVRequest(
                request_id="far", prefill_node_id="prefill-0", generation=generation, layout=r.layout,
                num_tokens=len(PROMPT), block_ids=r.block_ids, lane=LANES_PER_PAIR))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("lane:")

    run(stories_path, test)
