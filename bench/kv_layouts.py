"""TTFT of one 512-token prompt through 1P1D clusters whose KV travels differently, in the same run: the pair
channel (gloo) between one-rank nodes, the same-device path (/dev/shm) between one-rank nodes, and the
same-device path from a one-rank prefill node into a two-rank decode node (each rank written its heads).

The random ~51M-parameter Llama of engine_throughput.py (8 query and 2 KV heads), float32, one torch thread per
node process (the decode node's second rank is one more process). TTFT is client-side, as in ttft.py.

    python bench/kv_layouts.py [--repeats 7] [--prompt-tokens 512] [--json PATH]
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from baton.bench.engine_throughput import machine, write_checkpoint
from baton.bench.runner import git_commit
from baton.bench.ttft import measure, parse_args, random_prompt
from baton.cluster.launch import ClusterSpec, LocalCluster

SETUPS = {
    "pair channel, TP1 -> TP1": dict(node_args=["--kv-path", "pair"]),
    "shared memory, TP1 -> TP1": dict(node_args=["--kv-path", "shared"]),
    "shared memory, TP1 -> TP2": dict(node_args=["--kv-path", "shared"], role_args={"decode": ["--tp", "2"]}),
}


def main() -> None:
    args = parse_args(__doc__)
    prompt = random_prompt(args.prompt_tokens)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp))
        for name, options in SETUPS.items():
            spec = ClusterSpec(model=tmp, prefill=1, decode=1, threads=1, **options)
            with LocalCluster(spec) as cluster:
                results[name] = measure(cluster.address, prompt, args.repeats)
    base = statistics.median(results["pair channel, TP1 -> TP1"])
    print(f"machine: {machine()}")
    print(f"TTFT of a {args.prompt_tokens}-token prompt, {args.repeats} runs, one torch thread per process (ms):")
    print(f"{'':28}{'median':>8}{'min':>8}{'max':>8}{'vs pair':>9}")
    for name, times in results.items():
        med = statistics.median(times)
        print(f"{name:28}{med:8.1f}{min(times):8.1f}{max(times):8.1f}{med / base:8.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(machine=machine(), commit=git_commit(), prompt_tokens=args.prompt_tokens,
                                             ttft_ms=results), indent=2))


if __name__ == "__main__":
    main()
