"""The store of a step's new K/V into the paged pool: token t goes to block `slot_blocks[t]`, offset
`slot_offsets[t]`, K in half 0 and V in half 1 of the block. One program per token, one load and one store
of each of its K and V rows (`kvh * head_dim` elements); no index tensors built on the host.

Shapes: pool [num_blocks, 2, block_size, kvh, head_dim] (contiguous); k, v [T, kvh, head_dim] (a token's
heads contiguous, tokens may be strided, as slices of the fused QKV projection are); slot_blocks,
slot_offsets [T] int64. A token whose block is negative is skipped (padding rows of a CUDA graph's batch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import FLOAT_DTYPES, check_tensor
from .reference import store_kv_ref  # noqa: F401 - the oracle, importable beside its kernel


@triton.jit
def _store_kv_kernel(pool_ptr, k_ptr, v_ptr, blocks_ptr, offsets_ptr, k_stride, v_stride, block_stride,
                     half_stride, slot_stride, row, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < row
    block = tl.load(blocks_ptr + t)
    offset = tl.load(offsets_ptr + t)
    if block >= 0:  # a padding row (a CUDA graph's batch above the real one) stores nothing
        base = pool_ptr + block * block_stride + offset * slot_stride
        tl.store(base + cols, tl.load(k_ptr + t * k_stride + cols, mask=mask), mask=mask)
        tl.store(base + half_stride + cols, tl.load(v_ptr + t * v_stride + cols, mask=mask), mask=mask)


def store_kv(pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_blocks: torch.Tensor,
             slot_offsets: torch.Tensor) -> None:
    check_tensor("pool", pool, dims=5, dtypes=FLOAT_DTYPES)
    if not pool.is_contiguous() or pool.shape[1] != 2:
        raise ValueError(f"pool: expected a contiguous [num_blocks, 2, block_size, kvh, head_dim], got "
                         f"{tuple(pool.shape)} with strides {pool.stride()}")
    _, _, block_size, kvh, d = pool.shape
    check_tensor("k", k, dims=3, dtypes=(pool.dtype,), device=pool.device, shape=(None, kvh, d))
    t = k.shape[0]
    check_tensor("v", v, shape=(t, kvh, d), dtypes=(pool.dtype,), device=pool.device)
    for name, x in (("k", k), ("v", v)):
        if x.stride(2) != 1 or x.stride(1) != d:
            raise ValueError(f"{name}: a token's heads must be contiguous, got strides {x.stride()}")
    check_tensor("slot_blocks", slot_blocks, shape=(t,), dtypes=(torch.int64, torch.int32), device=pool.device)
    check_tensor("slot_offsets", slot_offsets, shape=(t,), dtypes=(torch.int64, torch.int32), device=pool.device)
    if t:
        row = kvh * d
        _store_kv_kernel[(t,)](pool, k, v, slot_blocks, slot_offsets, k.stride(0), v.stride(0), pool.stride(0),
                               pool.stride(1), pool.stride(2), row, BLOCK=triton.next_power_of_2(row))
