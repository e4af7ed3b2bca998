"""The model's hot operations behind one small interface, in torch (`TorchOps`) or Triton (`TritonOps`).

The model calls only these for normalisation, rotary embedding, the MLP's activation, the K/V store and
attention; matmuls stay `nn.Linear`. Both backends take the same `AttentionMetadata` and give the same
results up to float rounding, so `--kernels` changes the speed, never the tokens (tests/test_engine_kernels.py
checks a whole generation with each against transformers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .attention import AttentionMetadata, DecodeGroup, decode_groups, paged_attention, write_kv
from .rope import RotaryEmbedding, apply_rotary_one

@dataclass(slots=True)
class Step:
    """What every layer of one step shares: the metadata, the positions, and each backend's precomputed
    extras (torch: the rotary cos/sin of each token and the decode groups)."""

    meta: AttentionMetadata
    positions: torch.Tensor  # [T]
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    groups: list[DecodeGroup] = field(default_factory=list)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 whatever the model dtype, then scale in the model dtype (as transformers does).
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * rmsnorm(x + residual), x + residual); without a residual, x is the residual."""
    added = x if residual is None else x + residual
    return rms_norm(added, weight, eps), added


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of the fused gate/up projection [T, 2 * I] (gate in the first half)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class TorchOps:
    name = "torch"

    def __init__(self, rotary: RotaryEmbedding, block_size: int) -> None:
        self.rotary_tables = rotary
        self.block_size = block_size

    def prepare(self, meta: AttentionMetadata, positions: torch.Tensor, dtype: torch.dtype) -> Step:
        return Step(meta, positions, self.rotary_tables(positions, dtype), decode_groups(meta, self.block_size))

    rms_norm = staticmethod(add_rms_norm)
    silu_mul = staticmethod(silu_and_mul)

    def rotary(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """x [T, heads, head_dim] (the query and key heads together) rotated by each token's position."""
        return apply_rotary_one(x, *step.rope)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pool: torch.Tensor, step: Step,
                  scale: float) -> torch.Tensor:
        """Stores the step's new K/V in `pool`, then attends: [T, H, D]."""
        write_kv(pool, k, v, step.meta)
        return paged_attention(q, k, v, pool, step.meta, scale, step.groups)


class TritonOps:
    """The Triton kernels of `engine/kernels`: compiled on CUDA, interpreted on a CPU (TRITON_INTERPRET=1)."""

    name = "triton"

    def __init__(self, rotary: RotaryEmbedding, block_size: int) -> None:
        from .kernels import add_rmsnorm, decode_attention, kv_store, prefill_attention, rotary as rot, silu_mul

        self._k = (add_rmsnorm.add_rmsnorm, rot.rotary, silu_mul.silu_mul, kv_store.store_kv,
                   decode_attention.decode_attention, prefill_attention.prefill_attention)
        self.rotary_tables = rotary
        self.block_size = block_size

    def prepare(self, meta: AttentionMetadata, positions: torch.Tensor, dtype: torch.dtype) -> Step:
        return Step(meta, positions)

    def rms_norm(self, x, residual, weight, eps):
        return self._k[0](x, residual, weight, eps)

    def rotary(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        # In place: x is a view of the fused QKV projection's output, which nothing else reads.
        return self._k[1](x, self.rotary_tables.cos, self.rotary_tables.sin, step.positions, out=x)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._k[2](gate_up)

    def attention(self, q, k, v, pool, step: Step, scale: float) -> torch.Tensor:
        meta = step.meta
        self._k[3](pool, k, v, meta.slot_blocks, meta.slot_offsets)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        nd = meta.num_decodes
        if nd:
            self._k[4](q[:nd], pool, meta.decode_block_tables, meta.decode_seq_lens, scale, out=out[:nd])
        if meta.num_prefills:
            self._k[5](q, pool, meta.prefill_block_tables, meta.prefill_query_start_loc, meta.prefill_seq_lens,
                       scale, max_query_len=meta.max_query_len, out=out)
        return out


def make_ops(kernels: str, rotary: RotaryEmbedding, block_size: int) -> TorchOps | TritonOps:
    """The backend for a resolved `kernels` ("torch" or "triton")."""
    return TritonOps(rotary, block_size) if kernels == "triton" else TorchOps(rotary, block_size)
