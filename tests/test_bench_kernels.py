"""bench/kernel_speed.py: its quick CPU run writes sane rows, and what its CUDA run times is the right work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "kernel_speed.py"
KERNELS = {"add_rmsnorm", "silu_mul", "rotary", "store_kv", "decode_attention", "prefill_attention"}


def test_quick_cpu_run_writes_rows(tmp_path):
    out = tmp_path / "kernels.json"
    env = os.environ | {"CUDA_VISIBLE_DEVICES": ""}  # the CPU run, even on a GPU host
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--json", str(out)], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["copy_bytes_per_s"] > 0 and data["matmul_flops_per_s"] > 0
    assert not data["triton_imported"]  # a CPU-only install needs no triton
    assert {r["kernel"] for r in data["rows"]} == KERNELS
    for r in data["rows"]:
        assert r["reference_us"] > 0 and r["floor_us"] > 0 and r["bytes"] > 0, r
        assert r["triton_us"] is None and r["reference_floor_pct"] > 0, r
        assert (r["sdpa_us"] is not None and r["sdpa_us"] > 0) == (r["kernel"] == "decode_attention"), r


def test_gpu_path_calls_give_the_references_results():
    """What the CUDA run times, on tiny shapes under Triton's interpreter: the Triton call, its reference and
    the unpaged SDPA agree, so the benchmark times the right work (the CPU run never calls Triton)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    from baton.bench import kernel_speed as bench

    inp = bench.Inputs(torch.float32, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = bench.Shapes(rows=(3,), decode=((2, 64),), prefill=((2, 48),))
    torch.manual_seed(0)
    with torch.inference_mode():
        for plan in bench.plans(shapes, bench.load_impl(cuda=True), inp):
            case = plan.build()
            if plan.kernel in ("rotary", "store_kv"):  # the Triton call writes its first argument (x, the pool)
                target = case.reference.args[0]
                before = target.clone()
                expected = case.reference()  # rotary's: a new tensor; store_kv's: None, the pool written
                if expected is None:
                    expected = target.clone()
                    target.copy_(before)
                case.triton()
                got = target
            else:
                expected, got = case.reference(), case.triton()
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=plan.kernel)
            if case.unpaged_sdpa is not None:
                sdpa = case.unpaged_sdpa()().reshape(expected.shape)
                torch.testing.assert_close(sdpa, expected, rtol=1e-4, atol=1e-4)
            assert case.bytes > 0 and (case.flops > 0) == ("attention" in plan.kernel)
