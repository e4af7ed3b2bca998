"""Attention over the paged KV cache: torch reference implementations.

Every function takes a layer's pool `[num_blocks, 2, block_size, num_kv_heads, head_dim]` (K and V of a
block side by side) and block tables, never a per-sequence contiguous cache, so that a Triton kernel
(`engine/kernels`) can replace each one on the same `AttentionMetadata`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class AttentionMetadata:
    """One step's attention inputs, built once per step as flat tensors (`ModelRunner`), the same layout for
    the torch functions here and the Triton kernels (`engine/kernels`). Rows of the step's token layout: the
    decode rows first (one query token each, longest context first), then the prefill spans back to back.

    The `*_host` lists repeat what the torch path needs on the host (span boundaries and lengths): read on
    the CPU as they were built, never copied back from the device."""

    slot_blocks: torch.Tensor  # [T] block each new token's K/V goes to
    slot_offsets: torch.Tensor  # [T] offset inside that block
    num_decodes: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int64, padded with block 0
    decode_seq_lens: torch.Tensor  # [num_decodes] tokens in the cache, the new one included
    prefill_query_start_loc: torch.Tensor  # [S + 1] rows of the step (absolute: the first is num_decodes)
    prefill_seq_lens: torch.Tensor  # [S] tokens in the cache once the span is written (earlier chunks included)
    prefill_block_tables: torch.Tensor  # [S, max_blocks] int64, padded with block 0
    max_query_len: int  # the longest prefill span (0 without one)
    decode_seq_lens_host: list[int]
    prefill_query_start_host: list[int]
    prefill_seq_lens_host: list[int]

    @property
    def num_prefills(self) -> int:
        return len(self.prefill_seq_lens_host)


def write_kv(pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
    # k, v: [T, KVH, D]
    pool[meta.slot_blocks, 0, meta.slot_offsets] = k
    pool[meta.slot_blocks, 1, meta.slot_offsets] = v


@dataclass(slots=True)
class DecodeGroup:
    """Decode rows of similar context length, padded to the longest of them (less padding to gather)."""

    rows: slice  # rows of the step's token layout
    block_tables: torch.Tensor  # [g, max_blocks] int64, padded with block 0
    valid: torch.Tensor  # [g, max_blocks * block_size] bool: position < context length


def decode_groups(meta: AttentionMetadata, block_size: int) -> list[DecodeGroup]:
    """Splits the decode rows (longest context first) where padding to the group's longest would waste more
    than a quarter of the gathered K/V. Once per step: every layer uses the same groups."""
    lens = meta.decode_seq_lens_host
    groups = []
    start = 0
    while start < len(lens):
        width = -(-lens[start] // block_size)
        end = start + 1
        while end < len(lens) and -(-lens[end] // block_size) * 4 >= width * 3:
            end += 1
        tables = meta.decode_block_tables[start:end, :width]
        positions = torch.arange(width * block_size, device=tables.device)
        valid = positions[None, :] < meta.decode_seq_lens[start:end, None]
        groups.append(DecodeGroup(slice(start, end), tables, valid))
        start = end
    return groups


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pool: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    groups: list[DecodeGroup],
) -> torch.Tensor:
    """q: [T, H, D]; k, v: [T, KVH, D], the step's new keys/values, already written to `pool`; `groups`
    from `decode_groups(meta)`. Returns [T, H, D]. Each query attends causally to its sequence's tokens."""
    out = torch.empty_like(q)
    for group in groups:
        out[group.rows] = decode_attention(q[group.rows], pool, group.block_tables, group.valid, scale)
    starts = meta.prefill_query_start_host
    for s, ctx in enumerate(meta.prefill_seq_lens_host):
        rows = slice(starts[s], starts[s + 1])
        if ctx == rows.stop - rows.start:
            # Nothing cached before this span: its own K/V are the whole context, no gather needed.
            out[rows] = _causal_attention(q[rows], k[rows], v[rows], scale)
        else:
            ck, cv = gather_context(pool, meta.prefill_block_tables[s], ctx)
            out[rows] = _causal_attention(q[rows], ck, cv, scale)
    return out


