"""The matmul backend on CPU: oneDNN linear over weights packed once at load time.

On the CPUs measured here (AVX-512, AMD), torch's default fp32 GEMM reaches 9-200 GFLOP/s depending on the
batch, while oneDNN with a packed weight reaches 35-500 GFLOP/s on the same shapes (bench/README.md). Results
are ordinary float32 (or bfloat16) arithmetic, only summed in another order. Where oneDNN cannot run a dtype
(float16 needs AVX512-FP16), or on CUDA, the plain `nn.Linear` stays.
"""

from __future__ import annotations

import torch
from torch import nn

# Packing picks a blocked layout for this many rows; any row count works with it.
_PACK_ROWS_HINT = 32
# Row counts are rounded up to keep this many bits below their leading one (at most 1/8 more rows; counts below
# 16 unchanged): oneDNN keeps memory for each row count it has seen, and a prefill node that saw every prompt
# length grew by gigabytes (bench/README.md, memory_soak.py). Rounded, a process sees 8 row counts per octave:
# 88 up to 8192 rows.
ROW_BITS = 3


class PackedLinear(nn.Module):
    """`nn.Linear` with its weight in oneDNN's blocked layout (an opaque tensor: not in the state dict)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), _PACK_ROWS_HINT)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        n = rows.shape[0]
        pad = padded_rows(n) - n
        if pad:  # zero rows, whose outputs are dropped: each row's result depends on that row alone
            rows = torch.nn.functional.pad(rows, (0, 0, 0, pad))
        out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return out[:n].reshape(*x.shape[:-1], self.out_features)


def padded_rows(n: int) -> int:
    """`n` rounded up to ROW_BITS bits below its leading one (unchanged below 2**(ROW_BITS + 1))."""
    shift = max(0, n.bit_length() - ROW_BITS - 1)
    return -(-n >> shift) << shift


def packing_works(dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU can run a packed linear in `dtype` and get the plain result."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        probe = nn.Linear(64, 48).to(dtype)
        x = torch.randn(5, 64, dtype=dtype)
        expected = probe(x).float()
        got = PackedLinear(probe)(x).float()
    except RuntimeError:
        return False
    return torch.allclose(got, expected, rtol=1e-2, atol=1e-2)


def pack_linears(model: nn.Module) -> int:
    """Replaces every `nn.Linear` of a CPU model by a `PackedLinear`; returns how many were packed."""
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return len(targets)
