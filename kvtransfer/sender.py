"""The prefill side of one request's KV transfer: posts each layer's blocks as soon as that layer is written.

Wire protocol (shared with `receiver.receive`): the decode node's reserved block ids, in block-table order, are
coalesced into runs of consecutive ids `[(start, count), ...]`. A transfer has one pair channel lane (a group,
`channel.PairChannels.get(..., lane=...)`) to itself from its header to the decode node's answer, and every
message travels under tag 0 (`channel.WIRE_TAG`): NCCL ignores tags, and a group matches messages in the order
they were posted, so concurrent transfers must be on different lanes, never told apart by tags:
  1. a header, `int64[HEADER_LEN]` (`make_header`): layers, runs, block shape and dtype as the sender sees them;
  2. for each layer 0..L-1, for each run in order, exactly one tensor `[count, 2, block_size, kvh, head_dim]`,
     then the layer's checksum (`checksum`, in an `int64[HEADER_LEN]` message: every message that is not a
     layer has the header's size): a layer that arrives altered or in the wrong blocks fails the transfer
     closed instead of being decoded from.
A transfer that ends before its header was posted (the request was cancelled while it waited for the
prefill) sends a cancel header instead (`make_cancel_header`) and nothing after it; one that ends after its
header sends zeros for the layers it still owes. Either way the lane stays in step and can carry the next
transfer: an early end costs its own request only, never the channel that other requests share.
The receiver checks the header before it posts a single data recv. This is not optional politeness: gloo
aborts the *receiving process* (std::terminate from its I/O thread) when a message is larger than the recv
posted for it, and silently completes a recv with a shorter message. With the header, a sender and receiver
that disagree (block size, heads, dtype, block ids, layer count) get a KVTransferError instead; the header
itself always has the same size.
"""

from __future__ import annotations

import datetime
import threading
import time
import zlib
from collections.abc import Sequence

import torch

from .channel import WIRE_TAG, KVTransferError

HEADER_LEN = 16
_MAGIC = 0x4B565452  # "KVTR"
_VERSION = 3  # 3: a checksum follows each layer
KIND_DATA, KIND_CANCEL = 1, 2  # the header's third field: layers follow, or the transfer ended before it began


def _crc(values: Sequence[int]) -> int:
    return zlib.crc32(torch.tensor(list(values), dtype=torch.int64).numpy().tobytes())


def make_header(num_layers: int, runs: Sequence[tuple[int, int]], block_shape: Sequence[int],
                dtype: torch.dtype) -> torch.Tensor:
    """The transfer's first message. `num_layers` -1 means "not stated" (the receiver then skips that check)."""
    if len(block_shape) != 4:
        raise ValueError(f"block shape must be [2, block_size, kv_heads, head_dim], got {tuple(block_shape)}")
    flat = [v for run in runs for v in run]
    fields = [_MAGIC, _VERSION, KIND_DATA, num_layers, len(runs), sum(c for _, c in runs), _crc(flat),
              *block_shape, zlib.crc32(str(dtype).encode()), torch.empty((), dtype=dtype).element_size()]
    return torch.tensor(fields + [0] * (HEADER_LEN - len(fields)), dtype=torch.int64)


def make_cancel_header() -> torch.Tensor:
    """The only message of a transfer that ended before it began: the receiver expects nothing after it."""
    return torch.tensor([_MAGIC, _VERSION, KIND_CANCEL] + [0] * (HEADER_LEN - 3), dtype=torch.int64)


def is_cancel(header: torch.Tensor) -> bool:
    g = header.tolist()
    return g[0] == _MAGIC and g[1] == _VERSION and g[2] == KIND_CANCEL


def header_mismatch(got: torch.Tensor, want: torch.Tensor) -> str | None:
    """None if the headers agree, else what differs (a stated layer count of -1 matches any)."""
    names = ["magic", "version", "kind", "layers", "runs", "blocks", "block ids", "block shape[0]",
             "block_size", "kv_heads", "head_dim", "dtype", "element size"]
    g, w = got.tolist(), want.tolist()
    for i, name in enumerate(names):
        if name == "layers" and g[i] == -1:
            continue
        if g[i] != w[i]:
            return f"{name}: sender {g[i]}, receiver {w[i]}"
    return None


