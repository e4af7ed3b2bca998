"""Compiles every Triton kernel, in the configurations the engine launches, for a GPU architecture, without a
GPU: Triton's ahead-of-time path down to a cubin (its bundled ptxas). The interpreter runs a kernel's
arithmetic but accepts what a GPU compiler refuses (tl.dot tiles under 16, mismatched dtypes, a constexpr
a branch needs); this catches that on a CPU machine. It proves nothing about speed or results on a GPU.

    python -m baton.engine.kernels.compile_check [--arch 90] [--quick]

Must run without TRITON_INTERPRET (the kernels would be interpreted functions). Exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from dataclasses import dataclass

_FLOAT_ARGS = ("eps", "scale")


@dataclass(frozen=True)
class Config:
    kernel: str  # module.function
    pointers: dict[str, str]  # pointer argument -> Triton pointer type ("*bf16")
    constexprs: dict[str, object]

    @property
    def name(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{self.kernel}[{shown}; {self.pointers.get('q_ptr') or self.pointers.get('x_ptr') or ''}]"


def _ptr(dtype: str) -> str:
    return "*" + {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dtype]


def configs(quick: bool = False) -> list[Config]:
    """What the engine launches: model dtypes x head dims x block sizes x GQA groups (a subset with `quick`)."""
    dtypes = ["bfloat16", "float32"] if quick else ["bfloat16", "float16", "float32"]
    head_dims = [128] if quick else [64, 128, 8]  # 8: stories260K
    block_sizes = [16] if quick else [8, 16, 32]
    groups = [4] if quick else [1, 4, 8]
    out = []
    for dt in dtypes:
        p = _ptr(dt)
        for has_residual, block in itertools.product((True, False), (64, 4096)):
            out.append(Config("add_rmsnorm._add_rmsnorm_kernel", dict.fromkeys(
                ("x_ptr", "res_ptr", "w_ptr", "out_ptr", "new_res_ptr"), p), dict(HAS_RESIDUAL=has_residual,
                                                                                BLOCK=block)))
        out.append(Config("silu_mul._silu_mul_kernel", dict(gu_ptr=p, out_ptr=p), dict(BLOCK=1024)))
        out.append(Config("kv_store._store_kv_kernel", dict(pool_ptr=p, k_ptr=p, v_ptr=p, blocks_ptr="*i64",
                                                             offsets_ptr="*i64"), dict(BLOCK=1024)))
        for d in head_dims:
            d_pad = max(1, 1 << (d - 1).bit_length())
            out.append(Config("rotary._rotary_kernel", dict(x_ptr=p, out_ptr=p, cos_ptr="*fp32", sin_ptr="*fp32",
                                                            pos_ptr="*i64"), dict(HEADS=64, BLOCK=d_pad // 2)))
            out.append(Config("decode_attention._combine_kernel", dict(part_ptr="*fp32", lse_ptr="*fp32",
                                                                       out_ptr=p), dict(S_PAD=64, D_PAD=d_pad)))
            for bs, g, direct in itertools.product(block_sizes, groups, (True, False)):
                part = p if direct else "*fp32"
                out.append(Config("decode_attention._split_kernel", dict(
                    q_ptr=p, pool_ptr=p, tables_ptr="*i64", lens_ptr="*i64", part_ptr=part, lse_ptr=part),
                    dict(G_PAD=g, D_PAD=d_pad, BLOCK_SIZE=bs, DIRECT=direct)))
            for bs in block_sizes:
                out.append(Config("prefill_attention._prefill_kernel", dict(
                    q_ptr=p, pool_ptr=p, tables_ptr="*i64", qsl_ptr="*i64", lens_ptr="*i64", out_ptr=p),
                    dict(BLOCK_M=16, BLOCK_N=32, D_PAD=max(16, d_pad), BLOCK_SIZE=bs,
                         PRECISION="ieee" if dt == "float32" else "tf32")))
    return out


def compile_one(config: Config, arch: int) -> None:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    module, function = config.kernel.split(".")
    fn = getattr(importlib.import_module(f"baton.engine.kernels.{module}"), function)
    signature = {}
    for name in fn.arg_names:
        if name in config.constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = config.pointers[name]
        else:
            signature[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=config.constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
    if not compiled.asm.get("cubin"):
        raise RuntimeError("no cubin produced")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200, 80: A100)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (the kernels would be interpreted)", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default; set, to silence its warning
    failures = 0
    start = time.monotonic()
    todo = configs(args.quick)
    for config in todo:
        try:
            compile_one(config, args.arch)
        except Exception as e:  # noqa: BLE001 - report every failing configuration, then fail
            failures += 1
            print(f"FAILED {config.name}: {type(e).__name__}: {str(e)[:2000]}")
    print(f"compiled {len(todo) - failures} of {len(todo)} kernel configurations for sm_{args.arch} "
          f"in {time.monotonic() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
