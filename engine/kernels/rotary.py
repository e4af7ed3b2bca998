"""Rotary position embedding from positions: each token's heads rotated by the cos/sin of its position,
read from the engine's precomputed float32 tables (so default, linear and Llama-3 scaling alike, whatever
computed the frequencies). One program per token (all its heads); the output may be the input (in place).

Shapes: x [T, heads, head_dim] (a token's heads contiguous, tokens may be strided, as slices of the fused QKV
projection are); cos, sin [max_positions, head_dim] float32 (two equal halves, `rope.RotaryEmbedding`);
positions [T] int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import FLOAT_DTYPES, check_tensor
from .reference import rotary_ref  # noqa: F401 - the oracle, importable beside its kernel


@triton.jit
def _rotary_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, pos_ptr, x_token_stride, x_head_stride, out_token_stride,
                   out_head_stride, table_stride, heads, half, HEADS: tl.constexpr, BLOCK: tl.constexpr):
    # One program per token, all its heads at once: the token's cos/sin row is loaded once.
    t = tl.program_id(0)
    h = tl.arange(0, HEADS)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (h < heads) & (cols < half)
    pos = tl.load(pos_ptr + t)
    src = x_ptr + t * x_token_stride + h * x_head_stride
    x1 = tl.load(src + cols, mask=mask, other=0.0)
    x2 = tl.load(src + half + cols, mask=mask, other=0.0)
    # The tables' halves are equal: the first half's cos/sin serve both.
    c = tl.load(cos_ptr + pos * table_stride + cols, mask=cols < half, other=0.0).to(x1.dtype)
    s = tl.load(sin_ptr + pos * table_stride + cols, mask=cols < half, other=0.0).to(x1.dtype)
    dst = out_ptr + t * out_token_stride + h * out_head_stride
    tl.store(dst + cols, x1 * c - x2 * s, mask=mask)
    tl.store(dst + half + cols, x2 * c + x1 * s, mask=mask)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """`rotary_ref`, fused; `out` may be `x` (in place) or another [T, heads, head_dim] tensor."""
    check_tensor("x", x, dims=3, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    t, heads, d = x.shape
    if d % 2:
        raise ValueError(f"x: head_dim must be even, got {d}")
    check_tensor("cos", cos, dims=2, dtypes=(torch.float32,), device=x.device, shape=(None, d),
                 last_dim_contiguous=True)
    check_tensor("sin", sin, shape=tuple(cos.shape), dtypes=(torch.float32,), device=x.device)
    if sin.stride() != cos.stride():
        raise ValueError(f"sin: strides {sin.stride()} differ from cos's {cos.stride()}")
    check_tensor("positions", positions, shape=(t,), dtypes=(torch.int64, torch.int32), device=x.device)
    if out is None:
        out = torch.empty((t, heads, d), dtype=x.dtype, device=x.device)
    check_tensor("out", out, shape=(t, heads, d), dtypes=(x.dtype,), device=x.device, last_dim_contiguous=True)
    if t and heads:
        half = d // 2
        _rotary_kernel[(t,)](x, out, cos, sin, positions, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
                             cos.stride(0), heads, half, HEADS=triton.next_power_of_2(heads),
                             BLOCK=triton.next_power_of_2(half))
    return out
