"""A decode step with tensor parallelism against one rank, in the same run: the speed-up of two ranks with
one core each over one rank with one core, and the share of the step that rank 0 spends in collectives
(the all-reduces after the row-parallel layers and the embedding, and the logits' all-gather).

The ~51M-parameter random Llama of engine_throughput.py (8 query and 2 KV heads), float32, `batch` sequences
decoding at ~`context` tokens. Every process runs torch with one thread (OMP_NUM_THREADS=1, inherited by the
spawned rank), so TP=2 uses two cores and TP=1 one.

    OMP_NUM_THREADS=1 python bench/tp_step.py [--batch 1 32] [--context 256] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from baton.bench.engine_throughput import machine, start_decodes, step_times_s, write_checkpoint
from baton.bench.runner import git_commit
from baton.engine import LLM

STEPS = 30


def collective_clock(llm: LLM) -> dict[str, float]:
    """Wraps rank 0's collectives with a clock; returns the dict it adds seconds to."""
    spent = {"s": 0.0}
    group = llm.engine.runner.model.tp
    for name in ("all_reduce", "gather_vocab"):
        original = getattr(group, name)

        def timed(*args, _original=original):
            t0 = time.perf_counter()
            try:
                return _original(*args)
            finally:
                spent["s"] += time.perf_counter() - t0

        setattr(group, name, timed)
    return spent


def measure(folder: str, tp: int, batch: int, context: int) -> dict:
    with LLM(folder, tensor_parallel_size=tp, max_num_seqs=batch, max_num_batched_tokens=8192) as llm:
        start_decodes(llm, batch, context, 3 * STEPS)
        step_times_s(llm, 3)  # warm-up
        spent = collective_clock(llm) if tp > 1 else {"s": 0.0}
        times = step_times_s(llm, STEPS)
        return dict(tp=tp, batch=batch, context=context, step_ms=statistics.median(times) * 1e3,
                    collective_ms=spent["s"] / STEPS * 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"  # before any rank starts: the spawned one reads it
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp))
        for batch in args.batch:
            one, two = measure(tmp, 1, batch, args.context), measure(tmp, 2, batch, args.context)
            rows.append(dict(batch=batch, context=args.context, tp1_step_ms=one["step_ms"], tp2_step_ms=two["step_ms"],
                             speedup=one["step_ms"] / two["step_ms"], tp2_collective_ms=two["collective_ms"],
                             tp2_collective_share=two["collective_ms"] / two["step_ms"]))
    print(f"machine: {machine('1 thread per rank')}")
    for r in rows:
        print(f"batch {r['batch']:3d} at {r['context']} tokens: TP=1 {r['tp1_step_ms']:.2f} ms, TP=2 "
              f"{r['tp2_step_ms']:.2f} ms -> {r['speedup']:.2f}x; collectives {r['tp2_collective_ms']:.2f} ms "
              f"({r['tp2_collective_share']:.0%} of the TP=2 step)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(machine=machine("1 thread per rank"), commit=git_commit(), rows=rows),
                                        indent=2))


if __name__ == "__main__":
    main()
