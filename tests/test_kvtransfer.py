"""KV transfer over real pair channels: spawned prefill processes, real gloo groups, no mocks.

The pytest process plays the decode node (it hosts the KV store, owns a pool and receives on worker threads);
each prefill node is a spawned process with its own pool and its own block ids, driven over a pipe. Every
message travels under tag 0 (NCCL ignores tags): transfers in flight together each have a lane of their own.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import random
import signal
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from types import SimpleNamespace

import pytest
import torch

from baton.engine.model_runner import KVCache
from baton.kvtransfer.channel import (_RENDEZVOUS_KEYS, DECODE_RANK, LANES_PER_PAIR, PREFILL_RANK, KVStoreHost,
                                      KVTransferError, PairChannels, TransferCancelled, pair_prefix)
from baton.kvtransfer.receiver import receive
from baton.kvtransfer.sender import HEADER_LEN, KVSender, Staging, coalesce, make_header, staging_bytes

LAYERS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 4, 16, 2, 32
DECODE_BLOCKS, PREFILL_BLOCKS = 40, 48
MANY_BLOCKS = 128  # the pools of the many-transfers test: room for 40 transfers' disjoint blocks
# A block of exactly a header's size (2 * 1 * 1 * 16 float32 = 16 int64): any message fits any recv, so a
# mix-up of messages is silent corruption (gloo aborts a process whose recv is smaller than the message).
TINY = dict(block_size=1, kv_heads=1, head_dim=16)
DECODE_SEED, PREFILL_SEED = 1, 2
DECODE_ID = "decode-0"
TIMEOUT = 20.0  # generous: every failure below must come much sooner
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_cache(num_blocks: int, dtype: torch.dtype, seed: int, *, block_size: int = BLOCK_SIZE,
               kv_heads: int = KV_HEADS, head_dim: int = HEAD_DIM) -> KVCache:
    """The engine's own KV layout, every element filled with a reproducible pattern."""
    cfg = SimpleNamespace(num_layers=LAYERS, num_kv_heads=kv_heads, head_dim=head_dim)
    cache = KVCache(cfg, num_blocks, block_size, dtype, "cpu")
    gen = torch.Generator().manual_seed(seed)
    cache.storage.copy_(torch.randn(cache.storage.shape, generator=gen).to(dtype))
    return cache


def prefill_caches() -> dict[str, KVCache]:
    """The prefill node's pools, by name (the decode side rebuilds the same ones to check what landed)."""
    caches = {name: make_cache(PREFILL_BLOCKS, dt, PREFILL_SEED) for name, dt in DTYPES.items()}
    caches["tiny"] = make_cache(PREFILL_BLOCKS, torch.float32, PREFILL_SEED, **TINY)
    caches["many"] = make_cache(MANY_BLOCKS, torch.float32, PREFILL_SEED)
    return caches


