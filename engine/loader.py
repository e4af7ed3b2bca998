"""Load a Hugging Face checkpoint folder into a `CausalLM`: config, safetensors (single or sharded), checks."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from .config import DTYPES, ModelConfig
from .errors import ConfigError
from .linear import pack_linears, packing_works
from .model import CausalLM
from .parallel import Shard, whole
from .rope import RotaryEmbedding

# Tensors some checkpoints carry that the model recomputes or does not need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_model(
    folder: Path, cfg: ModelConfig, dtype: str, device: str, max_positions: int, pack_cpu_weights: bool = True,
    shard: Shard | None = None,
) -> CausalLM:
    """The model, or with `shard` the part of it one tensor-parallel rank holds: each rank reads only its
    slices of the checkpoint (memory-mapped), never the whole model."""
    shard = shard or whole(cfg)
    rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling).to(device)
    with torch.device("meta"):
        model = CausalLM(cfg, rotary, shard)
    with ExitStack() as files:
        checkpoint = _Checkpoint(folder, files)
        state = _build_state(cfg, checkpoint, DTYPES[dtype], device, shard)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    if pack_cpu_weights and torch.device(device).type == "cpu" and packing_works(DTYPES[dtype]):
        pack_linears(model)
    return model


class _Checkpoint:
    """The checkpoint's tensors by name, read on demand (a slice reads only its bytes of the mapped file)."""

    def __init__(self, folder: Path, files: ExitStack) -> None:
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index.is_file():
            with index.open() as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        elif single.is_file():
            names = [single.name]
        else:
            raise ConfigError("model", f"no model.safetensors or model.safetensors.index.json in {folder}")
        self._where = {}
        for name in names:
            path = folder / name
            if not path.is_file():
                raise ConfigError("model", f"shard {path} listed in the index is missing")
            handle = files.enter_context(safe_open(str(path), framework="pt"))
            for key in handle.keys():
                self._where[key] = handle

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())

    def read(self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None
             ) -> torch.Tensor:
        part = self._where[name].get_slice(name)
        if rows is None and cols is None:
            return part[:]
        r = slice(*rows) if rows else slice(None)
        return part[r] if cols is None else part[r, slice(*cols)]


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv, inter = cfg.num_heads * d, cfg.num_kv_heads * d, cfg.intermediate_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        }
        if cfg.qkv_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,)}
        if cfg.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if cfg.mlp_bias:
            shapes |= {p + f"mlp.{n}_proj.bias": (s,) for n, s in (("gate", inter), ("up", inter), ("down", h))}
    return shapes


def _build_state(
    cfg: ModelConfig, checkpoint: _Checkpoint, dtype: torch.dtype, device: str, shard: Shard
) -> dict[str, torch.Tensor]:
    expected = _expected_shapes(cfg)
    names = checkpoint.names()
    for name, shape in expected.items():
        if name not in names:
            raise ConfigError(name, "tensor missing from the checkpoint")
        if checkpoint.shape(name) != shape:
            raise ConfigError(name, f"shape {checkpoint.shape(name)} in the checkpoint, expected {shape}")
    for name in names:
        tied_head = name == "lm_head.weight" and cfg.tie_word_embeddings
        if name not in expected and not tied_head and not name.endswith(_IGNORED_SUFFIXES):
            raise ConfigError(name, f"unexpected tensor for {cfg.architecture}")

    d = cfg.head_dim
    q_rows = (shard.head_start * d, (shard.head_start + shard.num_heads) * d)
    kv_rows = (shard.kv_head_start * d, (shard.kv_head_start + shard.num_kv_heads) * d)
    inter = (shard.inter_start, shard.inter_end)
    vocab = (shard.vocab_start, shard.vocab_end)

    def take(*parts: tuple) -> torch.Tensor:
        """(name, rows, cols) slices, joined along the rows: a fused layer's parts."""
        read = [checkpoint.read(*p) for p in parts]
        joined = read[0] if len(read) == 1 else torch.cat(read, dim=0)
        return joined.to(device=device, dtype=dtype).contiguous()

    def once(name: str) -> torch.Tensor:
        """A row-parallel layer's bias: added after the all-reduce's sum, so held by rank 0 alone."""
        t = take((name,))
        return t if shard.rank == 0 else torch.zeros_like(t)

    state = {"embed_tokens.weight": take(("model.embed_tokens.weight", vocab)),
             "norm.weight": take(("model.norm.weight",))}
    tied = cfg.tie_word_embeddings
    state["lm_head.weight"] = state["embed_tokens.weight"] if tied else take(("lm_head.weight", vocab))
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        attn, mlp = src + "self_attn.", src + "mlp."
        state[dst + "input_layernorm.weight"] = take((src + "input_layernorm.weight",))
        state[dst + "post_attention_layernorm.weight"] = take((src + "post_attention_layernorm.weight",))
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            state[dst + f"self_attn.qkv_proj.{kind}"] = take(
                (attn + f"q_proj.{kind}", q_rows), (attn + f"k_proj.{kind}", kv_rows), (attn + f"v_proj.{kind}", kv_rows))
        state[dst + "self_attn.o_proj.weight"] = take((attn + "o_proj.weight", None, q_rows))
        if cfg.o_bias:
            state[dst + "self_attn.o_proj.bias"] = once(attn + "o_proj.bias")
        for kind in ("weight", "bias") if cfg.mlp_bias else ("weight",):
            state[dst + f"mlp.gate_up_proj.{kind}"] = take((mlp + f"gate_proj.{kind}", inter),
                                                           (mlp + f"up_proj.{kind}", inter))
        state[dst + "mlp.down_proj.weight"] = take((mlp + "down_proj.weight", None, inter))
        if cfg.mlp_bias:
            state[dst + "mlp.down_proj.bias"] = once(mlp + "down_proj.bias")
    return state
