"""Causal prefill attention over variable-length packed prompts, each possibly after cached context.

The step's query tokens are packed back to back: span s has `query_start_loc[s+1] - query_start_loc[s]`
tokens, the last ones of its `seq_lens[s]` (a chunk of a prompt after earlier chunks, or a whole prompt).
Every key and value, the span's own included, is read from the paged pool through the span's block table
(the engine writes the step's K/V before attention), so a chunked prefill sees its earlier chunks.
One program per (span, tile of BLOCK_M query tokens, query head): an online softmax over tiles of BLOCK_N
keys up to the tile's last position, both products with `tl.dot` (tensor cores on a GPU), float32
accumulation (float32 inputs in full precision, not TF32).

Shapes: q [T, H, D]; pool [num_blocks, 2, block_size, KVH, D] (contiguous); block_tables [S, max_blocks];
query_start_loc [S + 1]; seq_lens [S]. Returns [T, H, D].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_query_and_pool, check_tensor
from .reference import prefill_attention_ref  # noqa: F401 - the oracle, importable beside its kernel

BLOCK_M = 16  # query rows per program
BLOCK_N = 32  # keys per tile


@triton.jit
def _prefill_kernel(q_ptr, pool_ptr, tables_ptr, qsl_ptr, lens_ptr, out_ptr,
                    q_st, q_sh, t_ss, p_sblock, p_shalf, p_stok, p_shead, o_st, o_sh,
                    scale, group, head_dim,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    PRECISION: tl.constexpr):
    span = tl.program_id(0)
    tile = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(qsl_ptr + span)
    q_len = tl.load(qsl_ptr + span + 1) - q_start
    if tile * BLOCK_M < q_len:
        ctx = tl.load(lens_ptr + span)
        kv_head = head // group
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < q_len
        d = tl.arange(0, D_PAD)
        dmask = d < head_dim
        q = tl.load(q_ptr + (q_start + rows)[:, None] * q_st + head * q_sh + d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        pos = ctx - q_len + rows  # each query row's position in its sequence
        last = ctx - q_len + tl.minimum(tile * BLOCK_M + BLOCK_M, q_len) - 1  # the tile's last position
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        # Key tiles of BLOCK_N positions, each key's row found through the block table: the tile size is
        # free of the pool's block size (tl.dot needs tiles of at least 16).
        for start in range(0, last + 1, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            kmask = keys <= last
            blocks = tl.load(tables_ptr + span * t_ss + keys // BLOCK_SIZE, mask=kmask, other=0)
            base = (pool_ptr + blocks[:, None] * p_sblock + (keys % BLOCK_SIZE)[:, None] * p_stok
                    + kv_head * p_shead + d[None, :])
            kvmask = kmask[:, None] & dmask[None, :]
            k = tl.load(base, mask=kvmask, other=0.0)  # [BLOCK_N, D_PAD]
            v = tl.load(base + p_shalf, mask=kvmask, other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_M, BLOCK_N], float32
            visible = (keys[None, :] <= pos[:, None]) & rmask[:, None]
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # a row with nothing visible yet
            p = tl.exp(scores - m_safe[:, None])
            alpha = tl.exp(m - m_safe)
            l = l * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m = m_new
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(out_ptr + (q_start + rows)[:, None] * o_st + head * o_sh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


def prefill_attention(q: torch.Tensor, pool: torch.Tensor, block_tables: torch.Tensor,
                      query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                      max_query_len: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """`prefill_attention_ref`, as one launch. `max_query_len` (the longest span; computed if not given, at
    the price of a device-to-host read) sizes the grid."""
    block_size, kvh = check_query_and_pool(q, pool)
    t, h, d = q.shape
    check_tensor("block_tables", block_tables, dims=2, dtypes=(torch.int32, torch.int64), device=q.device,
                 last_dim_contiguous=True)
    spans = block_tables.shape[0]
    check_tensor("query_start_loc", query_start_loc, shape=(spans + 1,), dtypes=(torch.int32, torch.int64),
                 device=q.device)
    check_tensor("seq_lens", seq_lens, shape=(spans,), dtypes=(torch.int32, torch.int64), device=q.device)
    if out is None:
        out = torch.empty((t, h, d), dtype=q.dtype, device=q.device)
    check_tensor("out", out, shape=(t, h, d), dtypes=(q.dtype,), device=q.device, last_dim_contiguous=True)
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max()) if spans else 0
    if t == 0 or max_query_len == 0:
        return out
    grid = (spans, triton.cdiv(max_query_len, BLOCK_M), h)
    _prefill_kernel[grid](q, pool, block_tables, query_start_loc, seq_lens, out,
                          q.stride(0), q.stride(1), block_tables.stride(0), pool.stride(0), pool.stride(1),
                          pool.stride(2), pool.stride(3), out.stride(0), out.stride(1), scale, h // kvh, d,
                          BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, D_PAD=max(16, triton.next_power_of_2(d)),
                          BLOCK_SIZE=block_size,
                          # float32 stays float32: TF32 (the GPU default) would cost the engine its exactness
                          PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    return out
