"""Kernel benchmark: each Triton kernel of engine/kernels against its torch reference and against its floor.

Llama-3-8B-like shapes: hidden 4096, intermediate 14336, 32 query and 8 KV heads of 128, blocks of 16 tokens.
A case's floor is the time the hardware cannot beat: the bytes it must read and write over the device's copy
bandwidth, or its FLOPs over the device's matmul rate, whichever is longer. Both rates are measured at the
start of the same run (these machines are noisy: only figures of one run are compared). Paged decode
attention is also compared with PyTorch's `scaled_dot_product_attention` on the same K/V laid out
contiguous (unpaged).

On CUDA: the Triton kernels and their `<name>_ref` references, timed with CUDA events (median of the timed
calls, L2 flushed before each). On a CPU: the torch references only (Triton's interpreter is far too slow to
time), with time.perf_counter, on smaller shapes, float32 by default; triton is then never imported.

    python bench/kernel_speed.py [--json PATH] [--quick] [--dtype bfloat16|float16|float32] [--max-gib 40]
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from itertools import product
from pathlib import Path

import torch
import torch.nn.functional as F

from baton.bench.engine_throughput import machine
from baton.bench.runner import git_commit
from baton.engine.config import RopeScaling
from baton.engine.rope import RotaryEmbedding

HIDDEN = 4096
INTERMEDIATE = 14336
HEADS = 32
KV_HEADS = 8
HEAD_DIM = 128
BLOCK_SIZE = 16
EPS = 1e-5
MAX_POSITIONS = 32768
SCALE = HEAD_DIM**-0.5
QKV_WIDTH = (HEADS + 2 * KV_HEADS) * HEAD_DIM  # the fused QKV projection's output row
ROPE_SCALING = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)  # Llama 3.1's
MODEL = dict(hidden=HIDDEN, intermediate=INTERMEDIATE, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM,
             block_size=BLOCK_SIZE)

# The module of engine/kernels that holds each kernel and its `<name>_ref`.
MODULES = {"add_rmsnorm": "add_rmsnorm", "silu_mul": "silu_mul", "rotary": "rotary", "store_kv": "kv_store",
           "decode_attention": "decode_attention", "prefill_attention": "prefill_attention"}

Call = Callable[[], object]


@dataclass(frozen=True)
class Shapes:
    rows: tuple[int, ...]  # tokens of a step, for the norm, activation, rotary and K/V-store kernels
    decode: tuple[tuple[int, int], ...]  # (batch, context)
    prefill: tuple[tuple[int, int], ...]  # (prompts, prompt length): whole prompts, nothing cached before


SHAPES = {  # (on CUDA, --quick)
    (True, False): Shapes((1, 32, 128, 2048, 16384), tuple(product((1, 8, 32, 128), (1024, 4096, 16384, 32768))),
                          ((1, 1024), (1, 4096), (8, 1024), (4, 4096))),
    (True, True): Shapes((1, 128, 16384), tuple(product((1, 32, 128), (4096, 32768))), ((1, 1024), (4, 4096))),
    (False, False): Shapes((1, 16, 64), tuple(product((1, 8), (1024, 4096))), ((1, 128), (1, 512))),
    (False, True): Shapes((1, 64), ((1, 1024), (8, 1024)), ((1, 128),)),
}
# (warm-up calls, timed calls) by (on CUDA, --quick); on a CPU only the references run, slowly: fewer calls.
REPEATS = {(True, False): (3, 20), (True, True): (2, 10), (False, False): (2, 10), (False, True): (1, 3)}


@dataclass(frozen=True)
class Impl:
    """Each kernel's two implementations, by kernel name: Triton (None without CUDA) and the torch reference."""

    triton: dict[str, Callable] | None
    reference: dict[str, Callable]
    reference_source: str


