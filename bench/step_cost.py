"""What one node's steps cost on one core: the measured inputs of the P:D model in bench/README.md.

On the random ~51M Llama of engine_throughput.py (what `baton bench` serves by default), with one torch
thread, as every node runs in the load benchmarks:

- prefill: the time of one prompt of L tokens, fitted to t_p(L) = a*L + b*L^2 (linear layers, attention);
- decode: the time of a decode step over B running sequences, fitted to t_d(B) = c + d*B (the weights read
  once per step, then per-sequence work).

The ratio d*B / c says whether a decode node is bandwidth-bound (a batch is nearly free: the regime of
GPUs serving large models, where disaggregation pays most) or compute-bound (each sequence adds its own
cost, so halving the batch by colocating helps almost as much as removing prefill stalls).

    python bench/step_cost.py [--context 200] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from baton.bench.engine_throughput import machine, median_decode_step_s, write_checkpoint
from baton.bench.runner import git_commit
from baton.engine import LLM, SamplingParams

PROMPT_LENS = (64, 128, 256, 512, 900)
BATCHES = (1, 2, 4, 8, 16)


def prefill_s(llm: LLM, length: int, repeats: int = 5) -> float:
    """Median time of the engine step that computes one whole `length`-token prompt."""
    engine, times = llm.engine, []
    for i in range(repeats):
        engine.add_request(f"p{i}", [3 + (i + j) % 1000 for j in range(length)],
                           SamplingParams(max_tokens=1, ignore_eos=True, temperature=0))
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
        engine.abort_request(f"p{i}")
    return statistics.median(times)


def fit(xs: list[float], ys: list[float], basis) -> list[float]:
    """Least-squares coefficients of y ~ sum(coef_k * basis(x)[k])."""
    a = torch.tensor([basis(x) for x in xs], dtype=torch.float64)
    return torch.linalg.lstsq(a, torch.tensor(ys, dtype=torch.float64).unsqueeze(1)).solution.squeeze(1).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=200, help="tokens per sequence in the decode steps")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp))
        llm = LLM(tmp, max_num_seqs=max(BATCHES), max_num_batched_tokens=4096)
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0))  # warm-up
        prefill = {n: prefill_s(llm, n) for n in PROMPT_LENS}
        decode = {b: median_decode_step_s(llm, b, args.context) for b in BATCHES}
    a, b = fit(list(prefill), list(prefill.values()), lambda n: [n, n * n])
    c, d = fit(list(decode), list(decode.values()), lambda n: [1.0, n])

    print(f"machine: {machine()}")
    print("prefill, one prompt:  " + "  ".join(f"{n}: {t * 1e3:.1f} ms" for n, t in prefill.items()))
    print(f"  t_p(L) = {a * 1e3:.4f} ms * L + {b * 1e6:.5f} us * L^2")
    print(f"decode step at {args.context} tokens:  " + "  ".join(f"B={n}: {t * 1e3:.2f} ms" for n, t in decode.items()))
    print(f"  t_d(B) = {c * 1e3:.2f} ms + {d * 1e3:.3f} ms * B: a sequence adds {d / c:.0%} of the fixed cost "
          f"(batch of 8: {8 * d / (c + 8 * d):.0%} of the step is per-sequence work)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(
            machine=machine(), commit=git_commit(), context=args.context,
            prefill_ms={n: t * 1e3 for n, t in prefill.items()}, decode_step_ms={n: t * 1e3 for n, t in decode.items()},
            t_p_ms_per_token=a * 1e3, t_p_us_per_token2=b * 1e6, t_d_fixed_ms=c * 1e3, t_d_per_seq_ms=d * 1e3,
        ), indent=2))


if __name__ == "__main__":
    main()
