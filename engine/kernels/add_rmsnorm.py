"""Fused residual add + RMSNorm: `residual += x; out = weight * rmsnorm(residual)`, one read of each row.

A decoder layer ends every sub-block with exactly this pair; fused, the row is read once and written twice
(the new residual and the normalised output) instead of two launches and three passes. Without a residual
(the first layer's input norm) it is a plain RMSNorm and `x` is the residual.
Shapes: x, residual [T, H] (rows may be strided, the last dimension contiguous), weight [H].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import FLOAT_DTYPES, check_tensor
from .reference import add_rmsnorm_ref  # noqa: F401 - the oracle, importable beside its kernel


@triton.jit
def _add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr, n_cols, x_stride, res_stride, out_stride,
                        new_res_stride, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        added = x + r  # in the model dtype, as the reference adds
        tl.store(new_res_ptr + row * new_res_stride + cols, added, mask=mask)
    else:
        added = x
    h = added.to(tl.float32)
    var = tl.sum(h * h, axis=0) / n_cols
    normed = (h * (1.0 / tl.sqrt(var + eps))).to(x.dtype)  # back to the model dtype before the weight
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * out_stride + cols, w * normed, mask=mask)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """`add_rmsnorm_ref`, fused. `out` / `residual_out` ([T, H], given for fixed addresses such as CUDA
    graphs need) may alias `x` / `residual`: each row is read whole before it is written. Without a
    residual, `x` is returned as the residual (`residual_out` must then be left out)."""
    check_tensor("x", x, dims=2, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    t, h = x.shape
    check_tensor("weight", weight, shape=(h,), dtypes=(x.dtype,), device=x.device, last_dim_contiguous=True)
    if out is None:
        out = torch.empty((t, h), dtype=x.dtype, device=x.device)
    check_tensor("out", out, shape=(t, h), dtypes=(x.dtype,), device=x.device, last_dim_contiguous=True)
    if residual is None:
        if residual_out is not None:
            raise ValueError("residual_out: given without a residual (x is then the residual)")
        new_res, residual = x, x
    else:
        check_tensor("residual", residual, shape=(t, h), dtypes=(x.dtype,), device=x.device,
                     last_dim_contiguous=True)
        new_res = torch.empty_like(out) if residual_out is None else residual_out
        check_tensor("residual_out", new_res, shape=(t, h), dtypes=(x.dtype,), device=x.device,
                     last_dim_contiguous=True)
    if t:
        _add_rmsnorm_kernel[(t,)](x, residual, weight, out, new_res, h, x.stride(0), residual.stride(0),
                                  out.stride(0), new_res.stride(0), eps, HAS_RESIDUAL=new_res is not x,
                                  BLOCK=triton.next_power_of_2(h))
    return out, new_res