def load_impl(cuda: bool) -> Impl:
    if not cuda:
        from baton.engine.kernels import reference  # needs no triton

        return Impl(None, {name: getattr(reference, f"{name}_ref") for name in MODULES}, "<name>_ref of engine/kernels")
    triton_fns, refs = {}, {}
    for name, module in MODULES.items():
        mod = importlib.import_module(f"baton.engine.kernels.{module}")
        triton_fns[name], refs[name] = getattr(mod, name), getattr(mod, f"{name}_ref")
    return Impl(triton_fns, refs, "<name>_ref of engine/kernels")


# ---- timing ----------------------------------------------------------------------------------------------


class Timer:
    """Times calls on one device: `warmup` untimed calls first (Triton compiles then), then `repeats` timed."""

    def __init__(self, device: torch.device, warmup: int, repeats: int) -> None:
        self.device, self.warmup, self.repeats = device, warmup, repeats
        # CUDA: a buffer several times the L2 (50-60 MB on H100/H200), zeroed before each timed call, so that
        # no call finds its inputs cached by the previous one. The zeroing also keeps the stream busy while
        # the host launches the call, so the events time the device's work, not Python's launch overhead
        # (which CUDA graphs remove when serving). A CPU gets no flush: the VMs' last-level caches (hundreds
        # of MiB, shared with other guests) cannot be cleared cheaply, so small CPU cases may beat the floor.
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    def samples(self, fn: Call) -> list[float]:
        """Seconds of each timed call."""
        for _ in range(self.warmup):
            fn()
        if self.flush is None:
            times = []
            for _ in range(self.repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return times
        torch.cuda.synchronize()  # the warm-up's work is not timed
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(self.repeats)]
        for start, end in events:
            self.flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()  # every event has completed before it is read
        return [start.elapsed_time(end) / 1e3 for start, end in events]

    def median_us(self, fn: Call) -> float:
        return statistics.median(self.samples(fn)) * 1e6


def copy_bandwidth(timer: Timer) -> float:
    """Bytes/s of a large tensor copy (1 GiB on a GPU, 256 MiB on a CPU), read and write counted. The best
    call, so that the floor is the lowest this device showed in this run."""
    numel = (1 << 30 if timer.device.type == "cuda" else 256 << 20) // 4
    src = torch.ones(numel, dtype=torch.float32, device=timer.device)
    dst = torch.empty_like(src)
    return 2 * numel * 4 / min(timer.samples(lambda: dst.copy_(src)))


def matmul_rate(timer: Timer, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in the benchmark's dtype (8192 on a GPU, 1024 on a CPU); the best call."""
    n = 8192 if timer.device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=timer.device).to(dtype) for _ in range(2))
    c = torch.empty(n, n, dtype=dtype, device=timer.device)
    return 2 * n**3 / min(timer.samples(lambda: torch.mm(a, b, out=c)))


# ---- cases -----------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One shape of one kernel with its inputs allocated: the calls to time and what its floor counts."""

    bytes: int  # the least it must read + write
    flops: int
    reference: Call
    triton: Call | None  # None on a CPU
    unpaged_sdpa: Callable[[], Call] | None = None  # builds its own contiguous K/V (held only while timed)


@dataclass
class Plan:
    """A case before its inputs exist, so that one case at a time holds device memory."""

    kernel: str
    shape: str
    memory: int  # bytes the case holds at its peak, checked against the budget before it is built
    build: Callable[[], Case]


