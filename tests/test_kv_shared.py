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
from baton.kvtransfer.shared import (
    SHM_DIR, SHM_PREFIX, SharedWriter, allocate_shm, device_id, open_shared, remove_stale_shm, share,
)

SHAPE = (3, 10, 2, 4, 2, 8)  # layers, blocks, K/V, block size, kv heads, head dim


def _writer(pool_desc, src_blocks, dst_blocks, done) -> None:
    target = open_shared(pool_desc, "cpu")
    g = torch.Generator().manual_seed(7)
    local = torch.randn(SHAPE[1:], generator=g)  # this process's own pool (one layer's shape)
    writer = SharedWriter(target, dst_blocks, SHAPE[0])
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
    writer = SharedWriter(open_shared(share(storage, path), "cpu"), [1, 2], SHAPE[0])
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
