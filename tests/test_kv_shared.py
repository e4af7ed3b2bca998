"""The same-device KV path on a CPU (a /dev/shm file standing for a CUDA IPC handle): one process's pool,
mapped by another, written layer by layer through the blocks the reservation named."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys

import pytest
import torch

from baton.kvtransfer.channel import KVTransferError
from baton.engine.shm import SHM_DIR, SHM_PREFIX, allocate_shm, remove_stale_shm
from baton.kvtransfer.shared import SharedWriter, device_id, open_shared, share

SHAPE = (3, 10, 2, 4, 2, 8)  # layers, blocks, K/V, block size, kv heads, head dim


def _writer(pool_desc, src_blocks, dst_blocks, done) -> None:
    target = open_shared(pool_desc, "cpu")
    g = torch.Generator().manual_seed(7)
    local = torch.randn(SHAPE[1:], generator=g)  # this process's own pool (one layer's shape)
    writer = SharedWriter([(target, 0, SHAPE[4])], dst_blocks, SHAPE[0])
    writer.begin(src_blocks, local)
    for layer in range(SHAPE[0]):
        writer.send_layer(layer, local * (layer + 1))
    done.put(writer.wait(5.0))


def test_another_process_writes_into_the_reserved_blocks():
    storage, path = allocate_shm(SHAPE, torch.float32, "test")
    storage.fill_(-1.0)
    desc = share(storage, path)
    assert desc.device_id == device_id("cpu")
    src, dst = [4, 0, 7], [9, 2, 3]
    ctx = mp.get_context("spawn")
    done = ctx.Queue()
    proc = ctx.Process(target=_writer, args=(desc, src, dst, done))
    proc.start()
    try:
        nbytes = done.get(timeout=60)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    local = torch.randn(SHAPE[1:], generator=torch.Generator().manual_seed(7))
    for layer in range(SHAPE[0]):
        torch.testing.assert_close(storage[layer, dst], local[src] * (layer + 1), rtol=0, atol=0)
        untouched = [b for b in range(SHAPE[1]) if b not in dst]
        assert bool((storage[layer, untouched] == -1.0).all())
    assert nbytes == SHAPE[0] * len(src) * storage[0, 0].numel() * 4


def test_a_writer_that_ends_early_says_so():
    storage, path = allocate_shm(SHAPE, torch.float32, "early")
    writer = SharedWriter([(open_shared(share(storage, path), "cpu"), 0, SHAPE[4])], [1, 2], SHAPE[0])
    writer.begin([0, 1], torch.zeros(SHAPE[1:]))
    writer.send_layer(0, torch.zeros(SHAPE[1:]))
    with pytest.raises(ValueError, match="out of order"):
        writer.send_layer(2, torch.zeros(SHAPE[1:]))
    writer.end_early()
    assert not writer.complete
    with pytest.raises(KVTransferError, match="1 of 3 layers"):
        writer.wait(1.0)


def test_a_pool_on_another_device_is_refused():
    storage, path = allocate_shm(SHAPE, torch.float32, "other")
    desc = share(storage, path)
    elsewhere = type(desc)(**{f: getattr(desc, f) for f in desc.__slots__} | {"device_id": "cpu@another-host"})
    with pytest.raises(ValueError, match="another-host"):
        open_shared(elsewhere, "cpu")


def test_the_shm_file_goes_with_its_storage_and_stale_ones_are_removed():
    storage, path = allocate_shm(SHAPE, torch.float32, "gone")
    assert os.path.exists(path)
    del storage
    assert not os.path.exists(path)
    # A process killed with its file still there: its pid no longer runs.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = SHM_DIR / f"{SHM_PREFIX}{dead}-kv"
    stale.write_bytes(b"x")
    mine, mine_path = allocate_shm(SHAPE, torch.float32, "alive")
    assert remove_stale_shm() >= 1
    assert not stale.exists() and os.path.exists(mine_path)


# -- the whole cluster with --kv-path shared on one CPU host ------------------------------------------------


def test_a_cluster_with_the_shared_path_serves_token_for_token_and_frees_every_block(stories_path, stories_llm,
                                                                                   tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from baton.engine import SamplingParams
    from baton.router.client import BatonClient, DeadlineExceeded

    from cluster_harness import BatonUp

    prompts = ["Once upon a time", "The little dog", "Lily wanted to play with the big red ball, but", "Sue"] * 3
    with BatonUp(tmp_path, "--model", str(stories_path), "--kv-path", "shared") as up:
        [decode], [prefill] = up.nodes("decode"), up.nodes("prefill")
        with BatonClient(up.address, timeout=60) as client, ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda p: client.complete(p, max_tokens=40, temperature=0), prompts))
            for prompt, out in zip(prompts, got):
                want = stories_llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0))[0]
                assert out.token_ids == want.token_ids, prompt
            # Cancelled mid-stream by a deadline: its blocks come back too.
            with pytest.raises(DeadlineExceeded):
                for _ in client.generate(prompts[0], max_tokens=480, ignore_eos=True, temperature=0, timeout=0.3):
                    pass
        up.wait_until(lambda: (s := up.stats(decode)).free_blocks == s.total_blocks and not s.running, timeout=10)
        sent, received = up.stats(prefill).kv_bytes_sent, up.stats(decode).kv_bytes_received
        assert sent == received > 0
        logs = "".join(p.read_text() for p in tmp_path.glob("*.log"))
        assert "kv path to decode-0: shared memory on cpu@" in logs and "pair channel" not in logs
        decode_pid = up.node_pid("decode-0")
        assert list(SHM_DIR.glob(f"{SHM_PREFIX}{decode_pid}-*"))  # its KV storage
    assert not up.hung and up.leftovers == [] and up.returncode == 0
    assert not list(SHM_DIR.glob(f"{SHM_PREFIX}{decode_pid}-*"))  # gone with the node


# -- the decode node's side of the protocol, in process ------------------------------------------------------


def test_the_decode_node_holds_shared_writes_as_receiving_until_kv_written(stories_path):
    import asyncio
    import time

    import grpc

    from baton.decode.server import DecodeServicer
    from baton.engine import LLM
    from baton.engine.async_engine import AsyncEngine
    from baton.v1 import node_pb2, node_pb2_grpc

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        engine = AsyncEngine(await asyncio.to_thread(
            lambda: LLM(str(stories_path), num_kv_blocks=32, share_kv_cache=True).engine), loop)
        plain_engine = AsyncEngine(await asyncio.to_thread(lambda: LLM(str(stories_path), num_kv_blocks=8).engine),
                                   loop)
        shared = DecodeServicer("decode-0", "decode", engine, None, transfer_timeout=1.0)
        plain = DecodeServicer("decode-1", "decode", plain_engine, None)
        servers = []
        try:
            stubs = []
            for servicer in (shared, plain):
                server = grpc.aio.server()
                node_pb2_grpc.add_DecodeNodeServicer_to_server(servicer, server)
                port = server.add_insecure_port("127.0.0.1:0")
                await server.start()
                servers.append(server)
                stubs.append(node_pb2_grpc.DecodeNodeStub(grpc.aio.insecure_channel(f"127.0.0.1:{port}")))
            stub, plain_stub = stubs

            async def reserve(s, rid):
                return (await s.Reserve(node_pb2.ReserveRequest(request_id=rid, prompt_tokens=20, max_tokens=4))).target

            def begin(rid, r, block_ids=None):
                return node_pb2.ReceiveKVRequest(request_id=rid, prefill_node_id="p", layout=r.layout, num_tokens=20,
                                                 block_ids=r.block_ids if block_ids is None else block_ids, shared=True)

            async def stats(s):
                return await s.GetStats(node_pb2.GetStatsRequest())

            async def code_of(call) -> grpc.StatusCode:
                try:
                    await call
                except grpc.aio.AioRpcError as e:
                    return e.code()
                return grpc.StatusCode.OK

            total = (await stats(stub)).total_blocks
            r = await reserve(stub, "a")
            assert r.share.device_id.startswith("cpu@") and r.share.shm_path
            assert not (await reserve(plain_stub, "z")).HasField("share")
            assert await code_of(plain_stub.ReceiveKV(begin("z", r))) == grpc.StatusCode.FAILED_PRECONDITION
            assert await code_of(stub.KVWritten(node_pb2.KVWrittenRequest(request_id="a", ok=True))) == \
                grpc.StatusCode.NOT_FOUND  # no write begun
            assert await code_of(stub.ReceiveKV(begin("a", r, block_ids=list(r.block_ids)[::-1]))) == \
                grpc.StatusCode.INVALID_ARGUMENT

            # A release while the prefill node writes waits for its writes to end.
            await stub.ReceiveKV(begin("a", r))
            assert (await stub.Release(node_pb2.ReleaseRequest(request_id="a"))).freed_blocks == 0
            assert (await stats(stub)).free_blocks == total - len(r.block_ids)
            await stub.KVWritten(node_pb2.KVWrittenRequest(request_id="a", prefill_node_id="p", ok=True))
            assert (await stats(stub)).free_blocks == total

            # Given up: the blocks go at once.
            r = await reserve(stub, "b")
            await stub.ReceiveKV(begin("b", r))
            await stub.KVWritten(node_pb2.KVWrittenRequest(request_id="b", prefill_node_id="p", ok=False))
            assert (await stats(stub)).free_blocks == total

            # Never ended: the transfer timeout (1 s here) frees them.
            r = await reserve(stub, "c")
            await stub.ReceiveKV(begin("c", r))
            start = time.monotonic()
            while (await stats(stub)).free_blocks != total:
                assert time.monotonic() - start < 20, "the write deadline never freed the blocks"
                await asyncio.sleep(0.05)
        finally:
            for server in servers:
                await server.stop(grace=None)
            for servicer in (shared, plain):
                await servicer.close()
            await engine.close()
            await plain_engine.close()

    asyncio.run(scenario())
