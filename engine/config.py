"""Typed configuration: what a checkpoint says about its model, and how an engine runs it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .checkpoint import DTYPE_NAMES, SUPPORTED_ARCHITECTURES, ModelConfig, RopeScaling  # noqa: F401 (re-exported)
from .errors import ConfigError

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


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
    max_num_batched_tokens: int | None = None  # None: max(4096, max_model_len) (`step_tokens`)
    max_model_len: int | None = None  # None: the checkpoint's context
    enable_chunked_prefill: bool = False
    enable_prefix_caching: bool = True  # full blocks kept for their contents and reused (engine/block_manager.py)
    kv_offload_bytes: int = 0  # the prefix cache's second tier (engine/offload.py); 0: none
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
        if not (isinstance(self.kv_offload_bytes, int) and self.kv_offload_bytes >= 0):
            raise ConfigError("kv_offload_bytes", f"must be >= 0 (0: off), got {self.kv_offload_bytes!r}")
        if self.kv_offload_bytes and not self.enable_prefix_caching:
            raise ConfigError("kv_offload_bytes", "the second tier keeps the prefix cache's blocks: turn prefix "
                                                  "caching on")
        if self.kv_offload_bytes and self.tensor_parallel_size > 1:
            raise ConfigError("kv_offload_bytes", "one rank only so far (the other ranks' pools are in their own "
                                                  "processes)")
        if self.max_model_len is not None and self.max_model_len <= 1:
            raise ConfigError("max_model_len", f"must be > 1, got {self.max_model_len}")


def step_tokens(config: EngineConfig, max_model_len: int) -> int:
    """The most tokens one engine step computes: `max_num_batched_tokens`, or max(4096, max_model_len)."""
    return config.max_num_batched_tokens or max(4096, max_model_len)


def transfer_tokens(config: EngineConfig, max_model_len: int) -> int:
    """The most prompt tokens one step's KV transfers carry (a chunked prompt's blocks go once it is whole)."""
    return max(step_tokens(config, max_model_len), max_model_len)
