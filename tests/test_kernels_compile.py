"""Every Triton kernel compiles for an H100/H200 (sm_90) down to a cubin, on this CPU machine: Triton's
ahead-of-time path with its bundled ptxas (`engine/kernels/compile_check.py`). The interpreter accepts what a
GPU compiler refuses; this does not. Run in a subprocess, without TRITON_INTERPRET."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=ENV)


def test_every_kernel_compiles_for_sm90():
    proc = run("import sys; from baton.engine.kernels.compile_check import main; sys.exit(main(['--quick']))")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "compiled 22 of 22 kernel configurations for sm_90" in proc.stdout


def test_the_check_fails_on_what_a_gpu_refuses():
    """A head dim of 8 unpadded: the interpreter runs tl.dot on it, a GPU needs at least 16 along K."""
    proc = run(
        "from baton.engine.kernels.compile_check import Config, compile_one\n"
        "c = Config('prefill_attention._prefill_kernel', dict(q_ptr='*bf16', pool_ptr='*bf16', tables_ptr='*i64',"
        " qsl_ptr='*i64', lens_ptr='*i64', out_ptr='*bf16'), dict(BLOCK_M=16, BLOCK_N=32, D_PAD=8, BLOCK_SIZE=16,"
        " PRECISION='tf32'))\n"
        "try:\n    compile_one(c, 90)\nexcept Exception as e:\n    print('refused:', type(e).__name__)\n"
        "else:\n    print('compiled')\n")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "refused:" in proc.stdout, proc.stdout
