"""The C allocator's settings for an engine's process: large blocks are kept for reuse, not given back.

glibc serves an allocation of more than `M_MMAP_THRESHOLD` (128 KiB to start, adjusted up to 32 MiB as blocks are
freed) with a fresh mmap and returns it to the kernel on free, so every step's activations (a prompt's [tokens,
hidden] and [tokens, intermediate] tensors: megabytes each, dozens a step) arrive as new pages that the kernel
must fault in and zero. Measured on the 51M Llama, 2-core AMD EPYC VM (bench/README "Beside vLLM"): eight
requests in flight make 330 tokens/s with glibc's defaults and 505 with allocations up to 256 MiB kept in its
heaps. What the heaps keep is what the largest step needed (the memory soak bounds the node's growth).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
KEEP_BYTES = 256 << 20  # larger blocks (the KV pool, the weights' biggest tensors) are still mmapped


def keep_large_allocations() -> bool:
    """Sets this process's allocator to serve and keep blocks up to KEEP_BYTES from its heaps (glibc only; a
    no-op elsewhere). Returns whether it did."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES))
    if not ok:
        log.info("mallopt refused: the allocator keeps its defaults")
    return ok