def checksum(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """`int64[1]` over the blocks of `parts` (`[n, ...]` tensors, in order), on their device: each block's 64-bit
    words summed (wrapping), the sums weighted by the block's position (1, 2, ...), so a changed word or two
    blocks swapped change it. A pass over the data and a reduction per block, at memory speed: 64-bit words
    need no widening (summing 32-bit words into int64 was 20x slower on a CPU, and made a transfer 5x slower)."""
    total = torch.zeros(1, dtype=torch.int64, device=parts[0].device)
    position = 1
    for blocks in parts:
        rows = blocks.contiguous().view(blocks.shape[0], -1)
        wide = rows.shape[1] * rows.element_size() % 8 == 0
        words = rows.view(torch.int64) if wide else rows.view(torch.int32)  # a block's bytes: a multiple of 4
        sums = words.sum(dim=1, dtype=torch.int64)
        weights = torch.arange(position, position + blocks.shape[0], dtype=torch.int64, device=blocks.device)
        total += (sums * weights).sum()
        position += blocks.shape[0]
    return total


def coalesce(block_ids: Sequence[int]) -> list[tuple[int, int]]:
    """Block ids, in block-table order, as runs `(start, count)` of ids that go up by one: [4,5,6,9,2,3] ->
    [(4,3),(9,1),(2,2)]. The order is kept (block i of the sequence stays block i), so runs are not sorted."""
    runs: list[tuple[int, int]] = []
    for b in block_ids:
        b = int(b)
        if b < 0:
            raise ValueError(f"negative block id {b}")
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


def check_runs(runs: Sequence[tuple[int, int]], num_blocks: int | None = None) -> int:
    """Validates runs; returns the number of blocks they cover."""
    total = 0
    for start, count in runs:
        if start < 0 or count <= 0:
            raise ValueError(f"bad run ({start}, {count})")
        if num_blocks is not None and start + count > num_blocks:
            raise ValueError(f"run ({start}, {count}) is past the pool's {num_blocks} blocks")
        total += count
    return total


def _wait_all(works: list, deadline: float, what: str) -> None:
    """Waits for every work before `deadline` (time.monotonic()); raises KVTransferError otherwise."""
    for work in works:
        left = deadline - time.monotonic()
        if left <= 0:
            raise KVTransferError(f"{what} timed out")
        try:
            work.wait(datetime.timedelta(seconds=max(left, 0.001)))
        except Exception as exc:  # gloo: RuntimeError (peer closed, timed out); NCCL: DistBackendError
            raise KVTransferError(f"{what} failed: {exc}") from exc


class Staging:
    """Reusable buffers for the packed layers of a node's transfers (thread-safe: taken on the engine thread,
    given back by whoever waited for the sends).

    A fresh multi-MiB CPU buffer per layer is mmapped and page-faulted anew every time (glibc serves
    allocations above 32 MiB that way, smaller ones until its threshold adapts): measured on a 64 MiB layer,
    1.2 GB/s against 1.7 GB/s with reused memory (bench/README.md). Buffers are flat, by dtype and device, and a
    layer of any prompt length takes the smallest free one that holds it, so prompts of every length share a
    few buffers instead of keeping one per shape (which grew a prefill node by ~0.4 GB, bench/README.md). A new
    buffer is sized up to ROUND_BITS bits below its leading one, so that the next prompt a little longer fits.
    At most `max_bytes` are kept free (`staging_bytes`: a figure from the node's configuration); past it, the
    smallest go first. What is lent out is bounded by the transfers in flight."""

    ROUND_BITS = 2

    def __init__(self, max_bytes: int = 512 << 20) -> None:
        self.max_bytes = max_bytes
        self._free: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}  # each sorted by size
        self._lent: dict[int, torch.Tensor] = {}  # data_ptr -> the flat buffer behind a lent view
        self._kept = 0
        self._lock = threading.Lock()

    @property
    def kept_bytes(self) -> int:
        return self._kept

    def take(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A tensor of `shape` (uninitialised) on a kept buffer when one is large enough."""
        need = shape.numel()
        with self._lock:
            free = self._free.get((dtype, device), [])
            i = next((i for i, t in enumerate(free) if t.numel() >= need), None)
            if i is not None:
                flat = free.pop(i)
                self._kept -= _nbytes(flat)
            else:
                shift = max(0, need.bit_length() - self.ROUND_BITS - 1)
                flat = torch.empty(-(-need >> shift) << shift, dtype=dtype, device=device)
            view = flat[:need].view(shape)
            self._lent[view.data_ptr()] = flat
            return view

    def give(self, tensors: list[torch.Tensor]) -> None:
        """Takes back what `take` lent (anything else is ignored); keeps it while the bound allows."""
        with self._lock:
            for t in tensors:
                flat = self._lent.pop(t.data_ptr(), None)
                if flat is None:
                    continue
                free = self._free.setdefault((flat.dtype, flat.device), [])
                free.append(flat)
                free.sort(key=torch.Tensor.numel)
                self._kept += _nbytes(flat)
            for free in self._free.values():
                while self._kept > self.max_bytes and free:
                    self._kept -= _nbytes(free.pop(0))


    def forget(self, tensors: list[torch.Tensor]) -> None:
        """Drops what `take` lent without keeping it (a failed send's: the backend may still hold it)."""
        with self._lock:
            for t in tensors:
                self._lent.pop(t.data_ptr(), None)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def staging_bytes(pools: Sequence[torch.Tensor], tokens: int) -> int:
    """What a rank's Staging keeps free: the K/V of `tokens` prompt tokens (the most one engine step sends) in
    every layer, twice (one step's transfers still sending as the next one's pack)."""
    block = pools[0][0]
    blocks = -(-tokens // block.shape[1])  # [2, block_size, heads, head_dim] per block and layer
    return 2 * len(pools) * blocks * _nbytes(block)


class KVSender:
    """Sends one request's prompt blocks, layer by layer, to the decode node's reserved blocks.

    `src_blocks`: this node's block ids for the prompt (block-table order, cut to the blocks the prompt
    fills; may come later through `begin`); `dst_runs`: the decode node's reserved ids for the same blocks,
    coalesced (`coalesce`). `send_layer` packs the layer's source blocks into one contiguous buffer (one copy,
    in block-table order) and posts one async send per destination run, slices of that buffer: it does not
    wait for the peer, and the source blocks may be reused as soon as it returns (the sends read the copy).

    The header goes out at once when `pool` (any layer's pool: block shape, dtype, device) is given and
    `post_header` is left on, else with `begin` or layer 0: the receiver checks it and posts its recvs while
    layer 0 is computed. `num_layers`, when given, is checked by both sides. `end_early` keeps the protocol
    whole when the transfer stops short (see the module's docstring). Never raises from `send_layer` into a
    caller that only logs: a failure is kept (`failed`) and raised by `wait`. `pg` is the transfer's lane: no
    other transfer may use it until this one's receiver has finished. `transfer_id` names the transfer in
    errors only (it is not on the wire).
    """

    def __init__(self, pg, peer_rank: int, transfer_id: int | str, src_blocks: Sequence[int] | None,
                 dst_runs: Sequence[tuple[int, int]], *, num_layers: int | None = None,
                 pool: torch.Tensor | None = None, post_header: bool = True, staging: Staging | None = None,
                 heads: tuple[int, int] | None = None) -> None:
        self._total = check_runs(dst_runs)
        self.heads = heads  # a range of the pool's KV heads to send (a route between parallel layouts), or all
        self.pg = pg
        self.peer_rank = peer_rank
        self.transfer_id = transfer_id
        self.num_layers = num_layers
        self.dst_runs = [(int(s), int(c)) for s, c in dst_runs]
        self._src: list[int] | None = None
        self._index: dict[torch.device, torch.Tensor] = {}
        self.header: torch.Tensor | None = None
        self._works: list = []
        self._tensors: list[torch.Tensor] = []  # kept alive until the sends complete
        self._staging = staging
        self._packed: list[torch.Tensor] = []  # taken from `staging`: given back once the sends are over
        self._block_shape: torch.Size | None = None
        self._dtype: torch.dtype | None = None
        self._device: torch.device | None = None
        self._next_layer = 0
        self.bytes_posted = 0
        self.cancelled = False  # ended before its header: a cancel header went instead
        self.padded = False  # ended after its header: zeros went for the layers still owed
        self._failed: KVTransferError | None = None
        self._done = False
        if src_blocks is not None:
            self.set_source(src_blocks)
        if pool is not None:
            pool = self._heads(pool)
            self._check_pool(pool)
            if post_header:
                self._post_header(pool)

    def _heads(self, pool: torch.Tensor) -> torch.Tensor:
        """The part of a pool this transfer sends: a strided view when it is a head range."""
        return pool if self.heads is None else pool[:, :, :, self.heads[0]:self.heads[1]]

    def set_source(self, src_blocks: Sequence[int]) -> None:
        """This node's block ids for the prompt, once known (a prefill learns them when the prompt is
        scheduled, after the header could already go out)."""
        if len(src_blocks) != self._total:
            raise ValueError(f"{len(src_blocks)} source blocks for {self._total} destination blocks")
        src = [int(b) for b in src_blocks]
        if any(b < 0 for b in src):
            raise ValueError("negative source block id")
        self._src = src

    def begin(self, src_blocks: Sequence[int], pool: torch.Tensor) -> None:
        """The prompt is scheduled: its source blocks are known and the header goes out (if not yet)."""
        self.set_source(src_blocks)
        pool = self._heads(pool)
        self._check_pool(pool)
        if self.header is None and self._failed is None and not self.cancelled:
            self._post_header(pool)

    @property
    def num_blocks(self) -> int:
        return self._total

    @property
    def failed(self) -> KVTransferError | None:
        return self._failed

    def send_layer(self, layer: int, pool: torch.Tensor) -> None:
        """Posts layer `layer`'s sends (layers must come in order 0, 1, ...). Non-blocking. Raises ValueError
        for a misuse; a channel failure is kept and raised by `wait` (and by this on the next layer)."""
        if self._failed is not None:
            raise self._failed
        if self._done or self.cancelled:
            raise KVTransferError("send_layer after the transfer ended")
        if layer != self._next_layer:
            raise ValueError(f"layer {layer} sent out of order (expected {self._next_layer})")
        if self.num_layers is not None and layer >= self.num_layers:
            raise ValueError(f"layer {layer} past num_layers={self.num_layers}")
        if self._src is None:
            raise ValueError("send_layer before set_source")
        pool = self._heads(pool)  # packed below into one contiguous buffer: one copy, whatever the range
        self._check_pool(pool)
        index = self._index.get(pool.device)
        if index is None:
            index = self._index[pool.device] = torch.tensor(self._src, dtype=torch.long, device=pool.device)
        if self.header is None:
            self._post_header(pool)
        if self._staging is None:
            packed = pool.index_select(0, index)
        else:
            packed = self._staging.take(torch.Size((len(self._src), *pool.shape[1:])), pool.dtype, pool.device)
            torch.index_select(pool, 0, index, out=packed)
            self._packed.append(packed)
        self._post_runs(packed, f"layer {layer}")
        self._next_layer += 1

    def _post_runs(self, packed: torch.Tensor, what: str) -> None:
        """One send per destination run, each a contiguous slice of `packed` ([blocks, ...] in table order),
        then the layer's checksum."""
        try:
            offset = 0
            for _, count in self.dst_runs:
                t = packed[offset:offset + count]
                self._works.append(self.pg.send([t], self.peer_rank, WIRE_TAG))
                self.bytes_posted += t.numel() * t.element_size()
                offset += count
            total = torch.zeros(HEADER_LEN, dtype=torch.int64, device=packed.device)
            total[:1] = self._checksum(packed)
            self._works.append(self.pg.send([total], self.peer_rank, WIRE_TAG))
            self._tensors += [packed, total]
        except Exception as exc:
            self._fail(KVTransferError(f"posting {what} failed: {exc}"))
            raise self._failed from exc

    def _checksum(self, packed: torch.Tensor) -> torch.Tensor:
        return checksum([packed])

    def end_early(self) -> None:
        """The transfer stops short (its request ended, or the step computing it failed): keeps the channel
        in step for the transfers that share it. Before the header, a cancel header; after it, zeros for every
        layer still owed (the receiver has posted recvs for them, and the request is being released anyway).
        Call only once nothing else will post for this transfer. Failures are kept, as by `send_layer`."""
        if self._failed is not None or self._done or self.cancelled or self.padded:
            return
        try:
            if self.header is None:
                header = make_cancel_header()
                if self._device is not None and self._device.type != "cpu":
                    header = header.to(self._device)
                self._works.append(self.pg.send([header], self.peer_rank, WIRE_TAG))
                self._tensors.append(header)
                self.cancelled = True
                return
        except Exception as exc:
            self._fail(KVTransferError(f"posting the cancel header failed: {exc}"))
            return
        owed = (self.num_layers or self._next_layer) - self._next_layer
        if owed > 0:
            self.padded = True
            zeros = torch.zeros((self._total, *self._block_shape), dtype=self._dtype, device=self._device)
            try:
                for _ in range(owed):
                    self._post_runs(zeros, "padding")
                    self._next_layer += 1
            except KVTransferError:
                return

    def _check_pool(self, pool: torch.Tensor) -> None:
        if pool.dim() != 5 or pool.shape[1] != 2:
            raise ValueError(f"pool must be [num_blocks, 2, block_size, kv_heads, head_dim], got {tuple(pool.shape)}")
        if self._block_shape is None:
            self._block_shape, self._dtype, self._device = pool.shape[1:], pool.dtype, pool.device
        elif pool.shape[1:] != self._block_shape or pool.dtype != self._dtype:
            # The header announced the first layout: other sizes would abort the receiving process.
            raise ValueError(f"pool {tuple(pool.shape)} {pool.dtype} differs from the transfer's blocks "
                             f"{tuple(self._block_shape)} {self._dtype}")
        if self._src is not None and max(self._src, default=-1) >= pool.shape[0]:
            raise ValueError(f"source block {max(self._src)} is past the pool's {pool.shape[0]} blocks")

    def _post_header(self, pool: torch.Tensor) -> None:
        header = make_header(self.num_layers if self.num_layers is not None else -1, self.dst_runs,
                             pool.shape[1:], pool.dtype)
        if pool.device.type != "cpu":
            header = header.to(pool.device)
        try:
            work = self.pg.send([header], self.peer_rank, WIRE_TAG)
        except Exception as exc:
            self._fail(KVTransferError(f"posting the header failed: {exc}"))
            raise self._failed from exc
        self.header = header
        self._tensors.append(header)
        self._works.append(work)

    @property
    def layers_posted(self) -> int:
        return self._next_layer

    def wait(self, timeout: float) -> int:
        """Waits for every posted send; returns the bytes sent (the header not counted). Raises
        KVTransferError on failure, on timeout, or when fewer than `num_layers` layers were posted (and no
        cancel header went instead)."""
        if self._failed is not None:
            raise self._failed
        if self._done:
            return self.bytes_posted
        if not self.cancelled and self.num_layers is not None and self._next_layer != self.num_layers:
            self._fail(KVTransferError(f"only {self._next_layer} of {self.num_layers} layers were posted"))
            raise self._failed
        try:
            _wait_all(self._works, time.monotonic() + timeout, f"KV send of {self.transfer_id}")
        except KVTransferError as exc:
            self._fail(exc)
            raise
        self._done = True
        self._works.clear()
        self._tensors.clear()
        self._give_back()
        return self.bytes_posted

    def _give_back(self) -> None:
        if self._staging is not None and self._packed:
            self._staging.give(self._packed)
        self._packed = []

    def _fail(self, exc: KVTransferError) -> None:
        # Dropping the works lets the backend forget the buffers (gloo holds only weak pointers to them);
        # dropping the group lets it close once the node's PairChannels drops it too.
        # A failed send's buffer is not reused: the backend may still hold it.
        self._failed = exc
        self._works.clear()
        self._tensors.clear()
        if self._staging is not None:
            self._staging.forget(self._packed)
        self._packed = []
        self.pg = None
