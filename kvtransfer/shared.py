"""The same-device KV path: a prefill node writes straight into the decode node's pool, mapped into its own
process, when both nodes' pools live on one device.

NCCL refuses two ranks on one GPU, so a prefill and a decode process sharing a GPU (a single-GPU host, a MIG
slice) cannot use the pair channel. Instead the decode node shares its KV storage: on CUDA through a CUDA IPC
handle of the allocation, on a CPU through a file in /dev/shm that holds the storage. The prefill node maps
it once per decode node and, as each layer is done, copies the prompt's blocks into the reserved blocks with
one indexed copy on its own stream: the layer-by-layer overlap stays, and no byte crosses a socket. It then
waits for its copies (one event) before it tells the decode node that the K/V are in place. A tensor-parallel
decode node shares one storage per rank, and each rank gets only its KV heads (`engine.parallel.kv_routes`).

`device_id` names where a pool lives, host included (a boot id): two nodes whose pools have the same id can
use this path. The choice between this path and the pair channel is the prefill node's (prefill/server.py).
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from .channel import KVTransferError

def _host_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return socket.gethostname()


def device_id(device: torch.device | str) -> str:
    """Where memory on `device` lives, across processes: the GPU's UUID (the same physical GPU whatever
    CUDA_VISIBLE_DEVICES numbers it), or "cpu", with the host's boot id."""
    device = torch.device(device)
    if device.type == "cuda":
        uuid = torch.cuda.get_device_properties(device).uuid
        return f"cuda:{uuid}@{_host_id()}"
    return f"cpu@{_host_id()}"


@dataclass(frozen=True, slots=True)
class SharedPool:
    """How another process on the same device maps a node's KV storage (`[num_layers, num_blocks, 2,
    block_size, kv_heads, head_dim]`, contiguous). CUDA: the fields of `torch`'s own IPC reduction of the
    storage; CPU: the /dev/shm file that holds it."""

    device_id: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    shm_path: str = ""
    cuda_handle: bytes = b""
    storage_size: int = 0
    storage_offset: int = 0
    ref_counter_handle: bytes = b""
    ref_counter_offset: int = 0
    event_handle: bytes = b""
    event_sync_required: bool = False
    tensor_offset: int = 0


def encode(pool: SharedPool) -> bytes:
    """A description as bytes (JSON), for passing between a node's ranks through their store."""
    fields = {f: getattr(pool, f) for f in pool.__slots__}
    fields["dtype"] = str(pool.dtype).removeprefix("torch.")
    for f in ("cuda_handle", "ref_counter_handle", "event_handle"):
        fields[f] = fields[f].hex()
    return json.dumps(fields).encode()


def decode(data: bytes) -> SharedPool:
    fields = json.loads(data)
    fields["dtype"] = getattr(torch, fields["dtype"])
    fields["shape"] = tuple(fields["shape"])
    for f in ("cuda_handle", "ref_counter_handle", "event_handle"):
        fields[f] = bytes.fromhex(fields[f])
    return SharedPool(**fields)


def share(storage: torch.Tensor, shm_path: str = "") -> SharedPool:
    """The description another process maps `storage` from (CUDA: any allocation; CPU: one made by
    `engine.shm.allocate_shm`, whose path is given)."""
    if not storage.is_contiguous():
        raise ValueError("the KV storage must be contiguous to be shared")
    if storage.device.type == "cuda":
        from torch.multiprocessing.reductions import reduce_tensor

        _, args = reduce_tensor(storage)
        # (cls, size, stride, offset, storage cls, dtype, device, handle, size bytes, offset bytes, grad,
        #  ref counter handle, ref counter offset, event handle, event sync required)
        return SharedPool(device_id(storage.device), tuple(storage.shape), storage.dtype,
                          cuda_handle=args[7], storage_size=args[8], storage_offset=args[9],
                          ref_counter_handle=args[11], ref_counter_offset=args[12], event_handle=args[13] or b"",
                          event_sync_required=bool(args[14]), tensor_offset=args[3])
    if not shm_path:
        raise ValueError("a CPU KV storage is shared through its /dev/shm file: allocate it with engine.shm.allocate_shm")
    return SharedPool(device_id("cpu"), tuple(storage.shape), storage.dtype, shm_path=shm_path)


