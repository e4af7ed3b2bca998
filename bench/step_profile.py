"""Where a decode step's time goes: matmul kernels, the model's other ops, the Python around them, input
building, and the engine's per-step bookkeeping (scheduling, sampling, detokenizing, emitting).

One engine (the ~51M-parameter random Llama of engine_throughput.py, float32), `batch` sequences decoding at
~`context` tokens of context. Each part is timed around the engine's own calls on plain steps; one more pass
under torch.profiler gives the time inside aten kernels during the forward pass, so that what is left of it
is Python and dispatch.

    python bench/step_profile.py [--batch 1 64] [--context 256] [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from baton.bench.engine_throughput import machine, write_checkpoint
from baton.bench.runner import git_commit
from baton.engine import LLM, SamplingParams
from baton.engine.linear import PackedLinear

STEPS = 40


class Clock:
    """Wall time spent inside wrapped callables, by name, and how to undo the wrapping."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}
        self._undo: list[Callable[[], None]] = []

    def wrap(self, obj, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - t0

        setattr(obj, attr, timed)
        self._undo.append(lambda: setattr(obj, attr, fn))

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


def profile(llm: LLM, batch: int, context: int) -> dict:
    engine, runner = llm.engine, llm.engine.runner
    model = runner.model
    for i in range(batch):
        engine.add_request(f"d{i}", list(range(3, 3 + context)),
                           SamplingParams(max_tokens=3 * STEPS, ignore_eos=True, temperature=0))
    while engine.scheduler.waiting:
        engine.step()
    for _ in range(3):
        engine.step()

    clock = Clock()
    for m in model.modules():
        if isinstance(m, (PackedLinear, nn.Linear)):
            clock.wrap(m, "forward", "lm_head" if m is model.lm_head else "layer_matmuls")
    clock.wrap(model, "forward", "forward")
    clock.wrap(runner, "run", "run")
    walls = []
    try:
        for _ in range(STEPS):
            t0 = time.perf_counter()
            engine.step()
            walls.append(time.perf_counter() - t0)
    finally:
        clock.undo()
    ms = {k: v / STEPS * 1e3 for k, v in clock.spent.items()}
    kernels = aten_ms_in_forward(engine)
    for i in range(batch):
        engine.abort_request(f"d{i}")
    step = sum(walls) / STEPS * 1e3
    other = ms["forward"] - ms["layer_matmuls"]
    return dict(
        batch=batch, context=context, step_ms=step, median_step_ms=statistics.median(walls) * 1e3,
        matmul_ms=ms["layer_matmuls"] + ms["lm_head"], lm_head_ms=ms["lm_head"],
        other_ops_ms=other,  # attention, norms, rotary, activations, residuals: kernels and their Python
        other_ops_kernels_ms=min(other, max(0.0, kernels - ms["layer_matmuls"])),
        inputs_ms=ms["run"] - ms["forward"] - ms["lm_head"],  # the step's input tensors and metadata
        bookkeeping_ms=step - ms["run"],  # scheduling, sampling, stop checks, detokenizing, outputs
    )


def aten_ms_in_forward(engine) -> float:
    """Median milliseconds spent inside aten ops (self time, every op) during a step's model forward."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model = engine.runner.model
    original = model.forward
    spent = []

    def forward(*args, **kwargs):
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            out = original(*args, **kwargs)
        spent.append(sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3)
        return out

    model.forward = forward
    try:
        for _ in range(10):
            engine.step()
    finally:
        model.forward = original
    return statistics.median(spent)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp))
        llm = LLM(tmp, max_num_seqs=max(args.batch), max_num_batched_tokens=8192)
        rows = [profile(llm, b, args.context) for b in args.batch]
    print(f"machine: {machine()}")
    for r in rows:
        parts = [("matmuls", r["matmul_ms"]), ("other model ops", r["other_ops_ms"]), ("inputs", r["inputs_ms"]),
                 ("bookkeeping", r["bookkeeping_ms"])]
        print(f"batch {r['batch']:3d} at {r['context']} tokens: step {r['step_ms']:.2f} ms = "
              + ", ".join(f"{name} {v:.2f} ({v / r['step_ms']:.0%})" for name, v in parts)
              + f"; LM head {r['lm_head_ms']:.2f} of the matmuls; other ops: {r['other_ops_kernels_ms']:.2f} in "
              f"kernels, {r['other_ops_ms'] - r['other_ops_kernels_ms']:.2f} Python and dispatch")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(machine=machine(), commit=git_commit(), rows=rows), indent=2))


if __name__ == "__main__":
    main()
