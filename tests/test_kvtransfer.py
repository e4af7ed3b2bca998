"""KV transfer over real pair channels: spawned prefill processes, real gloo groups, no mocks.

The pytest process plays the decode node (it hosts the KV store, owns a pool and receives on worker threads);
each prefill node is a spawned process with its own pool and its own block ids, driven over a pipe.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

from baton.engine.model_runner import KVCache
from baton.kvtransfer.channel import (DECODE_RANK, PREFILL_RANK, KVStoreHost, KVTransferError, PairChannels,
                                      TransferCancelled)
from baton.kvtransfer.receiver import receive
from baton.kvtransfer.sender import KVSender, Staging, coalesce

LAYERS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 4, 16, 2, 32
DECODE_BLOCKS, PREFILL_BLOCKS = 40, 48
DECODE_SEED, PREFILL_SEED = 1, 2
DECODE_ID = "decode-0"
TIMEOUT = 20.0  # generous: every failure below must come much sooner
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_cache(num_blocks: int, dtype: torch.dtype, seed: int) -> KVCache:
    """The engine's own KV layout, every element filled with a reproducible pattern."""
    cfg = SimpleNamespace(num_layers=LAYERS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    cache = KVCache(cfg, num_blocks, BLOCK_SIZE, dtype, "cpu")
    gen = torch.Generator().manual_seed(seed)
    cache.storage.copy_(torch.randn(cache.storage.shape, generator=gen).to(dtype))
    return cache


def block_bytes(dtype: torch.dtype) -> int:
    cfg = SimpleNamespace(num_layers=LAYERS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    return KVCache.bytes_per_block(cfg, BLOCK_SIZE, dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


# -- the prefill node (spawned) --------------------------------------------------------------------------

def prefill_main(node_id: str, conn) -> None:
    torch.set_num_threads(1)
    channels = PairChannels(node_id)
    caches = {name: make_cache(PREFILL_BLOCKS, dt, PREFILL_SEED) for name, dt in DTYPES.items()}
    while True:
        msg = conn.recv()
        if msg is None:
            break
        try:
            if msg["op"] == "next_generation":
                conn.send(("ok", channels.next_generation(DECODE_ID, msg["store"], TIMEOUT)))
                continue
            pg = channels.get(DECODE_ID, msg["generation"], msg["store"], PREFILL_RANK, TIMEOUT)
            result = None
            if msg["op"] == "send":
                pools = caches[msg["dtype"]].pools
                senders = [KVSender(pg, DECODE_RANK, t["tag"], t["src"], t["runs"], num_layers=LAYERS,
                                    pool=pools[0] if t.get("early_header") else None)
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
    """Runs `transfers` ([(tag, src ids, dst ids)]) concurrently on one pair; returns the decode side's bytes."""
    # Every other transfer posts its header when the sender is made (before layer 0), the others with layer 0.
    msg_transfers = [{"tag": tag, "src": src, "runs": coalesce(dst), "early_header": i % 2 == 1}
                     for i, (tag, src, dst) in enumerate(transfers)]
    prefill.post(op="send", generation=generation, store=host.address, dtype=dtype, transfers=msg_transfers)

    def recv_one(tag, dst):
        return receive(decode.get(prefill.node_id, generation, host.address, DECODE_RANK, timeout),
                       PREFILL_RANK, tag, pool_cache.pools, coalesce(dst), timeout)

    with ThreadPoolExecutor(len(transfers)) as pool:
        futures = [pool.submit(recv_one, tag, dst) for tag, _, dst in transfers]
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


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_prompt_blocks_land_in_reserved_blocks(host, decode, prefill, gens, dtype):
    dt = DTYPES[dtype]
    prompt_len = 100
    used = math.ceil(prompt_len / BLOCK_SIZE)  # 7 blocks
    reserved = [12, 13, 14, 15, 16, 17, 18, 19, 20, 21]  # reserved for prompt + decode: 10 blocks
    src = [30, 31, 32, 33, 34, 35, 36, 37]  # the prefill node's table for the same prompt
    dst_cache = make_cache(DECODE_BLOCKS, dt, DECODE_SEED)
    before = make_cache(DECODE_BLOCKS, dt, DECODE_SEED)
    got, sent = transfer(host, decode, prefill, gens.new(), dtype, [(7, src[:used], reserved[:used])], dst_cache)
    assert got == sent == [used * block_bytes(dt)]
    check_pool(dst_cache, before, make_cache(PREFILL_BLOCKS, dt, PREFILL_SEED), list(zip(src[:used], reserved)))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_fragmented_ids_and_two_concurrent_transfers(host, decode, prefill, gens, dtype):
    dt = DTYPES[dtype]
    # Request A: destination in 4 runs; sources partly consecutive (sent from the pool), partly scattered.
    a_src, a_dst = [10, 11, 12, 30, 0, 5, 2], [3, 4, 5, 9, 20, 21, 7]
    # Request B, on the same pair at the same time, under another tag.
    b_src, b_dst = [40, 41, 42, 43, 1], [33, 34, 0, 1, 38]
    assert len(coalesce(a_dst)) == 4 and len(coalesce(b_dst)) == 3
    dst_cache = make_cache(DECODE_BLOCKS, dt, DECODE_SEED)
    before = make_cache(DECODE_BLOCKS, dt, DECODE_SEED)
    got, sent = transfer(host, decode, prefill, gens.new(), dtype,
                         [(101, a_src, a_dst), (102, b_src, b_dst)], dst_cache)
    assert got == sent == [len(a_src) * block_bytes(dt), len(b_src) * block_bytes(dt)]
    check_pool(dst_cache, before, make_cache(PREFILL_BLOCKS, dt, PREFILL_SEED),
               list(zip(a_src, a_dst)) + list(zip(b_src, b_dst)))


@pytest.mark.parametrize("wrong", ["dtype", "block ids"])
def test_mismatched_sender_is_refused_not_fatal(host, decode, prefill, gens, wrong):
    """gloo kills the receiving process when a message is larger than its recv (and silently accepts a shorter
    one): the header must turn any disagreement into a KVTransferError, with the pool untouched."""
    generation = gens.new()
    dst = [3, 4, 5]
    sent_dst = dst if wrong == "dtype" else [3, 4, 9]
    prefill.post(op="send", generation=generation, store=host.address,
                 dtype="bfloat16" if wrong == "dtype" else "float32",
                 transfers=[{"tag": 77, "src": [1, 2, 3], "runs": coalesce(sent_dst)}])
    dst_cache = make_cache(DECODE_BLOCKS, torch.float32, DECODE_SEED)
    with pytest.raises(KVTransferError, match="disagree on (dtype|runs|block ids)"):
        receive(decode.get(prefill.node_id, generation, host.address, DECODE_RANK, TIMEOUT),
                PREFILL_RANK, 77, dst_cache.pools, coalesce(dst), TIMEOUT)
    decode.drop(prefill.node_id)  # the last reference: the group closes, the sender fails at once
    t0 = time.monotonic()
    status, detail = prefill.reply()
    assert status == "error" and "KVTransferError" in detail
    assert time.monotonic() - t0 < TIMEOUT / 2  # promptly: not at the sender's timeout
    check_pool(dst_cache, make_cache(DECODE_BLOCKS, torch.float32, DECODE_SEED), dst_cache, [])


def test_group_is_reused_within_a_generation(host, decode, prefill, gens):
    generation = gens.new()
    dst_cache = make_cache(DECODE_BLOCKS, torch.float32, DECODE_SEED)
    transfer(host, decode, prefill, generation, "float32", [(1, [0, 1], [2, 3])], dst_cache)
    pg = decode.get(prefill.node_id, generation, host.address, DECODE_RANK, 1.0)  # cached: returns at once
    transfer(host, decode, prefill, generation, "float32", [(2, [4], [5])], dst_cache)
    assert decode.get(prefill.node_id, generation, host.address, DECODE_RANK, 1.0) is pg


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
        receive(pg, PREFILL_RANK, 55, dst_cache.pools, [(0, 1)], 0.5)
    assert time.monotonic() - t0 < TIMEOUT / 2  # promptly: not at the sender's timeout
    decode.drop(prefill.node_id)
    with pytest.raises(KVTransferError, match="stale"):  # its rendezvous keys are spent
        decode.get(prefill.node_id, generation, host.address, DECODE_RANK, 1.0)
    before = make_cache(DECODE_BLOCKS, torch.float32, DECODE_SEED)
    dst_cache = make_cache(DECODE_BLOCKS, torch.float32, DECODE_SEED)
    transfer(host, decode, prefill, gens.new(), "float32", [(56, [8, 9], [0, 1])], dst_cache)
    check_pool(dst_cache, before, make_cache(PREFILL_BLOCKS, torch.float32, PREFILL_SEED), [(8, 0), (9, 1)])


def test_killed_prefill_fails_receive_at_once_then_new_generation_works(host, decode):
    node_id = "prefill-killed"
    dst_cache = make_cache(DECODE_BLOCKS, torch.float32, DECODE_SEED)
    before = make_cache(DECODE_BLOCKS, torch.float32, DECODE_SEED)
    src, dst = [1, 2, 3, 20], [10, 11, 12, 30]
    victim = Prefill(node_id)
    try:
        generation = victim.next_generation(host.address)
        victim.post(op="send", generation=generation, store=host.address, dtype="float32", stall_after_layer=0,
                    transfers=[{"tag": 9, "src": src, "runs": coalesce(dst)}])
        outcome: dict = {}

        def recv() -> None:
            pg = decode.get(node_id, generation, host.address, DECODE_RANK, TIMEOUT)
            try:
                receive(pg, PREFILL_RANK, 9, dst_cache.pools, coalesce(dst), TIMEOUT)
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
        got, sent = transfer(host, decode, reborn, new_generation, "float32", [(9, src, dst)], dst_cache)
        assert got == sent == [len(src) * block_bytes(torch.float32)]
        check_pool(dst_cache, before, make_cache(PREFILL_BLOCKS, torch.float32, PREFILL_SEED),
                   list(zip(src, dst)))
    finally:
        reborn.stop()


def test_a_transfer_ended_early_leaves_the_channel_in_step(host, decode, prefill, gens):
    """A request cancelled before its prompt was computed sends a cancel header; one cut short after its header
    sends zeros for the layers it owed. Neither breaks the pair: a transfer on the same group right after works
    and lands bit for bit, and so does one that ran beside them."""
    generation = gens.new()
    dst_cache = make_cache(DECODE_BLOCKS, torch.float32, DECODE_SEED)
    src_cache = make_cache(PREFILL_BLOCKS, torch.float32, PREFILL_SEED)
    transfers = [
        {"tag": 301, "src": [1, 2], "runs": coalesce([3, 4]), "end_at": 0},  # never began: cancel header
        {"tag": 302, "src": [5, 6], "runs": coalesce([7, 8]), "end_at": 2, "early_header": True},  # padded
        {"tag": 303, "src": [9], "runs": coalesce([10])},  # whole, beside them
    ]
    prefill.post(op="send", generation=generation, store=host.address, dtype="float32", transfers=transfers)
    pg = decode.get(prefill.node_id, generation, host.address, DECODE_RANK, TIMEOUT)
    with pytest.raises(TransferCancelled):
        receive(pg, PREFILL_RANK, 301, dst_cache.pools, coalesce([3, 4]), TIMEOUT)
    assert receive(pg, PREFILL_RANK, 302, dst_cache.pools, coalesce([7, 8]), TIMEOUT) == 2 * LAYERS * block_bytes(
        torch.float32) // LAYERS
    assert receive(pg, PREFILL_RANK, 303, dst_cache.pools, coalesce([10]), TIMEOUT) == block_bytes(torch.float32)
    status, sent = prefill.reply()
    assert status == "ok", sent
    for layer in range(LAYERS):
        assert torch.equal(dst_cache.pools[layer][10], src_cache.pools[layer][9])
        for d, s in ((7, 5), (8, 6)):  # real data up to the cut, zeros after
            want = src_cache.pools[layer][s] if layer < 2 else torch.zeros_like(src_cache.pools[layer][s])
            assert torch.equal(dst_cache.pools[layer][d], want), (layer, d)
    before = make_cache(DECODE_BLOCKS, torch.float32, DECODE_SEED)
    assert torch.equal(dst_cache.pools[0][3], before.pools[0][3])  # the cancelled one wrote nothing
    got, sent = transfer(host, decode, prefill, generation, "float32", [(304, [11, 12], [20, 21])], dst_cache)
    assert got == sent == [2 * block_bytes(torch.float32)]


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
    """Each generation's rendezvous writes keys into the decode node's store; superseded or dropped ones are
    deleted, so the store does not grow with every channel that failed."""
    dst_cache = make_cache(DECODE_BLOCKS, torch.float32, DECODE_SEED)
    counts = []
    for i in range(6):
        generation = gens.new()
        transfer(host, decode, prefill, generation, "float32", [(400 + i, [1], [2])], dst_cache)
        if i % 2:
            decode.drop(prefill.node_id, generation)
        counts.append(host.store.num_keys())
    assert counts[-1] <= counts[1], counts  # bounded: not one more set of keys per generation


def test_staging_reuses_packed_buffers_within_its_bound():
    staging = Staging(max_bytes=3 * 4096 * 4)
    shape = torch.Size((4, 1024))
    a, b = staging.take(shape, torch.float32, torch.device("cpu")), staging.take(shape, torch.float32,
                                                                                 torch.device("cpu"))
    staging.give([a, b])
    again = staging.take(shape, torch.float32, torch.device("cpu"))
    assert again.data_ptr() in (a.data_ptr(), b.data_ptr())  # reused, not allocated anew
    other = staging.take(torch.Size((2, 1024)), torch.float32, torch.device("cpu"))
    assert other.data_ptr() not in (a.data_ptr(), b.data_ptr())  # another shape: its own buffer
    staging.give([again, other, torch.empty(4, 1024)])  # past the bound: the last one is not kept
    assert staging._kept <= staging.max_bytes
