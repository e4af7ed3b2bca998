"""The prefix cache's second tier against recomputing: the time to first token of a prompt whose blocks were
evicted from the pool, copied back from the second tier (`--kv-offload-bytes`) or computed again, one engine,
the same run.

The 51M Llama (context 4096) on one engine with a pool of POOL blocks: a prompt of PROMPT tokens is computed, then
FLOOD other prompts of the same length push its blocks out of the pool; then it is sent again (one token out),
REPEATS times for each engine (evicted again in between). With the tier its blocks come back from the
file-backed store (page cache on this machine: the file is far smaller than its memory); without, they are
computed. Prints each TTFT (median) and the ratio.

    .venv/bin/python bench/kv_offload.py [--prompt 1024] [--repeats 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

from baton.bench.engine_throughput import machine
from baton.bench.faults import write_json
from baton.bench.memory_soak import cached_model
from baton.engine import LLM, SamplingParams

POOL = 160  # blocks: room for two prompts of 1,024 tokens and a little
FLOOD = 3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    model = cached_model()
    rng = random.Random(0)
    prompt = [rng.randrange(10, 31000) for _ in range(args.prompt)]
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    print(f"machine: {machine('one engine, torch default threads')}\nmodel: {model} (51M Llama, context 4096); "
          f"a {args.prompt}-token prompt evicted by {FLOOD} others from a {POOL}-block pool", flush=True)
    results = {}
    for name, options in (("tier", dict(kv_offload_bytes=1 << 30)), ("recompute", {})):
        llm = LLM(str(model), num_kv_blocks=POOL, max_num_seqs=4, **options)
        llm.generate([prompt], one)  # computed once: what the pool then evicts
        times, first = [], None
        for _ in range(args.repeats):
            for _ in range(FLOOD):
                llm.generate([[rng.randrange(10, 31000) for _ in range(args.prompt)]], one)
            start = time.perf_counter()
            [out] = llm.generate([prompt], one)
            times.append(time.perf_counter() - start)
            first = first or out.token_ids
            assert out.token_ids == first
        cache = llm.engine.prefix_cache()
        results[name] = dict(ttft_ms=statistics.median(times) * 1000, offload_hits=cache["offload_hits"],
                             evictions=cache["evictions"])
        print(f"  {name:9s} TTFT p50 {results[name]['ttft_ms']:8.1f} ms  (offload hits {cache['offload_hits']} "
              f"tokens, evictions {cache['evictions']})", flush=True)
    ratio = results["tier"]["ttft_ms"] / results["recompute"]["ttft_ms"]
    print(f"  tier / recompute: {ratio:.2f}x", flush=True)
    write_json(args.json, args, dict(date=datetime.now().isoformat(timespec="seconds"), model=str(model),
                                     results=results, ratio=ratio))
    return 0


if __name__ == "__main__":
    sys.exit(main())
