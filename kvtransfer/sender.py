"""The prefill side of one request's KV transfer: posts each layer's blocks as soon as that layer is written.

Wire protocol (shared with `receiver.receive`): the decode node's reserved block ids, in block-table order, are
coalesced into runs of consecutive ids `[(start, count), ...]`. Everything travels under the one `tag` the
decode node assigned to the transfer (so concurrent transfers on one pair do not mix):
  1. a header, `int64[HEADER_LEN]` (`make_header`): layers, runs, block shape and dtype as the sender sees them;
  2. for each layer 0..L-1, for each run in order, exactly one tensor `[count, 2, block_size, kvh, head_dim]`.
The receiver checks the header before it posts a single data recv. This is not optional politeness: gloo
aborts the *receiving process* (std::terminate from its I/O thread) when a message is larger than the recv
posted for it, and silently completes a recv with a shorter message. With the header, a sender and receiver
that disagree (block size, heads, dtype, block ids, layer count) get a KVTransferError instead; the header
itself always has the same size.
"""

from __future__ import annotations

import datetime
import time
import zlib
from collections.abc import Sequence

import torch

from .channel import KVTransferError

HEADER_LEN = 16
_MAGIC = 0x4B565452  # "KVTR"
_VERSION = 1


def _crc(values: Sequence[int]) -> int:
    return zlib.crc32(torch.tensor(list(values), dtype=torch.int64).numpy().tobytes())


def make_header(num_layers: int, runs: Sequence[tuple[int, int]], block_shape: Sequence[int],
                dtype: torch.dtype) -> torch.Tensor:
    """The transfer's first message. `num_layers` -1 means "not stated" (the receiver then skips that check)."""
    if len(block_shape) != 4:
        raise ValueError(f"block shape must be [2, block_size, kv_heads, head_dim], got {tuple(block_shape)}")
    flat = [v for run in runs for v in run]
    fields = [_MAGIC, _VERSION, num_layers, len(runs), sum(c for _, c in runs), _crc(flat),
              *block_shape, zlib.crc32(str(dtype).encode()), torch.empty((), dtype=dtype).element_size()]
    return torch.tensor(fields + [0] * (HEADER_LEN - len(fields)), dtype=torch.int64)


def header_mismatch(got: torch.Tensor, want: torch.Tensor) -> str | None:
    """None if the headers agree, else what differs (a stated layer count of -1 matches any)."""
    names = ["magic", "version", "layers", "runs", "blocks", "block ids", "block shape[0]", "block_size",
             "kv_heads", "head_dim", "dtype", "element size"]
    g, w = got.tolist(), want.tolist()
    for i, name in enumerate(names):
        if name == "layers" and g[i] == -1:
            continue
        if g[i] != w[i]:
            return f"{name}: sender {g[i]}, receiver {w[i]}"
    return None


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


