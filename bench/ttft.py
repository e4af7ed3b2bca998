"""TTFT of one 512-token prompt, disaggregated (1 prefill + 1 decode node) against colocated (1 node), idle.

Both clusters run the same random-weight ~51M-parameter Llama (bench/engine_throughput.py) in float32 with
one torch thread per node, are started with `LocalCluster` (what `baton up` runs) and measured through the
router's public API with the client module, in the same run. TTFT is client-side: from the call to the
first token. Prefix caching does not exist in Baton yet, so repeating a prompt costs a full prefill each time.

    python bench/ttft.py [--repeats 7] [--prompt-tokens 512] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from baton.bench.engine_throughput import MODEL, machine, write_checkpoint
from baton.cluster.launch import ClusterSpec, LocalCluster
from baton.router.client import BatonClient, Delta


def measure(address: str, prompt: list[int], repeats: int) -> list[float]:
    with BatonClient(address, timeout=120) as client:
        client.complete(prompt[:16], max_tokens=2, temperature=0)  # warm-up: channels, first group
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for item in client.generate(prompt, max_tokens=2, temperature=0, ignore_eos=True):
                if isinstance(item, Delta):
                    times.append((time.perf_counter() - t0) * 1e3)
                    break
        return times


def parse_args(doc: str) -> argparse.Namespace:
    """The options of a TTFT benchmark (this one and kv_layouts.py)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--json", type=Path, default=None)
    return ap.parse_args()


def random_prompt(tokens: int) -> list[int]:
    """The same prompt in every run: random ids of the benchmark model's vocabulary."""
    rng = random.Random(0)
    return [rng.randrange(3, MODEL["vocab_size"]) for _ in range(tokens)]


def main() -> None:
    args = parse_args(__doc__)
    prompt = random_prompt(args.prompt_tokens)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_checkpoint(folder)
        for name, spec in (
            ("disaggregated 1P1D", ClusterSpec(model=str(folder), prefill=1, decode=1, threads=1)),
            ("colocated 1 node", ClusterSpec(model=str(folder), prefill=0, decode=0, colocated=1, threads=1)),
        ):
            with LocalCluster(spec) as cluster:
                results[name] = measure(cluster.address, prompt, args.repeats)
    print(f"machine: {machine()}")
    print(f"TTFT of a {args.prompt_tokens}-token prompt, {args.repeats} runs, one torch thread per node (ms):")
    print(f"{'':22}{'median':>8}{'min':>8}{'max':>8}")
    for name, times in results.items():
        print(f"{name:22}{statistics.median(times):8.1f}{min(times):8.1f}{max(times):8.1f}")
    dis, col = (statistics.median(t) for t in results.values())
    print(f"ratio disaggregated / colocated: {dis / col:.2f}  (the price of the extra hop and the KV transfer)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(machine=machine(), prompt_tokens=args.prompt_tokens,
                                             ttft_ms=results, ratio=dis / col), indent=2))


if __name__ == "__main__":
    main()