class Inputs:
    """Random inputs of one dtype on one device."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self.size = torch.empty((), dtype=dtype).element_size()

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, dtype=self.dtype, device=self.device)

    def scattered_blocks(self, sequences: int, blocks_each: int) -> torch.Tensor:
        """Block tables [sequences, blocks_each] over a pool of exactly that many blocks, in random order, as
        after a server has run for a while (a sequence's blocks are rarely adjacent)."""
        n = sequences * blocks_each
        return torch.randperm(n, device=self.device).view(sequences, blocks_each)

    def kv_bytes(self, tokens: int) -> int:
        return tokens * 2 * KV_HEADS * HEAD_DIM * self.size


def calls(impl: Impl, name: str, *args, **triton_only) -> tuple[Call, Call | None]:
    """(reference call, Triton call or None) on the same arguments."""
    triton_call = partial(impl.triton[name], *args, **triton_only) if impl.triton else None
    return partial(impl.reference[name], *args), triton_call


def add_rmsnorm_case(rows: int, impl: Impl, inp: Inputs) -> Case:
    # With a residual, as every norm but the first layer's: reads x, residual and weight, writes out and
    # the new residual.
    x, residual, weight = inp.randn(rows, HIDDEN), inp.randn(rows, HIDDEN), inp.randn(HIDDEN)
    return Case((4 * rows + 1) * HIDDEN * inp.size, 0, *calls(impl, "add_rmsnorm", x, residual, weight, EPS))


def silu_mul_case(rows: int, impl: Impl, inp: Inputs) -> Case:
    gate_up = inp.randn(rows, 2 * INTERMEDIATE)
    return Case(3 * rows * INTERMEDIATE * inp.size, 0, *calls(impl, "silu_mul", gate_up))


def rotary_case(rows: int, impl: Impl, inp: Inputs) -> Case:
    # The query and key heads of each token together, a strided view of the fused QKV output, as the model
    # calls it; the engine runs the kernel in place.
    x = inp.randn(rows, QKV_WIDTH)[:, : (HEADS + KV_HEADS) * HEAD_DIM].view(rows, HEADS + KV_HEADS, HEAD_DIM)
    tables = RotaryEmbedding(HEAD_DIM, MAX_POSITIONS, 500000.0, ROPE_SCALING).to(inp.device)
    positions = torch.randint(0, MAX_POSITIONS, (rows,), device=inp.device)
    # x read and written; each token's cos/sin half-rows (float32) and its position read.
    moved = 2 * x.numel() * inp.size + rows * (2 * HEAD_DIM // 2 * 4 + 8)
    return Case(moved, 0, *calls(impl, "rotary", x, tables.cos, tables.sin, positions, out=x))


def store_kv_case(rows: int, impl: Impl, inp: Inputs) -> Case:
    qkv = inp.randn(rows, QKV_WIDTH)
    q_width, kv_width = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM  # k and v: strided slices, as the model's
    k = qkv[:, q_width : q_width + kv_width].view(rows, KV_HEADS, HEAD_DIM)
    v = qkv[:, q_width + kv_width :].view(rows, KV_HEADS, HEAD_DIM)
    blocks = 2 * -(-rows // BLOCK_SIZE)
    pool = inp.randn(blocks, 2, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    slots = torch.randperm(blocks * BLOCK_SIZE, device=inp.device)[:rows]  # scattered, as decode tokens are
    # K and V read and written into the pool; each token's block and offset (int64) read.
    moved = 2 * inp.kv_bytes(rows) + rows * 16
    return Case(moved, 0, *calls(impl, "store_kv", pool, k, v, slots // BLOCK_SIZE, slots % BLOCK_SIZE))


def decode_case(batch: int, context: int, impl: Impl, inp: Inputs) -> Case:
    blocks_each = context // BLOCK_SIZE
    tables = inp.scattered_blocks(batch, blocks_each)
    pool = inp.randn(batch * blocks_each, 2, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    seq_lens = torch.full((batch,), context, dtype=torch.int64, device=inp.device)
    q = inp.randn(batch, HEADS, HEAD_DIM)

    def unpaged_sdpa() -> Call:
        # The same K/V contiguous, [B, KVH, ctx, D]. The query heads sharing a KV head become that head's
        # query rows (the engine's torch path does the same), so no backend expands K/V for GQA.
        k, v = (torch.empty(batch, KV_HEADS, context, HEAD_DIM, dtype=inp.dtype, device=inp.device) for _ in "kv")
        for b in range(batch):  # a sequence at a time: the transient gather stays small
            seq = pool[tables[b]]
            k[b] = seq[:, 0].reshape(context, KV_HEADS, HEAD_DIM).transpose(0, 1)
            v[b] = seq[:, 1].reshape(context, KV_HEADS, HEAD_DIM).transpose(0, 1)
        grouped = q.view(batch, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)
        return partial(F.scaled_dot_product_attention, grouped, k, v, scale=SCALE)

    # Every cached K/V, q and the output, the block tables and lengths.
    moved = inp.kv_bytes(batch * context) + 2 * q.numel() * inp.size + tables.numel() * 8 + batch * 8
    flops = 4 * batch * HEADS * context * HEAD_DIM  # q.k and p.v
    return Case(moved, flops, *calls(impl, "decode_attention", q, pool, tables, seq_lens, SCALE), unpaged_sdpa)


def prefill_case(prompts: int, length: int, impl: Impl, inp: Inputs) -> Case:
    tokens = prompts * length
    tables = inp.scattered_blocks(prompts, -(-length // BLOCK_SIZE))
    pool = inp.randn(tables.numel(), 2, BLOCK_SIZE, KV_HEADS, HEAD_DIM)  # the engine writes K/V first
    q = inp.randn(tokens, HEADS, HEAD_DIM)
    starts = torch.arange(0, tokens + 1, length, device=inp.device)
    seq_lens = torch.full((prompts,), length, dtype=torch.int64, device=inp.device)
    moved = 2 * q.numel() * inp.size + inp.kv_bytes(tokens) + tables.numel() * 8
    flops = 4 * HEADS * HEAD_DIM * prompts * length * (length + 1) // 2  # causal: the visible pairs only
    return Case(moved, flops, *calls(impl, "prefill_attention", q, pool, tables, starts, seq_lens, SCALE,
                                     max_query_len=length))


def plans(shapes: Shapes, impl: Impl, inp: Inputs) -> Iterator[Plan]:
    kv_token = inp.kv_bytes(1)
    for name, build in (("add_rmsnorm", add_rmsnorm_case), ("silu_mul", silu_mul_case),
                        ("rotary", rotary_case), ("store_kv", store_kv_case)):
        for rows in shapes.rows:
            # Generous (4 bytes an element): inputs, outputs and the references' temporaries.
            memory = rows * (8 * HIDDEN + 6 * INTERMEDIATE + 3 * QKV_WIDTH) * 4
            yield Plan(name, f"rows={rows}", memory, partial(build, rows, impl, inp))
    for batch, context in shapes.decode:
        # The pool plus one more copy of it: the unpaged K/V while SDPA is timed, or the reference's gather
        # while it is timed, never both.
        yield Plan("decode_attention", f"B={batch} ctx={context}", 2 * batch * context * kv_token,
                   partial(decode_case, batch, context, impl, inp))
    for prompts, length in shapes.prefill:
        tokens = prompts * length
        memory = 2 * tokens * kv_token + 3 * tokens * HEADS * HEAD_DIM * inp.size + HEADS * length * length * 4
        yield Plan("prefill_attention", f"{prompts}x{length} tokens", memory,
                   partial(prefill_case, prompts, length, impl, inp))


# ---- measuring and reporting -----------------------------------------------------------------------------


@dataclass
class Row:
    kernel: str
    shape: str
    bytes: int
    flops: int
    floor_us: float
    bound: str  # "memory" or "compute": the longer of the two floors
    reference_us: float
    triton_us: float | None
    sdpa_us: float | None  # decode attention: PyTorch's SDPA on the same K/V unpaged

    @property
    def speedup(self) -> float | None:
        return self.reference_us / self.triton_us if self.triton_us else None

    @property
    def triton_vs_sdpa(self) -> float | None:
        """> 1: the Triton kernel is faster than SDPA."""
        return self.sdpa_us / self.triton_us if self.triton_us and self.sdpa_us else None

    @property
    def triton_floor_pct(self) -> float | None:
        return 100 * self.floor_us / self.triton_us if self.triton_us else None

    @property
    def reference_floor_pct(self) -> float:
        return 100 * self.floor_us / self.reference_us

    def as_json(self) -> dict:
        return asdict(self) | {k: getattr(self, k) for k in
                               ("speedup", "triton_vs_sdpa", "triton_floor_pct", "reference_floor_pct")}


def measure(plan: Plan, timer: Timer, bandwidth: float, matmul: float) -> Row:
    case = plan.build()
    sdpa_us = None
    if case.unpaged_sdpa is not None:  # first, and its copy freed before the others run
        sdpa = case.unpaged_sdpa()
        sdpa_us = timer.median_us(sdpa)
        del sdpa
        release(timer.device)
    memory_s, compute_s = case.bytes / bandwidth, case.flops / matmul
    return Row(plan.kernel, plan.shape, case.bytes, case.flops, max(memory_s, compute_s) * 1e6,
               "memory" if memory_s >= compute_s else "compute", timer.median_us(case.reference),
               timer.median_us(case.triton) if case.triton else None, sdpa_us)


def release(device: torch.device) -> None:
    """Hands freed blocks back, so that the next case's differently sized pool is not fragmented away."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


COLUMNS = [("kernel", 18), ("shape", 20), ("triton µs", 11), ("ref µs", 11), ("ref/tri", 9), ("sdpa µs", 10),
           ("sdpa/tri", 9), ("floor µs", 10), ("bound", 8), ("tri %fl", 9), ("ref %fl", 9)]


def format_row(row: Row) -> str:
    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    cells = [row.kernel, row.shape, num(row.triton_us, ".1f"), num(row.reference_us, ".1f"),
             num(row.speedup, ".2f"), num(row.sdpa_us, ".1f"), num(row.triton_vs_sdpa, ".2f"),
             num(row.floor_us, ".2f"), row.bound, num(row.triton_floor_pct, ".1f"), num(row.reference_floor_pct, ".1f")]
    return "".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--quick", action="store_true", help="fewer shapes (the GPU check's run)")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                    help="default: bfloat16 on CUDA, float32 on a CPU")
    ap.add_argument("--max-gib", type=float, default=40.0,
                    help="skip the cases that would hold more device memory than this")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    shapes = SHAPES[cuda, args.quick]
    timer = Timer(device, *REPEATS[cuda, args.quick])
    impl = load_impl(cuda)
    inp = Inputs(dtype, device)
    torch.manual_seed(0)

    with torch.inference_mode():
        bandwidth = copy_bandwidth(timer)
        matmul = matmul_rate(timer, dtype)
        release(device)
        budget = args.max_gib * 2**30
        if cuda:
            budget = min(budget, 0.9 * torch.cuda.mem_get_info()[0])
        where = torch.cuda.get_device_name() if cuda else "CPU"
        print(f"machine: {machine()}; device: {where}")
        print(f"model: {MODEL}")
        print(f"dtype {str(dtype).removeprefix('torch.')}, commit {git_commit()}; copy bandwidth "
              f"{bandwidth / 1e9:.1f} GB/s (read + write), matmul {matmul / 1e12:.2f} TFLOP/s; "
              f"references: {impl.reference_source}; median of {timer.repeats} calls")
        print("".join(name.ljust(w) if i < 2 else name.rjust(w) for i, (name, w) in enumerate(COLUMNS)))
        rows: list[Row] = []
        skipped: list[str] = []
        for plan in plans(shapes, impl, inp):
            if plan.memory > budget:
                skipped.append(f"{plan.kernel} {plan.shape}: needs {plan.memory / 2**30:.2f} GiB, budget "
                               f"{budget / 2**30:.2f} GiB")
                continue
            rows.append(measure(plan, timer, bandwidth, matmul))
            release(device)
            print(format_row(rows[-1]), flush=True)
    for line in skipped:
        print(f"skipped {line}")
    print("ref/tri: reference time / Triton time; sdpa/tri: PyTorch SDPA on the unpaged K/V / Triton time "
          "(> 1: Triton faster); %fl: floor / time")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(
            machine=machine(), device=where, commit=git_commit(), dtype=str(dtype).removeprefix("torch."),
            quick=args.quick, max_gib=args.max_gib, warmup=timer.warmup, repeats=timer.repeats,
            model=MODEL, copy_bytes_per_s=bandwidth, matmul_flops_per_s=matmul, references=impl.reference_source,
            triton_imported="triton" in sys.modules, rows=[r.as_json() for r in rows], skipped=skipped,
        ), indent=2))


if __name__ == "__main__":
    main()
