"""Triton kernels for the engine's hot operations, one per file, each beside its torch reference.

Every public function checks its arguments (shape, dtype, device, strides) and names the one that is wrong
(`checks.py`), then runs the Triton kernel; `<name>_ref` (defined in `reference.py`, which needs no triton, and
re-exported by the kernel's module) is the torch reference with the same signature, the oracle of the tests
(run under `TRITON_INTERPRET=1` on a CPU, compiled for real on a GPU). Triton is an optional dependency:
importing a kernel module without it raises ImportError; the torch path needs nothing.
"""