def open_shared(pool: SharedPool, device: torch.device | str) -> torch.Tensor:
    """Maps another process's KV storage into this one (on `device`, which must be the same device)."""
    device = torch.device(device)
    if device_id(device) != pool.device_id:
        raise ValueError(f"the pool lives on {pool.device_id}, this process's device is {device_id(device)}")
    if device.type == "cuda":
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        stride = torch.empty(pool.shape, device="meta").stride()
        return rebuild_cuda_tensor(
            torch.Tensor, torch.Size(pool.shape), stride, pool.tensor_offset, torch.storage.UntypedStorage,
            pool.dtype, device.index if device.index is not None else torch.cuda.current_device(),
            pool.cuda_handle, pool.storage_size, pool.storage_offset, False, pool.ref_counter_handle,
            pool.ref_counter_offset, pool.event_handle or None, pool.event_sync_required)
    numel = 1
    for s in pool.shape:
        numel *= s
    return torch.from_file(pool.shm_path, shared=True, size=numel, dtype=pool.dtype).view(pool.shape)


class SharedWriter:
    """One request's prompt K/V, copied layer by layer into the decode node's mapped pools: the same verbs as
    the pair channel's `KVSender` (begin, send_layer, end_early, wait), so the prefill node's KV sink drives
    either. `targets`: (a decode rank's mapped storage, the range of this node's KV heads it holds), one per
    decode rank (`engine.parallel.kv_routes`); without tensor parallelism, one target with every head. An
    early end owes nothing (no peer waits for messages); the decode node learns the outcome from the prefill
    node's call, and frees the blocks if the K/V did not all arrive."""

    def __init__(self, targets: list[tuple[torch.Tensor, int, int]], dst_blocks: list[int], num_layers: int) -> None:
        self.targets = targets  # each [num_layers, num_blocks, 2, block_size, its kv heads, head_dim], mapped
        self.num_layers = num_layers
        self._dst = torch.tensor(dst_blocks, dtype=torch.long, device=targets[0][0].device)
        self._src: torch.Tensor | None = None
        self._next_layer = 0
        self._event = None
        self.header = None  # set once begun (the KV sink posts layers only for begun transfers)
        self.bytes_posted = 0
        self.failed: Exception | None = None
        self.ended_early = False

    @property
    def num_blocks(self) -> int:
        return len(self._dst)

    @property
    def complete(self) -> bool:
        return self.failed is None and not self.ended_early and self._next_layer == self.num_layers

    def begin(self, src_blocks: list[int], pool: torch.Tensor) -> None:
        if len(src_blocks) != self.num_blocks:
            raise ValueError(f"{len(src_blocks)} source blocks for {self.num_blocks} destination blocks")
        for target, first, last in self.targets:
            want = (*pool.shape[1:3], last - first, pool.shape[4])
            if tuple(target.shape[2:]) != want or pool.dtype != target.dtype or last > pool.shape[3]:
                raise ValueError(f"pool {tuple(pool.shape)} {pool.dtype} heads [{first}, {last}) do not fit the "
                                 f"target's blocks {tuple(target.shape[2:])} {target.dtype}")
        self._src = torch.tensor(src_blocks, dtype=torch.long, device=pool.device)
        self.header = True

    def send_layer(self, layer: int, pool: torch.Tensor) -> None:
        if self._src is None:
            raise ValueError("send_layer before begin")
        if layer != self._next_layer:
            raise ValueError(f"layer {layer} sent out of order (expected {self._next_layer})")
        # One gather, then one scatter per decode rank of its heads, on this process's stream, queued behind
        # the layer's own kernels.
        blocks = pool.index_select(0, self._src)
        for target, first, last in self.targets:
            part = blocks[:, :, :, first:last]
            target[layer].index_copy_(0, self._dst, part)
            self.bytes_posted += part.numel() * part.element_size()
        self._next_layer += 1
        if self._next_layer == self.num_layers and pool.device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()

    def end_early(self) -> None:
        """The transfer stops short (call once nothing else will post for it). Copies already queued on the
        device may still be running: `settle` waits for them before the decode node may reuse the blocks."""
        if self._next_layer < self.num_layers:
            self.ended_early = True
        if self._next_layer and self._dst.device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()  # the default stream: where the engine thread queued the copies

    def settle(self) -> None:
        """Blocks until no copy of this transfer is running (after `end_early`)."""
        if self._event is not None:
            self._event.synchronize()

    def wait(self, timeout: float) -> int:
        """Blocks until every copy is done (CUDA: the last layer's event; a copy on the device cannot hang, so
        `timeout` is not needed); returns the bytes copied. Raises KVTransferError when the transfer did not
        copy every layer."""
        if not self.complete:
            raise KVTransferError(f"only {self._next_layer} of {self.num_layers} layers were copied")
        if self._event is not None:
            self._event.synchronize()
        return self.bytes_posted