class KVSender:
    """Sends one request's prompt blocks, layer by layer, to the decode node's reserved blocks.

    `src_blocks`: this node's block ids for the prompt (block-table order, cut to the blocks the prompt
    fills); `dst_runs`: the decode node's reserved ids for the same blocks, coalesced (`coalesce`).
    `send_layer` gathers the layer's blocks for each run (a slice of the pool when the source ids of the run
    are consecutive, else an `index_select` copy) and posts async sends: it does not wait for the peer.
    The source blocks must stay unchanged until `wait` returns (a consecutive run is sent from the pool itself).

    The transfer's header goes with layer 0, or at once when `pool` (any layer's pool, for its block shape,
    dtype and device) is given: the receiver then checks it and posts its recvs while layer 0 is computed,
    instead of one round trip after layer 0 is sent. `num_layers`, when given, is checked by both sides.
    """

    def __init__(self, pg, peer_rank: int, tag: int, src_blocks: Sequence[int] | None,
                 dst_runs: Sequence[tuple[int, int]], *, num_layers: int | None = None,
                 pool: torch.Tensor | None = None) -> None:
        if tag < 0:
            raise ValueError(f"tag must be >= 0, got {tag}")
        self._total = check_runs(dst_runs)
        self.pg = pg
        self.peer_rank = peer_rank
        self.tag = tag
        self.num_layers = num_layers
        self.dst_runs = [(int(s), int(c)) for s, c in dst_runs]
        self._src: list[int] | None = None
        self._max_src = -1
        self._src_runs: list[tuple[int, int, bool]] = []  # (offset in src, count, consecutive)
        self._index: dict[torch.device, list[torch.Tensor | None]] = {}
        self.header: torch.Tensor | None = None
        self._works: list = []
        self._tensors: list[torch.Tensor] = []  # kept alive until the sends complete
        self._block_shape: torch.Size | None = None
        self._dtype: torch.dtype | None = None
        self._next_layer = 0
        self.bytes_posted = 0
        self._failed: KVTransferError | None = None
        self._done = False
        if src_blocks is not None:
            self.set_source(src_blocks)
        if pool is not None:
            self._check_pool(pool)
            self._post_header(pool)

    def set_source(self, src_blocks: Sequence[int]) -> None:
        """This node's block ids for the prompt, once known (a prefill learns them when the prompt is
        scheduled, after the header could already go out)."""
        if len(src_blocks) != self._total:
            raise ValueError(f"{len(src_blocks)} source blocks for {self._total} destination blocks")
        self._src = [int(b) for b in src_blocks]
        if any(b < 0 for b in self._src):
            raise ValueError("negative source block id")
        self._max_src = max(self._src, default=-1)
        offset = 0
        for _, count in self.dst_runs:
            ids = self._src[offset:offset + count]
            consecutive = all(ids[i + 1] == ids[i] + 1 for i in range(count - 1))
            self._src_runs.append((offset, count, consecutive))
            offset += count

    @property
    def num_blocks(self) -> int:
        return self._total

    @property
    def has_source(self) -> bool:
        return self._src is not None

    def send_layer(self, layer: int, pool: torch.Tensor) -> None:
        """Posts layer `layer`'s sends (layers must come in order 0, 1, ...). Non-blocking."""
        if self._failed is not None:
            raise self._failed
        if self._done:
            raise KVTransferError("send_layer after wait()")
        if layer != self._next_layer:
            raise ValueError(f"layer {layer} sent out of order (expected {self._next_layer})")
        if self.num_layers is not None and layer >= self.num_layers:
            raise ValueError(f"layer {layer} past num_layers={self.num_layers}")
        if self._src is None:
            raise ValueError("send_layer before set_source")
        self._check_pool(pool)
        index = self._index.get(pool.device)
        if index is None:
            index = self._index[pool.device] = [
                None if consecutive else torch.tensor(self._src[off:off + n], dtype=torch.long, device=pool.device)
                for off, n, consecutive in self._src_runs
            ]
        if self.header is None:
            self._post_header(pool)
        try:
            for (off, n, consecutive), idx in zip(self._src_runs, index):
                if consecutive and pool[self._src[off]:self._src[off] + n].is_contiguous():
                    t = pool[self._src[off]:self._src[off] + n]
                else:
                    t = pool.index_select(0, idx if idx is not None else
                                          torch.arange(self._src[off], self._src[off] + n, device=pool.device))
                self._tensors.append(t)
                self._works.append(self.pg.send([t], self.peer_rank, self.tag))
                self.bytes_posted += t.numel() * t.element_size()
        except Exception as exc:
            self._fail(KVTransferError(f"posting layer {layer} failed: {exc}"))
            raise self._failed from exc
        self._next_layer += 1

    def _check_pool(self, pool: torch.Tensor) -> None:
        if pool.dim() != 5 or pool.shape[1] != 2:
            raise ValueError(f"pool must be [num_blocks, 2, block_size, kv_heads, head_dim], got {tuple(pool.shape)}")
        if self._block_shape is None:
            self._block_shape, self._dtype = pool.shape[1:], pool.dtype
        elif pool.shape[1:] != self._block_shape or pool.dtype != self._dtype:
            # The header announced the first layout: other sizes would abort the receiving process.
            raise ValueError(f"pool {tuple(pool.shape)} {pool.dtype} differs from the transfer's blocks "
                             f"{tuple(self._block_shape)} {self._dtype}")
        if self._max_src >= pool.shape[0]:
            raise ValueError(f"source block {self._max_src} is past the pool's {pool.shape[0]} blocks")

    def _post_header(self, pool: torch.Tensor) -> None:
        header = make_header(self.num_layers if self.num_layers is not None else -1, self.dst_runs,
                             pool.shape[1:], pool.dtype)
        if pool.device.type != "cpu":
            header = header.to(pool.device)
        try:
            work = self.pg.send([header], self.peer_rank, self.tag)
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
        """Waits for every posted send; returns the KV bytes sent (the header not counted). Raises
        KVTransferError on failure, on timeout, or when fewer than `num_layers` layers were posted."""
        if self._failed is not None:
            raise self._failed
        if self._done:
            return self.bytes_posted
        if self.num_layers is not None and self._next_layer != self.num_layers:
            self._fail(KVTransferError(f"only {self._next_layer} of {self.num_layers} layers were posted"))
            raise self._failed
        try:
            _wait_all(self._works, time.monotonic() + timeout, f"KV send (tag {self.tag})")
        except KVTransferError as exc:
            self._fail(exc)
            raise
        self._done = True
        self._works.clear()
        self._tensors.clear()
        return self.bytes_posted

    def _fail(self, exc: KVTransferError) -> None:
        # Dropping the works lets the backend forget the buffers (gloo holds only weak pointers to them);
        # dropping the group lets it close once the node's PairChannels drops it too.
        self._failed = exc
        self._works.clear()
        self._tensors.clear()
        self.pg = None