def block_bytes(dtype: torch.dtype) -> int:
    cfg = SimpleNamespace(num_layers=LAYERS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    return KVCache.bytes_per_block(cfg, BLOCK_SIZE, dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


# -- the prefill node (spawned) --------------------------------------------------------------------------

def prefill_main(node_id: str, conn) -> None:
    torch.set_num_threads(1)
    channels = PairChannels(node_id)
    caches = prefill_caches()
    while True:
        msg = conn.recv()
        if msg is None:
            break
        try:
            if msg["op"] == "next_generation":
                conn.send(("ok", channels.next_generation(DECODE_ID, msg["store"], TIMEOUT)))
                continue
            if msg["op"] == "lanes":
                conn.send(("ok", send_through_lanes(channels, msg, caches["many"].pools, conn)))
                continue
            result = None
            if msg["op"] == "connect":
                channels.get(DECODE_ID, msg["generation"], msg["store"], PREFILL_RANK, TIMEOUT)
            if msg["op"] == "send":
                pools = caches[msg["cache"]].pools
                # Each transfer on its lane's group (lane 0 unless told): one group, for the test that shows
                # why transfers in flight together must not share one.
                senders = [(CorruptingSender if "bad_layer" in t else KVSender)(
                               channels.get(DECODE_ID, msg["generation"], msg["store"], PREFILL_RANK, TIMEOUT,
                                            t.get("lane", 0)),
                               DECODE_RANK, t["id"], t["src"], t["runs"], num_layers=LAYERS,
                               pool=pools[0] if t.get("early_header") else None, **(
                                   {"bad_layer": t["bad_layer"]} if "bad_layer" in t else {}))
                           for t in msg["transfers"]]
                for layer in range(LAYERS):  # as an engine batch would: every request's layer, then the next
                    for sender, t in zip(senders, msg["transfers"]):
                        if t.get("end_at", LAYERS) > layer:
                            sender.send_layer(layer, pools[layer])
                    if msg.get("stall_after_layer") == layer:
                        conn.send(("posted", layer))
                        time.sleep(3600)  # killed here
                for sender in senders:
                    sender.end_early()  # nothing for a transfer that sent every layer
                result = [s.wait(TIMEOUT) for s in senders]
            conn.send(("ok", result))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
    channels.close()


class CorruptingSender(KVSender):
    """Sends layer `bad_layer` with a checksum that does not match its blocks: what a layer altered on the way,
    or landing in the wrong blocks, looks like to the receiver."""

    def __init__(self, *args, bad_layer: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bad_layer = bad_layer

    def _checksum(self, packed: torch.Tensor) -> torch.Tensor:
        total = super()._checksum(packed)
        return total + 1 if self.layers_posted == self.bad_layer else total


def send_through_lanes(channels: PairChannels, msg: dict, pools, conn) -> list[tuple[int, int]]:
    """Sends `msg["transfers"]` as a prefill node does: each takes the lowest free lane of the generation (waiting
    while all are held) and announces it to the decode side ("start", the ReceiveKV call); the layers of every
    transfer in flight go out interleaved, one layer of each per engine step; a lane comes back only when the
    decode side has answered its transfer ("answered"). Returns (transfer, lane) in the order they started."""
    free, pending = list(range(msg["lanes"])), deque(enumerate(msg["transfers"]))
    in_flight: dict[int, tuple[int, KVSender]] = {}  # lane -> (transfer, its sender)
    unanswered: dict[int, int] = {}  # transfer -> lane: sends done, the decode side's answer still to come
    started = []

    def take_answer() -> None:
        kind, i, error = conn.recv()
        assert kind == "answered", kind
        if error:
            raise KVTransferError(f"the decode side failed transfer {i}: {error}")
        free.append(unanswered.pop(i))
        free.sort()

    while pending or in_flight or unanswered:
        while free and pending:
            lane, (i, t) = free.pop(0), pending.popleft()
            conn.send(("start", i, lane))  # first: the decode side joins the lane's rendezvous on it
            pg = channels.get(DECODE_ID, msg["generation"], msg["store"], PREFILL_RANK, TIMEOUT, lane)
            in_flight[lane] = (i, KVSender(pg, DECODE_RANK, i, t["src"], t["runs"], num_layers=LAYERS, pool=pools[0]))
            started.append((i, lane))
        for lane, (i, sender) in list(in_flight.items()):  # one engine step: the next layer of each
            sender.send_layer(sender.layers_posted, pools[sender.layers_posted])
            if sender.layers_posted == LAYERS:
                sender.wait(TIMEOUT)
                del in_flight[lane]
                unanswered[i] = lane
        while unanswered and (conn.poll() or not in_flight and not (free and pending)):
            take_answer()  # without blocking while sends can go on; blocking when only an answer can help
    return started


class Prefill:
    def __init__(self, node_id: str) -> None:
        ctx = mp.get_context("spawn")
        self.node_id = node_id
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=prefill_main, args=(node_id, child), daemon=True)
        self.proc.start()
        child.close()

    def post(self, **msg) -> None:
        self.conn.send(msg)

    def reply(self, timeout: float = TIMEOUT):
        if not self.conn.poll(timeout):
            raise TimeoutError(f"{self.node_id} did not answer in {timeout}s")
        return self.conn.recv()

    def next_generation(self, store: str) -> int:
        """The prefill node picks the generation (here from the decode node's store counter) and would tell the
        decode node along with the transfer's metadata."""
        self.post(op="next_generation", store=store)
        status, generation = self.reply()
        assert status == "ok", generation
        return generation

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(5)

    def stop(self) -> None:
        try:
            if self.proc.is_alive():
                self.conn.send(None)
                self.proc.join(5)
        except (BrokenPipeError, OSError):
            pass
        finally:
            self.kill()
            self.conn.close()


@pytest.fixture(scope="module")
def host():
    h = KVStoreHost("127.0.0.1", 0)
    yield h
    h.close()


@pytest.fixture(scope="module")
def decode(host):
    channels = PairChannels(DECODE_ID, local_store=host)
    yield channels
    channels.close()


@pytest.fixture(scope="module")
def prefill():
    p = Prefill("prefill-0")
    yield p
    p.stop()


@pytest.fixture(scope="module")
def gens(host, prefill):
    """Generations as the prefill node picks them (one group per test; a real node reuses its group)."""
    return SimpleNamespace(new=lambda: prefill.next_generation(host.address))


def transfer(host, decode, prefill, generation, dtype, transfers, pool_cache, timeout=TIMEOUT):
    """Runs `transfers` ([(lane, src ids, dst ids)], each on its own lane) concurrently on one pair; returns the
    decode side's bytes and the prefill side's."""
    assert len({lane for lane, _, _ in transfers}) == len(transfers), "one transfer at a time per lane"
    # Every other transfer posts its header when the sender is made (before layer 0), the others with layer 0.
    msg_transfers = [{"id": f"t{i}", "lane": lane, "src": src, "runs": coalesce(dst), "early_header": i % 2 == 1}
                     for i, (lane, src, dst) in enumerate(transfers)]
    prefill.post(op="send", generation=generation, store=host.address, cache=dtype, transfers=msg_transfers)

    def recv_one(lane, dst):
        return receive(decode.get(prefill.node_id, generation, host.address, DECODE_RANK, timeout, lane),
                       PREFILL_RANK, f"lane {lane}", pool_cache.pools, coalesce(dst), timeout)

    with ThreadPoolExecutor(len(transfers)) as pool:
        futures = [pool.submit(recv_one, lane, dst) for lane, _, dst in transfers]
        got = [f.result() for f in futures]
    status, sent = prefill.reply()
    assert status == "ok", sent
    return got, sent


def check_pool(after: KVCache, before: KVCache, src: KVCache, pairs: list[tuple[int, int]]) -> None:
    """Destination blocks equal their source blocks bit for bit in every layer; every other block is as it was."""
    moved = {d: s for s, d in pairs}
    for layer in range(LAYERS):
        for d in range(after.pools[layer].shape[0]):
            want = src.pools[layer][moved[d]] if d in moved else before.pools[layer][d]
            assert torch.equal(bits(after.pools[layer][d]), bits(want)), (layer, d, d in moved)


# -- tests --------------------------------------------------------------------------------------------

def test_coalesce_keeps_block_table_order():
    assert coalesce([]) == []
    assert coalesce([7]) == [(7, 1)]
    assert coalesce([4, 5, 6, 9, 2, 3]) == [(4, 3), (9, 1), (2, 2)]
    assert coalesce([3, 2, 1]) == [(3, 1), (2, 1), (1, 1)]


def test_sender_validates_before_touching_the_channel():
    with pytest.raises(ValueError):
        KVSender(None, DECODE_RANK, 1, [1, 2, 3], [(0, 2)])  # 3 source blocks, 2 destination blocks
    sender = KVSender(None, DECODE_RANK, 1, [1, 2], [(0, 2)], num_layers=2)
    pool = torch.zeros(4, 2, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    with pytest.raises(ValueError):
        sender.send_layer(1, pool)  # layer 0 first
    with pytest.raises(ValueError):
        sender.send_layer(0, pool[:, 0])  # not a pool
    with pytest.raises(ValueError):
        KVSender(None, DECODE_RANK, 1, [9], [(0, 1)]).send_layer(0, pool)  # block 9 of 4


def test_receive_validates_runs_against_the_pool():
    pools = make_cache(4, torch.float32, 0).pools
    with pytest.raises(ValueError):
        receive(None, PREFILL_RANK, 1, pools, [(3, 2)], 1.0)


def test_stale_generation_is_refused():
    channels = PairChannels("p")
    with pytest.raises(KVTransferError):  # nobody listens there, but generation 5 is now the newest
        channels.get("d", 5, "127.0.0.1:1", PREFILL_RANK, 0.2)
    assert channels.generation("d") == 5
    with pytest.raises(KVTransferError, match="stale"):
        channels.get("d", 4, "127.0.0.1:1", PREFILL_RANK, 1.0)
    with pytest.raises(KVTransferError, match="stale"):  # whatever the lane: generations are the pair's
        channels.get("d", 4, "127.0.0.1:1", PREFILL_RANK, 1.0, lane=LANES_PER_PAIR - 1)
    with pytest.raises(ValueError, match="lane"):
        channels.get("d", 5, "127.0.0.1:1", PREFILL_RANK, 1.0, lane=LANES_PER_PAIR)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_prompt_blocks_land_in_reserved_blocks(host, decode, prefill, gens, dtype):
    dt = DTYPES[dtype]
    prompt_len = 100
    used = math.ceil(prompt_len / BLOCK_SIZE)  # 7 blocks
    reserved = [12, 13, 14, 15, 16, 17, 18, 19, 20, 21]  # reserved for prompt + decode: 10 blocks
    src = [30, 31, 32, 33, 34, 35, 36, 37]  # the prefill node's table for the same prompt
    dst_cache = make_cache(DECODE_BLOCKS, dt, DECODE_SEED)
    before = make_cache(DECODE_BLOCKS, dt, DECODE_SEED)
    got, sent = transfer(host, decode, prefill, gens.new(), dtype, [(0, src[:used], reserved[:used])], dst_cache)
    assert got == sent == [used * block_bytes(dt)]
    check_pool(dst_cache, before, make_cache(PREFILL_BLOCKS, dt, PREFILL_SEED), list(zip(src[:used], reserved)))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_fragmented_ids_and_two_concurrent_transfers(host, decode, prefill, gens, dtype):
    dt = DTYPES[dtype]
    # Request A: destination in 4 runs; sources partly consecutive (sent from the pool), partly scattered.
    a_src, a_dst = [10, 11, 12, 30, 0, 5, 2], [3, 4, 5, 9, 20, 21, 7]
    # Request B, on the same pair at the same time, on another lane.
    b_src, b_dst = [40, 41, 42, 43, 1], [33, 34, 0, 1, 38]
    assert len(coalesce(a_dst)) == 4 and len(coalesce(b_dst)) == 3
    dst_cache = make_cache(DECODE_BLOCKS, dt, DECODE_SEED)
    before = make_cache(DECODE_BLOCKS, dt, DECODE_SEED)
    got, sent = transfer(host, decode, prefill, gens.new(), dtype,
                         [(0, a_src, a_dst), (1, b_src, b_dst)], dst_cache)
    assert got == sent == [len(a_src) * block_bytes(dt), len(b_src) * block_bytes(dt)]
    check_pool(dst_cache, before, make_cache(PREFILL_BLOCKS, dt, PREFILL_SEED),
               list(zip(a_src, a_dst)) + list(zip(b_src, b_dst)))


def test_many_concurrent_transfers_on_one_pair_through_lanes(host, decode, prefill, gens):
    """The proof that tags are not needed: 40 transfers on one gloo pair, every message under tag 0, up to
    LANES_PER_PAIR in flight at once with their layers interleaved as an engine batch sends them, each on a
    lane no other transfer holds until the decode side has answered it. Fragmented destinations, disjoint
    random contents: every destination block holds its own transfer's data and nothing else moved. A lane is
    one group, reused transfer after transfer."""
    rng = random.Random(12)
    generation = gens.new()
    count = 40
    sizes = [rng.randint(1, 5) for _ in range(count)]
    src_ids, dst_ids = rng.sample(range(MANY_BLOCKS), sum(sizes)), rng.sample(range(MANY_BLOCKS), sum(sizes))
    cut = [sum(sizes[:i]) for i in range(count + 1)]
    transfers = [(src_ids[cut[i]:cut[i + 1]], dst_ids[cut[i]:cut[i + 1]]) for i in range(count)]
    assert sum(len(coalesce(dst)) for _, dst in transfers) > count  # fragmented: runs of several blocks and of one
    dst_cache = make_cache(MANY_BLOCKS, torch.float32, DECODE_SEED)
    prefill.post(op="lanes", generation=generation, store=host.address, lanes=LANES_PER_PAIR,
                 transfers=[{"src": src, "runs": coalesce(dst)} for src, dst in transfers])

    answer_lock, lane_lock = threading.Lock(), threading.Lock()
    busy: set[int] = set()
    groups: dict[int, set[int]] = {}
    received: dict[int, int] = {}

    def answer(i: int, lane: int) -> None:  # the decode node's ReceiveKV for transfer i on `lane`
        error = None
        try:
            with lane_lock:
                assert lane not in busy, f"two transfers on lane {lane} at once"
                busy.add(lane)
            pg = decode.get(prefill.node_id, generation, host.address, DECODE_RANK, TIMEOUT, lane)
            with lane_lock:
                groups.setdefault(lane, set()).add(id(pg))
            received[i] = receive(pg, PREFILL_RANK, i, dst_cache.pools, coalesce(transfers[i][1]), TIMEOUT)
            del pg
        except BaseException as exc:  # noqa: BLE001 - reported to the sender, and failed on below
            error = f"{type(exc).__name__}: {exc}"
        finally:
            with lane_lock:
                busy.discard(lane)
        with answer_lock:  # the answer goes only once this side of the transfer is over
            prefill.conn.send(("answered", i, error))

    with ThreadPoolExecutor(LANES_PER_PAIR) as pool:
        while True:
            msg = prefill.reply()
            if msg[0] != "start":
                break
            pool.submit(answer, msg[1], msg[2])
    status, started = msg
    assert status == "ok", started
    assert sorted(i for i, _ in started) == list(range(count))
    lanes_used = [lane for _, lane in started]
    assert set(lanes_used) == set(range(LANES_PER_PAIR))  # all of them were in flight at some point
    assert received == {i: len(src) * block_bytes(torch.float32) for i, (src, _) in enumerate(transfers)}
    check_pool(dst_cache, make_cache(MANY_BLOCKS, torch.float32, DECODE_SEED),
               make_cache(MANY_BLOCKS, torch.float32, PREFILL_SEED),
               [pair for src, dst in transfers for pair in zip(src, dst)])
    # A group per lane, not per transfer: each lane's group served every transfer that went on it.
    assert decode.lanes(prefill.node_id, generation) == list(range(LANES_PER_PAIR))
    assert {lane: len(ids) for lane, ids in groups.items()} == {lane: 1 for lane in range(LANES_PER_PAIR)}


def test_transfers_in_flight_together_on_one_group_get_mixed_up(host, decode, prefill, gens):
    """Why lanes: two transfers in flight together on ONE group, every message under tag 0 (what the tagged
    protocol becomes on NCCL, which ignores tags). A group matches messages in the order they were posted, so
    when the receiver takes the transfers one after the other while the sender interleaves them (headers at
    step start, then layer by layer, as an engine batch does), the first receive takes the other's messages
    into its blocks (blocks, checksums and headers the same size: gloo raises nothing) and only its layers'
    checksums catch it; the second finds a layer where its header should be. The same schedule on two lanes
    lands bit for bit."""
    block = make_cache(1, torch.float32, 0, **TINY).pools[0][0]
    assert block.numel() * block.element_size() == HEADER_LEN * 8  # every message the same size
    src = make_cache(PREFILL_BLOCKS, torch.float32, PREFILL_SEED, **TINY)
    a_src, a_dst, b_src, b_dst = [3], [5], [4], [9]

    def post(generation: int, lanes: tuple[int, int]) -> None:
        prefill.post(op="send", generation=generation, store=host.address, cache="tiny", transfers=[
            {"id": "a", "lane": lanes[0], "src": a_src, "runs": coalesce(a_dst), "early_header": True},
            {"id": "b", "lane": lanes[1], "src": b_src, "runs": coalesce(b_dst), "early_header": True}])

    # One group (the old protocol without tags).
    generation = gens.new()
    dst = make_cache(DECODE_BLOCKS, torch.float32, DECODE_SEED, **TINY)
    post(generation, (0, 0))
    pg = decode.get(prefill.node_id, generation, host.address, DECODE_RANK, TIMEOUT)
    with pytest.raises(KVTransferError, match="layer 0 does not match its checksum"):
        receive(pg, PREFILL_RANK, "a", dst.pools, coalesce(a_dst), TIMEOUT)
    # Sent: header a, header b, then a0 (blocks, checksum), b0, a1, ...: a's layer 0 took b's header.
    b_header = make_header(LAYERS, coalesce(b_dst), src.pools[0].shape[1:], torch.float32)
    assert torch.equal(bits(dst.pools[0][5]).flatten(), bits(b_header))
    assert not any(torch.equal(bits(dst.pools[layer][5]).flatten(), bits(src.pools[layer][3]).flatten())
                   for layer in range(LAYERS))
    with pytest.raises(KVTransferError, match="disagree on magic"):
        receive(pg, PREFILL_RANK, "b", dst.pools, coalesce(b_dst), TIMEOUT)  # a layer came as its header
    del pg
    decode.drop(prefill.node_id, generation)  # the group is out of step: it goes, the sender's waits fail
    prefill.reply()  # an error, or "ok" if its last sends had completed

    # Two lanes: the same interleaved schedule, every block where it belongs.
    generation = gens.new()
    dst = make_cache(DECODE_BLOCKS, torch.float32, DECODE_SEED, **TINY)
    post(generation, (0, 1))
    # The lanes' groups first, in the sender's order (it builds them all before it sends a layer).
    pgs = [decode.get(prefill.node_id, generation, host.address, DECODE_RANK, TIMEOUT, lane) for lane in (0, 1)]
    for pg, name, d in zip(pgs, "ab", (a_dst, b_dst)):  # one after the other, as above
        assert receive(pg, PREFILL_RANK, name, dst.pools, coalesce(d), TIMEOUT) == LAYERS * HEADER_LEN * 8
    del pg, pgs
    assert prefill.reply()[0] == "ok"
    for layer in range(LAYERS):
        assert torch.equal(dst.pools[layer][5], src.pools[layer][3]), layer
        assert torch.equal(dst.pools[layer][9], src.pools[layer][4]), layer


@pytest.mark.parametrize("wrong", ["dtype", "block ids"])
def test_mismatched_sender_is_refused_not_fatal(host, decode, prefill, gens, wrong):
    """gloo kills the receiving process when a message is larger than its recv (and silently accepts a shorter
    one): the header must turn any disagreement into a KVTransferError, with the pool untouched."""
    generation = gens.new()
    dst = [3, 4, 5]
    sent_dst = dst if wrong == "dtype" else [3, 4, 9]
    prefill.post(op="send", generation=generation, store=host.address,
                 cache="bfloat16" if wrong == "dtype" else "float32",
                 transfers=[{"id": "t", "src": [1, 2, 3], "runs": coalesce(sent_dst)}])
    dst_cache = make_cache(DECODE_BLOCKS, torch.float32, DECODE_SEED)
    with pytest.raises(KVTransferError, match="disagree on (dtype|runs|block ids)"):
        receive(decode.get(prefill.node_id, generation, host.address, DECODE_RANK, TIMEOUT),
                PREFILL_RANK, "t", dst_cache.pools, coalesce(dst), TIMEOUT)
    decode.drop(prefill.node_id)  # the last reference: the group closes, the sender fails at once
    t0 = time.monotonic()
    status, detail = prefill.reply()
    assert status == "error" and "KVTransferError" in detail
    assert time.monotonic() - t0 < TIMEOUT / 2  # promptly: not at the sender's timeout
    check_pool(dst_cache, make_cache(DECODE_BLOCKS, torch.float32, DECODE_SEED), dst_cache, [])


def test_a_layer_that_does_not_match_its_checksum_fails_the_transfer_closed(host, decode, prefill, gens):
    """Every message arrives (the lane stays in step), but layer 2's checksum disagrees with its blocks: the
    receive fails, so the decode node releases the blocks instead of decoding from them."""
    generation = gens.new()
    prefill.post(op="send", generation=generation, store=host.address, cache="float32",
                 transfers=[{"id": "t", "src": [1, 2, 3], "runs": coalesce([3, 4, 9]), "bad_layer": 2}])
    dst_cache = make_cache(DECODE_BLOCKS, torch.float32, DECODE_SEED)
    with pytest.raises(KVTransferError, match="layer 2 does not match its checksum"):
        receive(decode.get(prefill.node_id, generation, host.address, DECODE_RANK, TIMEOUT),
                PREFILL_RANK, "t", dst_cache.pools, coalesce([3, 4, 9]), TIMEOUT)
    assert prefill.reply()[0] == "ok"  # the sender saw nothing wrong: only the receiver can tell
    good = gens.new()  # and the same sender's next transfer, with right checksums, lands
    got, sent = transfer(host, decode, prefill, good, "float32", [(0, [1, 2, 3], [3, 4, 9])], dst_cache)
    assert got == sent


def test_group_is_reused_within_a_generation(host, decode, prefill, gens):
    generation = gens.new()
    dst_cache = make_cache(DECODE_BLOCKS, torch.float32, DECODE_SEED)
    transfer(host, decode, prefill, generation, "float32", [(0, [0, 1], [2, 3])], dst_cache)
    pg = decode.get(prefill.node_id, generation, host.address, DECODE_RANK, 1.0)  # cached: returns at once
    transfer(host, decode, prefill, generation, "float32", [(0, [4], [5])], dst_cache)
    assert decode.get(prefill.node_id, generation, host.address, DECODE_RANK, 1.0) is pg
    assert decode.lanes(prefill.node_id, generation) == [0]  # lanes are built when first used, not before


def test_receive_timeout_then_next_generation(host, decode, prefill, gens):
    """A transfer the prefill never sends times out on the decode side; the pair then moves to a new
    generation and works again."""
    generation = gens.new()
    dst_cache = make_cache(DECODE_BLOCKS, torch.float32, DECODE_SEED)
    prefill.post(op="connect", generation=generation, store=host.address)
    pg = decode.get(prefill.node_id, generation, host.address, DECODE_RANK, TIMEOUT)
    assert prefill.reply() == ("ok", None)
    t0 = time.monotonic()
    with pytest.raises(KVTransferError):
        receive(pg, PREFILL_RANK, "t", dst_cache.pools, [(0, 1)], 0.5)
    assert time.monotonic() - t0 < TIMEOUT / 2  # promptly: not at the sender's timeout
    decode.drop(prefill.node_id)
    with pytest.raises(KVTransferError, match="stale"):  # its rendezvous keys are spent
        decode.get(prefill.node_id, generation, host.address, DECODE_RANK, 1.0)
    with pytest.raises(KVTransferError, match="stale"):  # on every lane
        decode.get(prefill.node_id, generation, host.address, DECODE_RANK, 1.0, LANES_PER_PAIR - 1)
    before = make_cache(DECODE_BLOCKS, torch.float32, DECODE_SEED)
    dst_cache = make_cache(DECODE_BLOCKS, torch.float32, DECODE_SEED)
    transfer(host, decode, prefill, gens.new(), "float32", [(0, [8, 9], [0, 1])], dst_cache)
    check_pool(dst_cache, before, make_cache(PREFILL_BLOCKS, torch.float32, PREFILL_SEED), [(8, 0), (9, 1)])


def test_killed_prefill_fails_receive_at_once_then_new_generation_works(host, decode):
    node_id = "prefill-killed"
    dst_cache = make_cache(DECODE_BLOCKS, torch.float32, DECODE_SEED)
    before = make_cache(DECODE_BLOCKS, torch.float32, DECODE_SEED)
    src, dst = [1, 2, 3, 20], [10, 11, 12, 30]
    victim = Prefill(node_id)
    try:
        generation = victim.next_generation(host.address)
        victim.post(op="send", generation=generation, store=host.address, cache="float32", stall_after_layer=0,
                    transfers=[{"id": "t", "src": src, "runs": coalesce(dst)}])
        outcome: dict = {}

        def recv() -> None:
            pg = decode.get(node_id, generation, host.address, DECODE_RANK, TIMEOUT)
            try:
                receive(pg, PREFILL_RANK, "t", dst_cache.pools, coalesce(dst), TIMEOUT)
                outcome["error"] = None
            except KVTransferError as exc:
                outcome["error"] = exc
            outcome["at"] = time.monotonic()

        thread = threading.Thread(target=recv, daemon=True)
        thread.start()
        assert victim.reply() == ("posted", 0)  # layer 0 is on its way, the rest never comes
        killed_at = time.monotonic()
        victim.kill()
        thread.join(TIMEOUT)
        assert not thread.is_alive()
        assert isinstance(outcome["error"], KVTransferError)
        assert outcome["at"] - killed_at < TIMEOUT / 2, "receive must fail promptly, not at its timeout"
        decode.drop(node_id)
    finally:
        victim.stop()

    reborn = Prefill(node_id)  # a new process: its generation still comes after the dead one's
    try:
        new_generation = reborn.next_generation(host.address)
        assert new_generation > generation
        got, sent = transfer(host, decode, reborn, new_generation, "float32", [(0, src, dst)], dst_cache)
        assert got == sent == [len(src) * block_bytes(torch.float32)]
        check_pool(dst_cache, before, make_cache(PREFILL_BLOCKS, torch.float32, PREFILL_SEED),
                   list(zip(src, dst)))
    finally:
        reborn.stop()


def test_a_transfer_ended_early_leaves_its_lane_in_step(host, decode, prefill, gens):
    """A request cancelled before its prompt was computed sends a cancel header; one cut short after its header
    sends zeros for the layers it owed. Neither breaks its lane: the next transfer on the same lane works and
    lands bit for bit, and so does one that ran beside them on another lane."""
    generation = gens.new()
    dst_cache = make_cache(DECODE_BLOCKS, torch.float32, DECODE_SEED)
    src_cache = make_cache(PREFILL_BLOCKS, torch.float32, PREFILL_SEED)
    transfers = [
        {"id": "c", "lane": 0, "src": [1, 2], "runs": coalesce([3, 4]), "end_at": 0},  # never began: cancel header
        {"id": "p", "lane": 1, "src": [5, 6], "runs": coalesce([7, 8]), "end_at": 2, "early_header": True},  # padded
        {"id": "w", "lane": 2, "src": [9], "runs": coalesce([10])},  # whole, beside them
    ]
    prefill.post(op="send", generation=generation, store=host.address, cache="float32", transfers=transfers)

    # The lanes' groups first, in the sender's order (it builds them all before it sends a layer).
    lane = [decode.get(prefill.node_id, generation, host.address, DECODE_RANK, TIMEOUT, n) for n in range(3)]
    with pytest.raises(TransferCancelled):
        receive(lane[0], PREFILL_RANK, "c", dst_cache.pools, coalesce([3, 4]), TIMEOUT)
    assert receive(lane[1], PREFILL_RANK, "p", dst_cache.pools, coalesce([7, 8]), TIMEOUT) == 2 * block_bytes(
        torch.float32)
    assert receive(lane[2], PREFILL_RANK, "w", dst_cache.pools, coalesce([10]), TIMEOUT) == block_bytes(torch.float32)
    del lane
    status, sent = prefill.reply()
    assert status == "ok", sent
    for layer in range(LAYERS):
        assert torch.equal(dst_cache.pools[layer][10], src_cache.pools[layer][9])
        for d, s in ((7, 5), (8, 6)):  # real data up to the cut, zeros after
            want = src_cache.pools[layer][s] if layer < 2 else torch.zeros_like(src_cache.pools[layer][s])
            assert torch.equal(dst_cache.pools[layer][d], want), (layer, d)
    before = make_cache(DECODE_BLOCKS, torch.float32, DECODE_SEED)
    assert torch.equal(dst_cache.pools[0][3], before.pools[0][3])  # the cancelled one wrote nothing
    # The next transfers on the lanes the early ends used: in step, bit for bit.
    got, sent = transfer(host, decode, prefill, generation, "float32",
                         [(0, [11, 12], [20, 21]), (1, [13], [25])], dst_cache)
    assert got == sent == [2 * block_bytes(torch.float32), block_bytes(torch.float32)]
    for layer in range(LAYERS):
        for d, s in ((20, 11), (21, 12), (25, 13)):
            assert torch.equal(dst_cache.pools[layer][d], src_cache.pools[layer][s]), (layer, d)


def test_a_late_failure_of_an_old_generation_keeps_the_newer_one():
    """Dropping generation 3 after generation 5 is in use must not retire 5 (it did: `drop` retired the newest)."""
    with KVStoreHost("127.0.0.1", 0) as store:
        channels = PairChannels("d", local_store=store)
        with pytest.raises(KVTransferError):  # nobody joins: but 5 becomes the newest asked for
            channels.get("p", 5, store.address, DECODE_RANK, 0.2)
        channels.drop("p", 3)
        with pytest.raises(KVTransferError) as e:  # 5 may still be built: it times out, it is not refused
            channels.get("p", 5, store.address, DECODE_RANK, 0.2)
        assert "stale" not in str(e.value)
        with pytest.raises(KVTransferError, match="stale"):
            channels.get("p", 3, store.address, DECODE_RANK, 0.2)
        channels.close()


def test_a_prefill_node_that_never_joins_does_not_hold_up_another_ones_channel():
    """The decode side's rendezvous waits in a store client for the peer's key, and a client does one thing at
    a time: with one client for every peer, a prefill node that died before joining held every other prefill
    node's channel set-up until its own timed out (seen when a prefill node was killed under load)."""
    with KVStoreHost("127.0.0.1", 0) as store:
        decode, alive = PairChannels("d", local_store=store), PairChannels("p2")
        polling = threading.Event()  # set once the decode side waits for p1 to join

        def not_abandoned() -> bool:
            polling.set()
            return False

        with ThreadPoolExecutor(3) as pool:
            dead = pool.submit(decode.get, "p1", 1, store.address, DECODE_RANK, 8.0, 0, not_abandoned)  # never comes
            assert polling.wait(30)
            theirs = pool.submit(alive.get, "d", 1, store.address, PREFILL_RANK, 30.0)
            mine = pool.submit(decode.get, "p2", 1, store.address, DECODE_RANK, 30.0)
            done, _ = wait([mine, theirs, dead], return_when=FIRST_COMPLETED)
            assert dead not in done, "p2's channel waited for p1's rendezvous to time out"
            assert mine.result() is not None and theirs.result() is not None
            with pytest.raises(KVTransferError):
                dead.result()
        decode.close()
        alive.close()


def test_a_set_up_whose_transfer_is_abandoned_gives_up_before_its_timeout():
    """A prefill node that died before joining: its ReceiveKV call ends, the decode side's set-up sees the
    transfer abandoned and fails then, not at its timeout; a peer that does join later is served."""
    with KVStoreHost("127.0.0.1", 0) as store:
        decode, prefill = PairChannels("d", local_store=store), PairChannels("p1")
        polling, abandon = threading.Event(), threading.Event()

        def abandoned() -> bool:
            polling.set()
            return abandon.is_set()

        with ThreadPoolExecutor(2) as pool:
            waiting = pool.submit(decode.get, "p1", 1, store.address, DECODE_RANK, 90.0, 0, abandoned)
            assert polling.wait(30) and not waiting.done()
            abandon.set()
            with pytest.raises(KVTransferError, match="abandoned"):
                waiting.result(timeout=60)  # else it would wait out its 90 s
            theirs = pool.submit(prefill.get, "d", 2, store.address, PREFILL_RANK, 30.0)
            mine = pool.submit(decode.get, "p1", 2, store.address, DECODE_RANK, 30.0)
            assert mine.result() is not None and theirs.result() is not None
        decode.close()
        prefill.close()


def test_a_dead_decode_nodes_store_is_refused_at_once_not_after_the_timeout():
    """A decode node that died stays in the membership until its lease ends: transfers to it meanwhile must
    fail at once (its store's port refuses), not after a TCPStore client's connect retries (the timeout, 30 s
    by default: a request without migration waited 60 s for its UNAVAILABLE)."""
    gone = KVStoreHost("127.0.0.1", 0)
    address = gone.address
    gone.close()
    prefill = PairChannels("p")
    try:
        with ThreadPoolExecutor(1) as pool:
            attempt = pool.submit(prefill.next_generation, "d", address, 120.0)
            with pytest.raises(KVTransferError, match="cannot connect"):
                attempt.result(timeout=60)  # else it would retry for its 120 s
    finally:
        prefill.close()


def test_a_restarted_decode_store_counts_on_above_its_old_generations():
    """A decode node restarted under its id gets a new store: the generations it hands out must come after
    every one the old store did, or the prefill side, which remembers those, refuses them as stale."""
    prefill = PairChannels("p")
    first = KVStoreHost("127.0.0.1", 0)
    old = [prefill.next_generation("d", first.address, TIMEOUT) for _ in range(3)]
    address = first.address
    first.close()
    with pytest.raises(KVTransferError):  # the old store is gone: the connection is dropped, not kept
        prefill.next_generation("d", address, 2.0)
    port = int(address.rpartition(":")[2])
    second = KVStoreHost("127.0.0.1", port)  # the same address, as a restarted node would take it again
    try:
        new = prefill.next_generation("d", second.address, TIMEOUT)
        assert new > max(old), (new, old)
    finally:
        prefill.close()
        second.close()


def test_dropped_generations_leave_no_keys_in_the_store(host, decode, prefill, gens):
    """Each lane's rendezvous writes keys into the decode node's store; a superseded or dropped generation's
    are deleted, on every lane, so the store does not grow with every channel that failed."""
    dst_cache = make_cache(DECODE_BLOCKS, torch.float32, DECODE_SEED)

    def keys(generation: int, lane: int) -> list[str]:
        return [f"{pair_prefix(prefill.node_id, DECODE_ID, generation, lane)}/{k}" for k in _RENDEZVOUS_KEYS]

    def present(generation: int) -> list[int]:
        return [lane for lane in range(LANES_PER_PAIR) if host.store.check(keys(generation, lane))]

    counts, previous = [], None
    for i in range(6):
        generation = gens.new()
        transfer(host, decode, prefill, generation, "float32", [(0, [1], [2]), (1, [3], [4])], dst_cache)
        assert present(generation) == [0, 1]
        if previous is not None:
            assert present(previous) == []  # superseded (or dropped before): gone
        if i % 2:
            decode.drop(prefill.node_id, generation)
            assert present(generation) == []
        counts.append(host.store.num_keys())
        previous = generation
    assert counts[-1] <= counts[1], counts  # bounded: not one more set of keys per generation


def test_staging_shares_a_few_buffers_among_prompts_of_every_length_within_its_bound():
    """Layers of any shape take the smallest kept buffer that holds them, so a node that sees every prompt
    length keeps a few buffers, not one per shape; what is kept free never exceeds the bound, and a buffer a
    failed send may still be read by is never handed out again."""
    cpu, f32 = torch.device("cpu"), torch.float32
    staging = Staging(max_bytes=64 << 10)
    a = staging.take(torch.Size((4, 1024)), f32, cpu)
    b = staging.take(torch.Size((3, 1024)), f32, cpu)
    assert a.shape == (4, 1024) and b.shape == (3, 1024)
    staging.give([a, b])
    kept = staging.kept_bytes
    for rows in range(1, 5):  # every shorter prompt fits on what is kept: nothing new
        t = staging.take(torch.Size((rows, 1024)), f32, cpu)
        assert t.data_ptr() in (a.data_ptr(), b.data_ptr()) and t.shape == (rows, 1024)
        staging.give([t])
    assert staging.kept_bytes == kept
    staging.give([torch.empty(4, 1024)])  # not lent by it: ignored
    assert staging.kept_bytes == kept
    big = [staging.take(torch.Size((rows, 1024)), f32, cpu) for rows in (5, 9, 12)]
    staging.give(big)
    assert staging.kept_bytes <= staging.max_bytes  # the smallest went first
    failed = staging.take(torch.Size((2, 1024)), f32, cpu)
    staging.forget([failed])
    staging.give([failed])
    assert all(staging.take(torch.Size((1, 1024)), f32, cpu).data_ptr() != failed.data_ptr() for _ in range(3))


def test_staging_bytes_follow_from_the_pool_and_the_step():
    pools = [torch.zeros(8, 2, 16, 2, 64) for _ in range(6)]  # 6 layers, blocks of 16 tokens, 16 KiB each
    assert staging_bytes(pools, 4096) == 2 * 6 * 256 * 16 * 1024
    assert staging_bytes(pools, 17) == 2 * 6 * 2 * 16 * 1024


def test_a_closed_clusters_rendezvous_keys_are_named_by_its_secret():
    """With the member secret, a pair's rendezvous keys in the decode node's store are an HMAC of it: the plain
    names (what a caller without the secret would read or forge) are not there, and a prefill side with
    another secret never meets the decode side."""
    with KVStoreHost("127.0.0.1", 0) as store:
        decode = PairChannels("d", local_store=store, secret="s" * 64)
        member, outsider = PairChannels("p", secret="s" * 64), PairChannels("p", secret="x" * 64)
        with ThreadPoolExecutor(2) as pool:
            theirs = pool.submit(member.get, "d", 1, store.address, PREFILL_RANK, 30.0)
            mine = pool.submit(decode.get, "p", 1, store.address, DECODE_RANK, 30.0)
            assert mine.result() is not None and theirs.result() is not None
        assert not store.store.check([f"{pair_prefix('p', 'd', 1, 0)}/{_RENDEZVOUS_KEYS[0]}"])
        assert store.store.check([f"{pair_prefix('p', 'd', 1, 0, 's' * 64)}/{_RENDEZVOUS_KEYS[0]}"])
        with ThreadPoolExecutor(2) as pool:
            theirs = pool.submit(outsider.get, "d", 2, store.address, PREFILL_RANK, 1.0)
            mine = pool.submit(decode.get, "p", 2, store.address, DECODE_RANK, 1.0)
            with pytest.raises(KVTransferError):
                mine.result()
            with pytest.raises(KVTransferError):
                theirs.result()
        for channels in (decode, member, outsider):
            channels.close()
