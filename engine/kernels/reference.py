"""The torch references of the Triton kernels, one per kernel with the kernel's signature: the oracle of
tests/test_kernels.py and the baseline of bench/kernel_speed.py. Each kernel module re-exports its own (`<name>_ref`).
This module needs no triton, so a CPU-only install can import it. They are the engine's own torch code
(`engine/attention.py`, `engine/ops.py`, `engine/rope.py`), called through the kernels' signatures.
"""

from __future__ import annotations

import torch

from baton.engine.attention import _causal_attention, decode_attention, gather_context
from baton.engine.ops import add_rms_norm, silu_and_mul
from baton.engine.rope import apply_rotary_one


# The engine's own torch functions, under the kernels' names.
add_rmsnorm_ref = add_rms_norm
silu_mul_ref = silu_and_mul


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return apply_rotary_one(x, cos[positions].unsqueeze(1).to(x.dtype), sin[positions].unsqueeze(1).to(x.dtype))


def store_kv_ref(pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_blocks: torch.Tensor,
                 slot_offsets: torch.Tensor) -> None:
    real = slot_blocks >= 0
    pool[slot_blocks[real], 0, slot_offsets[real]] = k[real]
    pool[slot_blocks[real], 1, slot_offsets[real]] = v[real]


def decode_attention_ref(q: torch.Tensor, pool: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """The engine's own torch decode attention, given lengths instead of a mask."""
    length = block_tables.shape[1] * pool.shape[2]
    valid = torch.arange(length, device=q.device)[None, :] < seq_lens[:, None]
    return decode_attention(q, pool, block_tables.long(), valid, scale)


def prefill_attention_ref(q: torch.Tensor, pool: torch.Tensor, block_tables: torch.Tensor,
                          query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The engine's own torch path, span by span."""
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for s, ctx in enumerate(seq_lens.tolist()):
        rows = slice(starts[s], starts[s + 1])
        if rows.stop > rows.start:
            k, v = gather_context(pool, block_tables[s].long(), ctx)
            out[rows] = _causal_attention(q[rows], k, v, scale)
    return out
