"""KV storage in shared memory on a CPU: a /dev/shm file that another process on the host can map (the
same-device KV path, `kvtransfer/shared.py`, the CPU's stand-in for a CUDA IPC handle)."""

from __future__ import annotations

import os
import weakref
from pathlib import Path

import torch

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "baton-kv-"


def allocate_shm(shape: tuple[int, ...], dtype: torch.dtype, name: str) -> tuple[torch.Tensor, str]:
    """Zeroed storage in a new /dev/shm file (removed when the tensor is collected or the process ends;
    `remove_stale_shm` removes what a killed process left)."""
    path = SHM_DIR / f"{SHM_PREFIX}{os.getpid()}-{name}"
    if path.exists():
        path.unlink()
    numel = 1
    for s in shape:
        numel *= s
    storage = torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)
    weakref.finalize(storage, _unlink, str(path))
    return storage, str(path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_stale_shm() -> int:
    """Removes the /dev/shm KV files of processes that no longer run; returns how many."""
    removed = 0
    for path in SHM_DIR.glob(f"{SHM_PREFIX}*"):
        pid = path.name[len(SHM_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _unlink(str(path))
            removed += 1
    return removed
