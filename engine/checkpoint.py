"""What a checkpoint folder says about its model, read without torch: a router reads its models' configs
and names through this module and never loads torch (`config` adds the torch-side settings)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

DEFAULT_MODEL = Path(__file__).parent / "default_model"  # stories260K, see its README.md

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

# The torch dtypes by these names are in `config.DTYPES` (this module loads without torch).
DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """`rope_type` 'default', 'linear' or 'llama3' (the others are refused at load time)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True, slots=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    dtype: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                "num_key_value_heads",
                f"{self.num_kv_heads} does not divide num_attention_heads ({self.num_heads})",
            )

    @property
    def max_model_len(self) -> int:
        # Baton does not implement sliding-window attention: a context no longer than the window is exact.
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @classmethod
    def from_folder(cls, folder: Path) -> ModelConfig:
        raw = _read_json(folder / "config.json", required=True)
        gen = _read_json(folder / "generation_config.json", required=False)
        return cls.from_dict(raw, gen)

    @classmethod
    def from_dict(cls, raw: dict, gen: dict | None = None) -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ConfigError(
                "architectures", f"{archs} not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        hidden = _req(raw, "hidden_size")
        heads = _req(raw, "num_attention_heads")
        head_dim = raw.get("head_dim") or hidden // heads
        is_qwen2 = arch == "Qwen2ForCausalLM"
        if is_qwen2 and raw.get("use_sliding_window"):
            raise ConfigError("use_sliding_window", "sliding-window attention is not supported")
        window = None if is_qwen2 else raw.get("sliding_window")
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        if dtype not in DTYPE_NAMES:
            raise ConfigError("dtype", f"{dtype!r} not supported (use one of {list(DTYPE_NAMES)})")
        eos = (gen or {}).get("eos_token_id", raw.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        bos = (gen or {}).get("bos_token_id", raw.get("bos_token_id"))
        attention_bias = bool(raw.get("attention_bias", False))
        return cls(
            architecture=arch,
            vocab_size=_req(raw, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_req(raw, "intermediate_size"),
            num_layers=_req(raw, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(raw),
            rope_scaling=_rope_scaling(raw),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=is_qwen2 or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            dtype=dtype,
            bos_token_id=bos,
            eos_token_ids=eos_ids,
            sliding_window=window,
        )


def _read_json(path: Path, required: bool) -> dict | None:
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"checkpoint file missing: {path}")
        return None
    with path.open() as f:
        return json.load(f)


def _req(raw: dict, key: str):
    if key not in raw:
        raise ConfigError(key, "required in config.json, missing")
    return raw[key]


def _rope_params(raw: dict) -> dict:
    # transformers 5 writes `rope_parameters` (holding rope_theta too); 4.x wrote `rope_scaling`.
    return raw.get("rope_parameters") or raw.get("rope_scaling") or {}


def _rope_theta(raw: dict) -> float:
    return float(_rope_params(raw).get("rope_theta", raw.get("rope_theta", 10000.0)))


def _rope_scaling(raw: dict) -> RopeScaling:
    p = _rope_params(raw)
    rope_type = p.get("rope_type", p.get("type", "default"))
    if rope_type == "default":
        return RopeScaling()
    if rope_type == "linear":
        return RopeScaling("linear", factor=float(p["factor"]))
    if rope_type == "llama3":
        return RopeScaling(
            "llama3",
            factor=float(p["factor"]),
            low_freq_factor=float(p["low_freq_factor"]),
            high_freq_factor=float(p["high_freq_factor"]),
            original_max_position_embeddings=int(p["original_max_position_embeddings"]),
        )
    raise ConfigError("rope_type", f"{rope_type!r} not supported (default, linear, llama3)")


def served_name(folder: Path) -> str:
    """A model's name in a cluster when none is given: the bundled model's is stories260K, another's its
    folder's name (what nodes register and routers serve it as)."""
    return "stories260K" if Path(folder) == DEFAULT_MODEL else Path(folder).name


def resolve_model_path(model: str) -> Path:
    folder = Path(model).expanduser() if model else DEFAULT_MODEL
    if not folder.is_dir():
        raise ConfigError("model", f"no checkpoint folder at {folder}")
    if not (folder / "config.json").is_file():
        raise ConfigError("model", f"{folder} holds no config.json")
    return folder
