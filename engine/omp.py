"""One OpenMP team per process: the one on the thread that runs the model.

The OpenMP runtime keeps a team of worker threads for every thread that has run a parallel region (a torch op
over more elements than its grain), for as long as that thread lives. Once libgomp manages more threads than the
machine has CPUs it stops spinning at its barriers and sleeps in the kernel instead, so every parallel op then
pays a futex wake-up per worker. A node loads its weights on one thread, serves gRPC on another and moves KV on
others: each that had run one parallel op throttled the engine's thread. Measured on the 51M Llama, eight
requests in flight, 2-core AMD EPYC VM (bench/README "Beside vLLM"): the engine behind its event loop made
455 tokens/s with the loader's and the loop's teams alive, 706 with them gone, what the same loop makes on a
process's only thread.

So an engine is built on the thread that runs it (`AsyncEngine.start`), and every other thread that may touch
tensors runs its ops on itself alone (`serial_torch`).
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t (OpenMP 5.0): a paused runtime starts its threads again when needed
_RUNTIMES = ("libgomp", "libiomp", "libomp")  # GNU, Intel, LLVM: all three export the standard omp_* API


@functools.cache
def _runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch loaded (found in this process's mappings: wheels bundle their own copy), or None
    (no OpenMP, or not Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if ".so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        if os.path.basename(path).startswith(_RUNTIMES):
            try:
                return ctypes.CDLL(path)  # already loaded: this only hands back its handle
            except OSError:
                return None
    return None


def serial_torch() -> bool:
    """Makes torch run this thread's ops on this thread alone, and lets go of any team it had, so that the
    engine's thread keeps the process's only team. Call it on the thread itself (an executor's initializer).
    Returns whether an OpenMP runtime was there to tell."""
    omp = _runtime()
    if omp is None:
        return False
    torch.get_num_threads()  # torch sets a thread's OpenMP thread count on its first op: before ours, not after
    omp.omp_set_num_threads(1)  # this thread's own setting (an OpenMP ICV): other threads keep theirs
    if hasattr(omp, "omp_pause_resource_all"):
        omp.omp_pause_resource_all(_OMP_PAUSE_SOFT)  # the team it already had, if any, goes
    return True
