"""Paged decode attention: one query token per sequence against its cached K/V, read through its block table.

GQA-aware: a program takes one KV head of one sequence and all the query heads that share it, so each K/V
tile is loaded once for the group. Long contexts are split: program (sequence, KV head, split) runs an
online softmax over its `blocks_per_split` blocks and writes a partial output and its log-sum-exp; a second
kernel combines the splits. A context that fits one split skips the second launch. Accumulation in float32. Works for any block size Triton can tile (8/16/32).

Shapes: q [B, H, D]; pool [num_blocks, 2, block_size, KVH, D] (contiguous); block_tables [B, max_blocks]
(padded with any valid id); seq_lens [B] (>= 1). Returns [B, H, D] in q's dtype.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .checks import check_query_and_pool, check_tensor
from .reference import decode_attention_ref  # noqa: F401 - the oracle, importable beside its kernel

DEFAULT_BLOCKS_PER_SPLIT = 16


@triton.jit
def _split_kernel(q_ptr, pool_ptr, tables_ptr, lens_ptr, part_ptr, lse_ptr,
                  q_sb, q_sh, t_sb, p_sblock, p_shalf, p_stok, p_shead, part_sb, part_sh, part_ss, lse_sb, lse_sh,
                  scale, group, head_dim, blocks_per_split,
                  G_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, DIRECT: tl.constexpr):
    # DIRECT (a single split): part_ptr is the output itself ([B, H, D], part_ss unused), no LSE is written.
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b)
    n_blocks = tl.cdiv(seq_len, BLOCK_SIZE)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, n_blocks)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    hmask = g < group
    dmask = d < head_dim
    heads = kv_head * group + g
    q = tl.load(q_ptr + b * q_sb + heads[:, None] * q_sh + d[None, :], mask=hmask[:, None] & dmask[None, :],
                other=0.0).to(tl.float32)
    toks = tl.arange(0, BLOCK_SIZE)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    l = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    for i in range(first, last):
        block = tl.load(tables_ptr + b * t_sb + i)
        base = pool_ptr + block * p_sblock + kv_head * p_shead + toks[:, None] * p_stok + d[None, :]
        k = tl.load(base, mask=dmask[None, :], other=0.0).to(tl.float32)  # [BLOCK_SIZE, D_PAD]
        v = tl.load(base + p_shalf, mask=dmask[None, :], other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [G_PAD, BLOCK_SIZE]
        scores = tl.where((i * BLOCK_SIZE + toks < seq_len)[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    nonempty = l > 0
    out = tl.where(nonempty[:, None], acc / tl.where(nonempty, l, 1.0)[:, None], 0.0)
    mask2 = hmask[:, None] & dmask[None, :]
    if DIRECT:
        tl.store(part_ptr + b * part_sb + heads[:, None] * part_sh + d[None, :],
                 out.to(part_ptr.dtype.element_ty), mask=mask2)
    else:
        lse = tl.where(nonempty, m + tl.log(tl.where(nonempty, l, 1.0)), float("-inf"))
        tl.store(part_ptr + b * part_sb + heads[:, None] * part_sh + split * part_ss + d[None, :], out, mask=mask2)
        tl.store(lse_ptr + b * lse_sb + heads * lse_sh + split, lse, mask=hmask)


@triton.jit
def _combine_kernel(part_ptr, lse_ptr, out_ptr, num_splits, head_dim, part_sb, part_sh, part_ss, lse_sb, lse_sh,
                    out_sb, out_sh, S_PAD: tl.constexpr, D_PAD: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, D_PAD)
    smask = s < num_splits
    dmask = d < head_dim
    lse = tl.load(lse_ptr + b * lse_sb + h * lse_sh + s, mask=smask, other=float("-inf"))
    top = tl.max(lse, axis=0)
    w = tl.where(lse > float("-inf"), tl.exp(lse - top), 0.0)
    parts = tl.load(part_ptr + b * part_sb + h * part_sh + s[:, None] * part_ss + d[None, :],
                    mask=smask[:, None] & dmask[None, :], other=0.0)
    out = tl.sum(w[:, None] * parts, axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + b * out_sb + h * out_sh + d, out.to(out_ptr.dtype.element_ty), mask=dmask)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_blocks_per_split(batch: int, kv_heads: int, max_blocks: int, device: torch.device) -> int:
    """On a GPU, enough splits for about four programs per multiprocessor (a single long sequence would
    otherwise leave most of them idle); a function of the shapes only, so a CUDA graph's grid stays fixed."""
    if device.type != "cuda":
        return DEFAULT_BLOCKS_PER_SPLIT
    splits = max(1, min(max_blocks, triton.cdiv(4 * _multiprocessors(device), batch * kv_heads)))
    return max(1, triton.cdiv(max_blocks, splits))


def decode_attention(q: torch.Tensor, pool: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                     scale: float, blocks_per_split: int | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    block_size, kvh = check_query_and_pool(q, pool)
    b, h, d = q.shape
    check_tensor("block_tables", block_tables, dims=2, dtypes=(torch.int32, torch.int64), device=q.device,
                 shape=(b, None), last_dim_contiguous=True)
    check_tensor("seq_lens", seq_lens, shape=(b,), dtypes=(torch.int32, torch.int64), device=q.device)
    if blocks_per_split is None:
        blocks_per_split = default_blocks_per_split(b, kvh, block_tables.shape[1], q.device)
    if blocks_per_split < 1:
        raise ValueError(f"blocks_per_split: must be >= 1, got {blocks_per_split}")
    if out is None:
        out = torch.empty((b, h, d), dtype=q.dtype, device=q.device)
    check_tensor("out", out, shape=(b, h, d), dtypes=(q.dtype,), device=q.device, last_dim_contiguous=True)
    if b == 0:
        return out
    splits = max(1, triton.cdiv(block_tables.shape[1], blocks_per_split))
    group = h // kvh
    d_pad = triton.next_power_of_2(d)
    direct = splits == 1  # short contexts: the one split writes the output, no combine launch
    if direct:
        parts, lse = out, out  # lse unused
        part_strides = (out.stride(0), out.stride(1), 0)
    else:
        parts = torch.empty((b, h, splits, d), dtype=torch.float32, device=q.device)
        lse = torch.empty((b, h, splits), dtype=torch.float32, device=q.device)
        part_strides = (parts.stride(0), parts.stride(1), parts.stride(2))
    _split_kernel[(b, kvh, splits)](
        q, pool, block_tables, seq_lens, parts, lse,
        q.stride(0), q.stride(1), block_tables.stride(0), pool.stride(0), pool.stride(1), pool.stride(2),
        pool.stride(3), *part_strides, lse.stride(0), lse.stride(1),
        scale, group, d, blocks_per_split,
        G_PAD=max(triton.next_power_of_2(group), 1), D_PAD=d_pad, BLOCK_SIZE=block_size, DIRECT=direct,
    )
    if direct:
        return out
    _combine_kernel[(b, h)](parts, lse, out, splits, d, parts.stride(0), parts.stride(1), parts.stride(2),
                            lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
                            S_PAD=triton.next_power_of_2(splits), D_PAD=d_pad)
    return out
