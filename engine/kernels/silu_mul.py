"""SiLU-and-mul of the fused gate/up projection: `silu(gate) * up`, where `gate_up` is `[T, 2 * I]`
(gate in the first half, up in the second, as the loader fuses them). One read, one write, no intermediate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import FLOAT_DTYPES, check_tensor
from .reference import silu_mul_ref  # noqa: F401 - the oracle, importable beside its kernel


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, inter, gu_stride, out_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(gu_ptr + row * gu_stride + cols, mask=mask, other=0.0)
    up = tl.load(gu_ptr + row * gu_stride + inter + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # torch's silu rounds to the dtype before the product
    tl.store(out_ptr + row * out_stride + cols, silu * up, mask=mask)


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`silu_mul_ref`, fused; `out` [T, I] for a fixed address (CUDA graphs)."""
    check_tensor("gate_up", gate_up, dims=2, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    t, width = gate_up.shape
    if width % 2:
        raise ValueError(f"gate_up: its last dimension ({width}) must be even (gate and up halves)")
    inter = width // 2
    if out is None:
        out = torch.empty((t, inter), dtype=gate_up.dtype, device=gate_up.device)
    check_tensor("out", out, shape=(t, inter), dtypes=(gate_up.dtype,), device=gate_up.device,
                 last_dim_contiguous=True)
    if t and inter:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_mul_kernel[(t, triton.cdiv(inter, block))](gate_up, out, inter, gate_up.stride(0), out.stride(0),
                                                        BLOCK=block)
    return out
