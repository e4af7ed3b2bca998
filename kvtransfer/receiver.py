"""The decode side of one request's KV transfer: receives straight into the reserved blocks of the pools.

Protocol: see `sender` (a fixed-size header, then per layer 0..L-1, per run in order, one tensor
`[count, 2, block_size, kvh, head_dim]`, then the layer's checksum; all under tag 0 on the transfer's own
lane). Each recv lands in `pools[layer][start:start + count]`, a contiguous slice of the pool: nothing is
staged or copied (but a head range of the pool, see `receive`). A layer whose checksum does not match what
arrived fails the transfer: the blocks are then released, never decoded from.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from .channel import WIRE_TAG, KVTransferError, TransferCancelled
from .sender import HEADER_LEN, _wait_all, check_runs, checksum, header_mismatch, is_cancel, make_header


def receive(pg, peer_rank: int, transfer_id: int | str, pools: Sequence[torch.Tensor],
            runs: Sequence[tuple[int, int]], timeout: float, heads: tuple[int, int] | None = None) -> int:
    """Receives the header, checks it, then posts every recv of the transfer (all layers, all runs, protocol
    order) and waits for them all. `pg` is the transfer's lane, which nothing else may use until this returns
    (messages on a group are matched in posting order); `transfer_id` names the transfer in errors only.

    Returns the KV bytes received (the header not counted). Raises TransferCancelled when the sender ended
    the transfer before it began (nothing was written; the lane is in step). Raises KVTransferError when the
    peer fails (at once: a closed connection fails every pending recv), when the sender's header disagrees
    with `pools` and `runs` (nothing is then received into the pools), or after `timeout` seconds. After any
    failure the blocks may hold partial data and the caller must drop the group (`PairChannels.drop`): the
    sender's unreceived messages are still queued on the lane, and a gloo group is broken after a timeout.
    Blocking: run it on a worker thread.

    `heads`: the transfer carries only this range of the pools' KV heads (one of several senders of a
    parallel layout, `kvtransfer.ranks`). A head range of a block is strided in the pool, so it is received
    into one contiguous buffer per layer and copied into place once every message has arrived.
    """
    if not pools:
        raise ValueError("no pools")
    first = pools[0]
    if first.dim() != 5 or first.shape[1] != 2:
        raise ValueError(f"pool must be [num_blocks, 2, block_size, kv_heads, head_dim], got {tuple(first.shape)}")
    for i, pool in enumerate(pools):
        if pool.shape != first.shape or pool.dtype != first.dtype or pool.device != first.device:
            raise ValueError(f"pool {i} is {tuple(pool.shape)} {pool.dtype} {pool.device}, pool 0 is "
                             f"{tuple(first.shape)} {first.dtype} {first.device}")
        if not pool.is_contiguous():
            raise ValueError(f"pool {i} is not contiguous: its blocks cannot be received in place")
    runs = [(int(s), int(c)) for s, c in runs]
    total = check_runs(runs, first.shape[0])
    partial = heads is not None and tuple(heads) != (0, first.shape[3])
    block_shape = (2, first.shape[2], heads[1] - heads[0], first.shape[4]) if partial else first.shape[1:]
    if partial and not 0 <= heads[0] < heads[1] <= first.shape[3]:
        raise ValueError(f"heads {tuple(heads)} outside the pool's {first.shape[3]} KV heads")
    deadline = time.monotonic() + timeout
    want = make_header(len(pools), runs, block_shape, first.dtype)
    works: list = []
    staged: list[torch.Tensor] = []  # per layer, when `partial`: [blocks, *block_shape] in run order
    sums = torch.zeros((len(pools), HEADER_LEN), dtype=torch.int64, device=first.device)  # each layer's, as sent
    nbytes = 0
    try:
        problem = header_mismatch(_header(pg, peer_rank, transfer_id, first.device, deadline), want)
        if problem is not None:
            raise KVTransferError(f"KV receive of {transfer_id}: sender and receiver disagree on {problem}")
        for layer, pool in enumerate(pools):
            buffer = None
            if partial:
                buffer = torch.empty((total, *block_shape), dtype=first.dtype, device=first.device)
                staged.append(buffer)
            offset = 0
            for start, count in runs:
                dst = pool[start:start + count] if buffer is None else buffer[offset:offset + count]
                offset += count
                works.append(pg.recv([dst], peer_rank, WIRE_TAG))
                nbytes += dst.numel() * dst.element_size()
            works.append(pg.recv([sums[layer]], peer_rank, WIRE_TAG))
        _wait_all(works, deadline, f"KV receive of {transfer_id}")
        for layer, pool in enumerate(pools):
            got = [staged[layer]] if partial else [pool[start:start + count] for start, count in runs]
            if not torch.equal(checksum(got), sums[layer, :1]):
                raise KVTransferError(f"KV receive of {transfer_id}: layer {layer} does not match its checksum")
        for pool, buffer in zip(pools, staged):
            offset = 0
            for start, count in runs:
                pool[start:start + count, :, :, heads[0]:heads[1]] = buffer[offset:offset + count]
                offset += count
    except BaseException as exc:
        # Let go of the pending works (the backend then forgets the pool slices) and of the group: the
        # traceback keeps this frame alive, and a gloo group closes its connections (failing the peer's
        # pending sends at once) only when its last reference goes.
        works.clear()
        pg = None  # noqa: F841
        if isinstance(exc, (KVTransferError, TransferCancelled)):
            raise
        if not isinstance(exc, Exception):
            raise
        raise KVTransferError(f"KV receive of {transfer_id} failed: {exc}") from exc
    works.clear()
    return nbytes


def drain(pg, peer_rank: int, transfer_id: int | str, runs: Sequence[tuple[int, int]], block_shape: Sequence[int],
          dtype: torch.dtype, device: torch.device | str, timeout: float) -> int:
    """Takes in a transfer whose blocks are no longer this node's to write (its reservation was released
    before the transfer came) and drops it: the header, then every layer's runs into a scratch buffer, so
    the sender's messages are matched and the lane stays in step for the transfers that come after it.
    Returns the bytes drained; raises TransferCancelled / KVTransferError as `receive` does."""
    runs = [(int(s), int(c)) for s, c in runs]
    check_runs(runs)
    deadline = time.monotonic() + timeout
    works: list = []
    nbytes = 0
    try:
        header = _header(pg, peer_rank, transfer_id, device, deadline)
        num_layers = int(header[3])
        want = make_header(num_layers, runs, block_shape, dtype)
        problem = header_mismatch(header, want)
        if problem is not None or num_layers < 0:
            raise KVTransferError(f"KV drain of {transfer_id}: sender and receiver disagree on {problem or 'layers'}")
        scratch = torch.empty((max(c for _, c in runs), *block_shape), dtype=dtype, device=device)
        total = torch.empty(HEADER_LEN, dtype=torch.int64, device=device)
        for _ in range(num_layers):
            for _, count in runs:
                works.append(pg.recv([scratch[:count]], peer_rank, WIRE_TAG))
                nbytes += scratch[:count].numel() * scratch.element_size()
            works.append(pg.recv([total], peer_rank, WIRE_TAG))
            _wait_all(works, deadline, f"KV drain of {transfer_id}")  # one layer at a time: one scratch buffer
            works.clear()
    except BaseException as exc:
        works.clear()
        pg = None  # noqa: F841
        if isinstance(exc, (KVTransferError, TransferCancelled)) or not isinstance(exc, Exception):
            raise
        raise KVTransferError(f"KV drain of {transfer_id} failed: {exc}") from exc
    return nbytes


def _header(pg, peer_rank: int, transfer_id: int | str, device, deadline: float) -> torch.Tensor:
    """The transfer's header, on the CPU; raises TransferCancelled for a cancel header."""
    got = torch.zeros(HEADER_LEN, dtype=torch.int64, device=device)
    _wait_all([pg.recv([got], peer_rank, WIRE_TAG)], deadline, f"KV receive of {transfer_id}: the header")
    header = got.cpu()
    if is_cancel(header):
        raise TransferCancelled(f"KV transfer {transfer_id} cancelled by the sender before it began")
    return header
