"""TTFT of one 512-token prompt through 1P1D clusters whose K/V travel between different parallel layouts, in the
same run: over the pair channel (gloo) TP1 -> TP1 (the baseline), TP1 -> TP2, TP2 -> TP1 and TP2 -> TP2 (each
decode rank receives its KV heads straight from the prefill rank that holds them), and through the same-device
path (/dev/shm) TP1 -> TP1 and TP1 -> TP2.

The random ~51M-parameter Llama of engine_throughput.py (8 query and 2 KV heads), float32, one torch thread per
process (a two-rank node is two processes). TTFT is client-side, as in ttft.py; "KV MiB/s" is the prompt's
K/V bytes over the median TTFT (the rate at which a decode node gets a ready prompt, prefill included). The
transfer overlaps the prefill's layers; what it leaves exposed shows in the gap between the first token (the
prefill node's) and the second (the decode node's, once every K/V byte is there) against the later gaps.

    python bench/kv_layouts.py [--repeats 7] [--prompt-tokens 512] [--json PATH]
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from baton.bench.engine_throughput import machine, write_checkpoint
from baton.bench.runner import git_commit
from baton.bench.ttft import parse_args, random_prompt
from baton.cluster.launch import ClusterSpec, LocalCluster
from baton.engine.config import ModelConfig
from baton.router.client import BatonClient, Delta

def _setup(path: str, prefill_tp: int, decode_tp: int) -> dict:
    return dict(node_args=["--kv-path", path],
                role_args={"prefill": ["--tp", str(prefill_tp)], "decode": ["--tp", str(decode_tp)]})


BASELINE = "pair channel, TP1 -> TP1"
SETUPS = {
    BASELINE: _setup("pair", 1, 1),
    "pair channel, TP1 -> TP2": _setup("pair", 1, 2),
    "pair channel, TP2 -> TP1": _setup("pair", 2, 1),
    "pair channel, TP2 -> TP2": _setup("pair", 2, 2),
    "shared memory, TP1 -> TP1": _setup("shared", 1, 1),
    "shared memory, TP1 -> TP2": _setup("shared", 1, 2),
}


def measure(address: str, prompt: list[int], repeats: int, tokens: int = 8) -> dict[str, list[float]]:
    """Per run: TTFT, the gap between the first and the second token, and the median of the later gaps (ms).
    The first token comes from the prefill node as soon as it is sampled; the second only once the decode node
    has the whole prompt's K/V: the first gap's excess over the later ones is the transfer left exposed after
    the prefill's compute (with the Continue call's own cost), which the layer-by-layer overlap should keep
    small."""
    out: dict[str, list[float]] = {"ttft": [], "first_gap": [], "later_gaps": []}
    with BatonClient(address, timeout=120) as client:
        client.complete(prompt[:16], max_tokens=2, temperature=0)  # warm-up: channels, first groups
        for _ in range(repeats):
            t0 = time.perf_counter()
            stamps = []
            for item in client.generate(prompt, max_tokens=tokens, temperature=0, ignore_eos=True):
                if isinstance(item, Delta):
                    stamps += [(time.perf_counter() - t0) * 1e3] * len(item.token_ids)
            gaps = [b - a for a, b in zip(stamps, stamps[1:])]
            out["ttft"].append(stamps[0])
            out["first_gap"].append(gaps[0])
            out["later_gaps"].append(statistics.median(gaps[1:]))
    return out


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
        cfg = ModelConfig.from_folder(Path(tmp))
    kv_bytes = -(-args.prompt_tokens // 16) * 16 * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4
    base = statistics.median(results[BASELINE]["ttft"])
    print(f"machine: {machine()}")
    print(f"a {args.prompt_tokens}-token prompt ({kv_bytes / 2**20:.1f} MiB of K/V), {args.repeats} runs, one torch "
          "thread per process; medians in ms:")
    print(f"{'':28}{'TTFT':>8}{'min':>8}{'max':>8}{'vs TP1->TP1':>13}{'KV MiB/s':>10}{'gap 1->2':>10}{'later':>8}")
    for name, r in results.items():
        med = statistics.median(r["ttft"])
        print(f"{name:28}{med:8.1f}{min(r['ttft']):8.1f}{max(r['ttft']):8.1f}{med / base:12.2f}x"
              f"{kv_bytes / 2**20 / (med / 1e3):10.1f}{statistics.median(r['first_gap']):10.1f}"
              f"{statistics.median(r['later_gaps']):8.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(machine=machine(), commit=git_commit(), prompt_tokens=args.prompt_tokens,
                                             kv_bytes=kv_bytes, runs_ms=results), indent=2))


if __name__ == "__main__":
    main()
