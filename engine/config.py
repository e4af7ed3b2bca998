"""Typed configuration: what a checkpoint says about its model, and how an engine runs it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        if dtype not in DTYPES:
            raise ConfigError("dtype", f"{dtype!r} not supported (use one of {list(DTYPES)})")
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


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when torch sees a GPU, else "cpu"; refuses a device this machine cannot run."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError("device", f"must be cpu, cuda, cuda:N or auto, got {device!r}") from None
    if parsed.type == "cpu":
        return "cpu"
    if parsed.type != "cuda":
        raise ConfigError("device", f"must be cpu, cuda, cuda:N or auto, got {device!r}")
    if not torch.cuda.is_available():
        raise ConfigError("device", f"{device!r}: torch {torch.__version__} sees no CUDA device on this machine")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ConfigError("device", f"{device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(parsed)


KERNELS = ("auto", "torch", "triton")


def resolve_kernels(kernels: str, device: str) -> str:
    """"auto" -> "triton" on CUDA (when triton is installed), "torch" on a CPU. "triton" on a CPU runs
    Triton's interpreter, which must be switched on before any kernel is defined: TRITON_INTERPRET=1."""
    if kernels not in KERNELS:
        raise ConfigError("kernels", f"must be one of {list(KERNELS)}, got {kernels!r}")
    on_cuda = torch.device(device).type == "cuda"
    if kernels == "auto":
        return "triton" if on_cuda and _triton_installed() else "torch"
    if kernels == "triton":
        if not _triton_installed():
            raise ConfigError("kernels", "triton is not installed (pip install triton), or use --kernels torch")
        if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError("kernels", "triton on a CPU runs only under its interpreter: set TRITON_INTERPRET=1 "
                                         "(slow: for tests), or use --kernels torch")
    return kernels


def _triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(slots=True)
class EngineConfig:
    """How one engine runs a checkpoint. Every field is checked here, naming the field."""

    model: str = ""  # checkpoint folder; "" means the bundled default (stories260K)
    dtype: str | None = None  # None: the checkpoint's own dtype
    device: str = "cpu"  # "cpu", "cuda", "cuda:N" or "auto" (CUDA when present); resolved at construction
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: sized from kv_cache_bytes
    kv_cache_bytes: int = 1 << 30
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None  # None: max(4096, max_model_len)
    max_model_len: int | None = None  # None: the checkpoint's context
    enable_chunked_prefill: bool = False
    seed: int = 0  # seeds the requests that bring no seed of their own
    pack_cpu_weights: bool = True  # oneDNN packed-weight matmuls on CPU (engine/linear.py)
    kernels: str = "auto"  # "torch", "triton" or "auto" (Triton on CUDA, torch on a CPU); resolved here
    enforce_eager: bool = False  # no CUDA graphs for decode steps (they need CUDA and the Triton kernels)
    share_kv_cache: bool = False  # CPU: the KV cache in /dev/shm, mappable by another process (CUDA: always)
    tensor_parallel_size: int = 1  # ranks, one process each (the degree is checked against the model at load)


    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError("dtype", f"must be one of {list(DTYPES)}, got {self.dtype!r}")
        self.device = resolve_device(self.device)
        self.kernels = resolve_kernels(self.kernels, self.device)
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "kv_cache_bytes", "num_kv_blocks",
                     "tensor_parallel_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(name, f"must be > 0, got {value}")
        if self.max_model_len is not None and self.max_model_len <= 1:
            raise ConfigError("max_model_len", f"must be > 1, got {self.max_model_len}")