def decode_attention(
    q: torch.Tensor,
    pool: torch.Tensor,
    block_tables: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query per sequence. q: [B, H, D] -> [B, H, D]; `valid` [B, L] masks the padded positions."""
    b, max_blocks = block_tables.shape
    _, _, block_size, kvh, d = pool.shape
    length = max_blocks * block_size
    keys, values = _gather(pool, block_tables.reshape(-1))
    keys = keys.view(b, length, kvh, d).transpose(1, 2)  # [B, KVH, L, D], read in place
    values = values.view(b, length, kvh, d).transpose(1, 2)
    # The query heads that share a KV head become that head's query rows: no K/V repeated for GQA.
    grouped = q.view(b, kvh, -1, d)
    o = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=valid[:, None, None, :], scale=scale)
    return o.reshape(b, -1, d)


def gather_context(pool: torch.Tensor, block_table: torch.Tensor, context_len: int):
    """A sequence's cached K and V as [context_len, KVH, D] each (a copy); `block_table` may be padded."""
    keys, values = _gather(pool, block_table[: -(-context_len // pool.shape[2])])
    _, _, _, kvh, d = pool.shape
    return keys.view(-1, kvh, d)[:context_len], values.view(-1, kvh, d)[:context_len]


def _gather(pool: torch.Tensor, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of `blocks` [n], each [n, block_size * KVH * D] and contiguous.

    Seen as rows of one block-half each (K of block b is row 2b, V row 2b + 1), the pool is a 2-D table
    that `index_select` copies row by row: ~5x faster on CPU than advanced indexing of the 5-D pool.
    """
    rows = pool.view(pool.shape[0] * 2, -1)
    return rows.index_select(0, blocks * 2), rows.index_select(0, blocks * 2 + 1)


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    # q: [n, H, D] are the last n of the ctx positions in k, v: [ctx, KVH, D].
    if q.device.type == "cpu" and q.dtype == torch.float32:
        return _causal_attention_blocked(q, k, v, scale)
    n, ctx = q.shape[0], k.shape[0]
    if n == ctx:
        mask, causal = None, True
    else:
        rows = torch.arange(ctx - n, ctx, device=q.device)[:, None]
        mask, causal = torch.arange(ctx, device=q.device)[None, :] <= rows, False
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
        attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True,
    )
    return o.transpose(0, 1)


PREFILL_QUERY_BLOCK = 64


def _causal_attention_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The same, as plain matmuls over blocks of 64 query rows, each against only the keys it can see.

    On one CPU core torch's fused attention kernel takes ~41 ms per layer for a 900-token prompt (8 heads
    of 64); this takes ~14 ms (bench/step_cost.py measures the whole prompt): skipping the masked half of
    the scores and batching the query heads of a KV head into one matmul (GQA folded, no K/V repeated)
    win over the kernel's tiling at these head sizes. float32 only: in bf16/fp16 the fused kernel's fp32
    accumulation is kept.
    """
    n, h, d = q.shape
    ctx, kvh, _ = k.shape
    g = h // kvh
    keys = k.permute(1, 2, 0).contiguous()  # [KVH, D, ctx]
    values = v.transpose(0, 1).contiguous()  # [KVH, ctx, D]
    out = torch.empty_like(q)
    for start in range(0, n, PREFILL_QUERY_BLOCK):
        stop = min(n, start + PREFILL_QUERY_BLOCK)
        rows, visible = stop - start, ctx - n + stop  # the block's last row sees keys [0, visible)
        grouped = q[start:stop].view(rows, kvh, g, d).permute(1, 0, 2, 3).reshape(kvh, rows * g, d)
        scores = torch.bmm(grouped, keys[:, :, :visible]).mul_(scale).view(kvh, rows, g, visible)
        # Row r is position ctx - n + start + r and sees the keys up to it.
        future = torch.ones(rows, visible, dtype=torch.bool, device=q.device).triu_(ctx - n + start + 1)
        scores.masked_fill_(future[None, :, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(kvh, rows * g, visible)
        o = torch.bmm(probs, values[:, :visible])  # [KVH, rows * g, D]
        out[start:stop] = o.view(kvh, rows, g, d).permute(1, 0, 2, 3).reshape(rows, h, d)
    return out
