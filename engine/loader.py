"""Load a Hugging Face checkpoint folder into a `CausalLM`: config, safetensors (single or sharded), checks."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .config import DTYPES, ModelConfig
from .errors import ConfigError
from .linear import pack_linears, packing_works
from .model import CausalLM
from .rope import RotaryEmbedding

DEFAULT_MODEL = Path(__file__).parent / "default_model"  # stories260K, see its README.md

# Tensors some checkpoints carry that the model recomputes or does not need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_model_path(model: str) -> Path:
    folder = Path(model).expanduser() if model else DEFAULT_MODEL
    if not folder.is_dir():
        raise ConfigError("model", f"no checkpoint folder at {folder}")
    if not (folder / "config.json").is_file():
        raise ConfigError("model", f"{folder} holds no config.json")
    return folder


def load_model(
    folder: Path, cfg: ModelConfig, dtype: str, device: str, max_positions: int, pack_cpu_weights: bool = True
) -> CausalLM:
    rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling).to(device)
    with torch.device("meta"):
        model = CausalLM(cfg, rotary)
    tensors = _read_safetensors(folder)
    state = _build_state(cfg, tensors, DTYPES[dtype], device)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    if pack_cpu_weights and torch.device(device).type == "cpu" and packing_works(DTYPES[dtype]):
        pack_linears(model)
    return model


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.is_file():
        with index.open() as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif single.is_file():
        files = [single.name]
    else:
        raise ConfigError("model", f"no model.safetensors or model.safetensors.index.json in {folder}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise ConfigError("model", f"shard {path} listed in the index is missing")
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


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
    cfg: ModelConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device: str
) -> dict[str, torch.Tensor]:
    expected = _expected_shapes(cfg)
    for name, shape in expected.items():
        if name not in tensors:
            raise ConfigError(name, "tensor missing from the checkpoint")
        if tuple(tensors[name].shape) != shape:
            raise ConfigError(name, f"shape {tuple(tensors[name].shape)} in the checkpoint, expected {shape}")
    for name in tensors:
        tied_head = name == "lm_head.weight" and cfg.tie_word_embeddings
        if name not in expected and not tied_head and not name.endswith(_IGNORED_SUFFIXES):
            raise ConfigError(name, f"unexpected tensor for {cfg.architecture}")

    def take(*names: str) -> torch.Tensor:
        parts = [tensors[n] for n in names]
        joined = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return joined.to(device=device, dtype=dtype).contiguous()

    state = {"embed_tokens.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    tied = cfg.tie_word_embeddings
    state["lm_head.weight"] = state["embed_tokens.weight"] if tied else take("lm_head.weight")
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        attn, mlp = src + "self_attn.", src + "mlp."
        state[dst + "input_layernorm.weight"] = take(src + "input_layernorm.weight")
        state[dst + "post_attention_layernorm.weight"] = take(src + "post_attention_layernorm.weight")
        for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            state[dst + f"self_attn.qkv_proj.{kind}"] = take(*(attn + f"{n}_proj.{kind}" for n in "qkv"))
        for kind in ("weight", "bias") if cfg.o_bias else ("weight",):
            state[dst + f"self_attn.o_proj.{kind}"] = take(attn + f"o_proj.{kind}")
        for kind in ("weight", "bias") if cfg.mlp_bias else ("weight",):
            state[dst + f"mlp.gate_up_proj.{kind}"] = take(mlp + f"gate_proj.{kind}", mlp + f"up_proj.{kind}")
            state[dst + f"mlp.down_proj.{kind}"] = take(mlp + f"down_proj.{kind}")
    return state
