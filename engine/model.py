"""The Llama-family decoder (Llama, Llama 3, Mistral, Qwen2) as plain PyTorch modules.

Tokens of all sequences in a step are flattened into one `[T, hidden]` batch (no padding); attention is the
only place that looks at sequence boundaries, through `AttentionMetadata` and the paged KV pool.
q/k/v and gate/up are fused into one matmul each (the loader concatenates the checkpoint's tensors). Every
other hot operation goes through `ops` (`engine/ops.py`): torch, or the Triton kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .attention import AttentionMetadata
from .config import ModelConfig
from .ops import Step, TorchOps, TritonOps
from .parallel import Shard, TPGroup, all_reduce, whole
from .rope import RotaryEmbedding

Ops = TorchOps | TritonOps


class RMSNorm(nn.Module):
    """Holds the weight; the backend normalises, adding the residual first when one is given (fused on
    Triton): returns (normalised, the new residual)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, ops: Ops, x: torch.Tensor, residual: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard) -> None:
        super().__init__()
        # This rank's heads only (all of them without tensor parallelism).
        self.num_heads, self.num_kv_heads, self.head_dim = shard.num_heads, shard.num_kv_heads, cfg.head_dim
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)  # row-parallel
        self.scale = cfg.head_dim**-0.5
        self.tp: TPGroup | None = None

    def forward(self, ops: Ops, x: torch.Tensor, step: Step, pool: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        # The query and key heads are adjacent in each row: rotated together, one pass.
        qk = ops.rotary(qkv[:, : self.q_size + self.kv_size].view(t, self.num_heads + self.num_kv_heads,
                                                                   self.head_dim), step)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        o = ops.attention(q, k, v, pool, step, self.scale)
        return all_reduce(self.o_proj(o.reshape(t, self.q_size)), self.tp)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * shard.intermediate, bias=cfg.mlp_bias)  # column-parallel
        self.down_proj = nn.Linear(shard.intermediate, cfg.hidden_size, bias=cfg.mlp_bias)  # row-parallel
        self.tp: TPGroup | None = None

    def forward(self, ops: Ops, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.down_proj(ops.silu_mul(self.gate_up_proj(x))), self.tp)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, shard)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, shard)

    def forward(self, ops: Ops, x: torch.Tensor, residual: torch.Tensor | None, step: Step, pool: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it is added): the next norm adds
        them, so each residual addition is fused into the norm that follows it."""
        h, residual = self.input_layernorm(ops, x, residual)
        h = self.self_attn(ops, h, step, pool)
        h, residual = self.post_attention_layernorm(ops, h, residual)
        return self.mlp(ops, h), residual


class CausalLM(nn.Module):
    """Build under `torch.device("meta")` and fill with the loader; `rotary` is made beforehand, for real.
    `ops` (torch or Triton) is set by the loader once the weights are in place."""

    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, shard: Shard | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.shard = shard = shard or whole(cfg)
        vocab = shard.vocab_end - shard.vocab_start  # vocabulary-parallel: this rank's rows
        self.embed_tokens = nn.Embedding(vocab, cfg.hidden_size)
        self.rotary = rotary
        self.layers = nn.ModuleList(DecoderLayer(cfg, shard) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # With tied embeddings the loader gives lm_head the embedding's tensor (shared, not copied).
        self.lm_head = nn.Linear(cfg.hidden_size, vocab, bias=False)
        self.ops: Ops | None = None
        self.tp: TPGroup | None = None

    def set_tp(self, tp: TPGroup) -> None:
        """The group of this model's ranks: every row-parallel layer ends with an all-reduce over it."""
        self.tp = tp
        for layer in self.layers:
            layer.self_attn.tp = layer.mlp.tp = tp

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_pools: list[torch.Tensor],  # one [num_blocks, 2, bs, KVH, D] per layer
        meta: AttentionMetadata,
        after_layer: Callable[[int], None] | None = None,  # called once layer i's K/V are in the pool
    ) -> torch.Tensor:
        ops = self.ops
        x = self._embed(input_ids)
        step = ops.prepare(meta, positions, x.dtype)
        residual = None
        for i, (layer, pool) in enumerate(zip(self.layers, kv_pools, strict=True)):
            x, residual = layer(ops, x, residual, step, pool)
            if after_layer is not None:
                after_layer(i)
        return self.norm(ops, x, residual)[0]  # [T, hidden]

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return self.embed_tokens(input_ids)
        # This rank's rows only: other ids look up zeros, and the all-reduce fills them in from their ranks.
        local = input_ids - self.shard.vocab_start
        mine = (local >= 0) & (local < self.embed_tokens.num_embeddings)
        x = self.embed_tokens(torch.where(mine, local, 0)) * mine[:, None].to(self.embed_tokens.weight.dtype)
        return all_reduce(x, self.tp)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()  # [N, this rank's vocabulary]
        return logits if self.tp is None else self.tp.gather_vocab(logits)  # [N, vocab]
