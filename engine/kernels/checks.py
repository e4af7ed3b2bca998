"""Argument checks for the kernel wrappers: a wrong argument is a ValueError that names it."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_tensor(name: str, t: object, *, dims: int | None = None, dtypes: Sequence[torch.dtype] | None = None,
                 device: torch.device | None = None, last_dim_contiguous: bool = False,
                 shape: Sequence[int | None] | None = None) -> torch.Tensor:
    """Returns `t` if it is a tensor that meets every given condition; otherwise raises ValueError naming
    `name` and what is wrong. In `shape`, None matches any size."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name}: expected {dims} dimensions, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
            want = "x".join("*" if s is None else str(s) for s in shape)
            raise ValueError(f"{name}: expected shape [{want}], got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name}: dtype {t.dtype} not supported (expected one of {', '.join(map(str, dtypes))})")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: on {t.device}, expected {device} (every argument on one device)")
    if last_dim_contiguous and t.dim() and t.stride(-1) != 1:
        raise ValueError(f"{name}: its last dimension must be contiguous (stride 1), got strides {t.stride()}")
    return t


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_query_and_pool(q: torch.Tensor, pool: torch.Tensor) -> tuple[int, int]:
    """For the attention kernels: q [*, H, D] and a contiguous pool [num_blocks, 2, block_size, KVH, D] on q's
    device and dtype, with a power-of-two block size and H a multiple of KVH. Returns (block_size, KVH)."""
    check_tensor("q", q, dims=3, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    h, d = q.shape[1], q.shape[2]
    check_tensor("pool", pool, dims=5, dtypes=(q.dtype,), device=q.device)
    if not pool.is_contiguous() or pool.shape[1] != 2 or pool.shape[4] != d:
        raise ValueError(f"pool: expected a contiguous [num_blocks, 2, block_size, kvh, {d}], got "
                         f"{tuple(pool.shape)} with strides {pool.stride()}")
    block_size, kvh = pool.shape[2], pool.shape[3]
    if block_size & (block_size - 1):
        raise ValueError(f"pool: block_size must be a power of two, got {block_size}")
    if h % kvh:
        raise ValueError(f"q: {h} query heads are not a multiple of the pool's {kvh} KV heads")
    return block_size, kvh
