"""The prefix cache's second tier: cached blocks evicted from the KV pool keep their K/V here, in a larger and
slower store, and a prompt that names one copies it back into the pool instead of computing it again.

The store sits beside the pool it serves: pinned host memory beside a GPU pool (copies over PCIe), a file on
local disk beside a CPU pool (mapped shared: the page cache holds what fits, the disk the rest; the file is
unlinked at once, so nothing is left behind however the process ends). Its size is `--kv-offload-bytes`; its
slots are whole blocks, every layer's K and V, and the least recently stored or used goes first when it is full.

Only the block manager calls it, on the engine thread (`BlockManager`: `store` as it evicts a cached block,
`load` as a prompt's match reaches a name that is here), while nothing else writes the pool's blocks involved:
an evicted block is being taken for other contents, a restored one was free. One rank only so far: a
tensor-parallel node's other ranks hold their heads in pools of their own processes.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections import OrderedDict
from collections.abc import Sequence

import torch

from .errors import ConfigError


class OffloadTier:
    def __init__(self, pools: Sequence[torch.Tensor], capacity_bytes: int, directory: str | None = None) -> None:
        """`pools`: the KV pool's layers, each [blocks, 2, block_size, kv_heads, head_dim]; `capacity_bytes`:
        the store's size (whole blocks of it are used); `directory`: where a CPU pool's file goes (default: the
        system's temporary folder)."""
        self.pools = list(pools)
        first = self.pools[0]
        self.block_shape = (len(self.pools), *first.shape[1:])
        block_bytes = math.prod(self.block_shape) * first.element_size()
        self.slots = capacity_bytes // block_bytes
        if self.slots < 1:
            raise ConfigError("kv_offload_bytes", f"{capacity_bytes} bytes hold no block (one is {block_bytes})")
        numel = self.slots * math.prod(self.block_shape)
        if first.device.type == "cuda":
            store = torch.empty(numel, dtype=first.dtype, pin_memory=True)
        else:
            fd, path = tempfile.mkstemp(prefix="baton-kv-offload-", dir=directory)
            try:
                os.ftruncate(fd, numel * first.element_size())
                store = torch.from_file(path, shared=True, size=numel, dtype=first.dtype)
            finally:
                os.close(fd)
                os.unlink(path)  # the mapping keeps the file alive; nothing stays on disk after
        self.store_tensor = store.view(self.slots, *self.block_shape)
        self.bytes = self.slots * block_bytes
        self._slot_of: OrderedDict[bytes, int] = OrderedDict()  # name -> slot, least recently used first
        self._parent: dict[bytes, bytes] = {}
        self._free = list(range(self.slots))
        self.stored = 0  # blocks written here, since the start
        self.loaded = 0  # blocks copied back into the pool

    def __contains__(self, name: bytes) -> bool:
        return name in self._slot_of

    def __len__(self) -> int:
        return len(self._slot_of)

    def store(self, name: bytes, parent: bytes, block: int) -> None:
        """Keeps the K/V of pool block `block` under `name` (the least recently used entry goes if full)."""
        if name in self._slot_of:
            self._slot_of.move_to_end(name)
            return
        if self._free:
            slot = self._free.pop()
        else:
            old, slot = self._slot_of.popitem(last=False)
            del self._parent[old]
        slot_view = self.store_tensor[slot]
        for layer, pool in enumerate(self.pools):
            slot_view[layer].copy_(pool[block])
        self._slot_of[name] = slot
        self._parent[name] = parent
        self.stored += 1

    def load(self, name: bytes, block: int) -> bytes:
        """Copies `name`'s K/V into pool block `block`; returns its parent's name. It stays here too."""
        slot = self._slot_of[name]
        self._slot_of.move_to_end(name)
        slot_view = self.store_tensor[slot]
        for layer, pool in enumerate(self.pools):
            pool[block].copy_(slot_view[layer])
        self.loaded += 1
        return self._parent[name]

    def clear(self) -> int:
        """Forgets everything; returns how many blocks were here."""
        n = len(self._slot_of)
        self._free = list(range(self.slots))
        self._slot_of.clear()
        self._parent.clear()
        return n
