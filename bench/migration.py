"""A load run with a decode node SIGKILLed in the middle, against the same run undisturbed, in the same
invocation: TTFT, TPOT and end-to-end latency, goodput, failures, and how long the streams that moved stalled.

A 1P2D cluster of the ~51M random Llama (engine_throughput.py), one torch thread per node, fresh for each run;
`--clients` closed-loop clients send `--requests` requests in all (`--prompt-tokens` random tokens, exactly
`--output-tokens` new ones each). In the disturbed run, decode-0 is SIGKILLed once half of the requests have
completed; the router resumes its streams on decode-1. A stream's stall is its longest gap between two tokens;
for the streams that were running when the node died, it is the time from the kill to their next token
elsewhere (detection, a new reservation, the prefill of prompt + delivered tokens, the first decode step).

    python bench/migration.py [--clients 8] [--requests 96] [--prompt-tokens 128] [--output-tokens 64] [--json P]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

from baton.bench.engine_throughput import machine, write_checkpoint
from baton.bench.runner import git_commit
from baton.bench.ttft import random_prompt
from baton.cluster.launch import ClusterSpec, LocalCluster
from baton.router.client import AsyncBatonClient, BatonError, Delta


async def load(address: str, args, kill_pid: int | None, moved_ids) -> dict:
    prompt = random_prompt(args.prompt_tokens)
    records, failures = [], []
    done = 0
    killed_at = None
    queue = list(range(args.requests))

    async def client_loop(client: AsyncBatonClient) -> None:
        nonlocal done, killed_at
        while queue:
            rid = f"r{queue.pop()}"
            t0 = time.perf_counter()
            stamps = []
            try:
                async for item in client.generate(prompt, max_tokens=args.output_tokens, temperature=0,
                                                  ignore_eos=True, request_id=rid):
                    if isinstance(item, Delta):
                        stamps += [time.perf_counter()] * len(item.token_ids)
            except BatonError as e:
                failures.append(f"{e.code.name}: {e.details}")
                continue
            records.append((rid, t0, stamps))
            done += 1
            if kill_pid is not None and killed_at is None and done >= args.requests // 2:
                killed_at = time.perf_counter()
                os.kill(kill_pid, signal.SIGKILL)

    start = time.perf_counter()
    async with AsyncBatonClient(address, timeout=300) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(args.clients)))
    wall = time.perf_counter() - start
    ttft = [(s[0] - t0) * 1e3 for _, t0, s in records]
    tpot = [(s[-1] - s[0]) / (len(s) - 1) * 1e3 for _, _, s in records]
    e2e = [(s[-1] - t0) * 1e3 for _, t0, s in records]
    gaps = [max(b - a for a, b in zip(s, s[1:])) * 1e3 for _, _, s in records]
    # The streams that moved (the router logs each): from the kill to their next token elsewhere.
    moved = set(moved_ids()) if killed_at is not None else set()
    stalls = [next(b - killed_at for b in s if b > killed_at) * 1e3 for rid, _, s in records
              if rid in moved and s[0] < killed_at < s[-1]]
    # Moved before their first token (reserved on the node, or being prefilled for it): it shows in their TTFT.
    early = [(s[0] - t0) * 1e3 for rid, t0, s in records if rid in moved and s[0] > killed_at]
    return dict(wall_s=wall, completed=len(records), failed=len(failures), failures=failures[:5],
                goodput_rps=len(records) / wall, ttft_ms=ttft, tpot_ms=tpot, e2e_ms=e2e, max_gap_ms=gaps,
                moved=len(moved), stall_after_kill_ms=stalls, moved_before_first_token_ttft_ms=early)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp))
        for name in ("undisturbed", "decode node killed"):
            spec = ClusterSpec(model=tmp, prefill=1, decode=2, threads=1)
            with LocalCluster(spec) as cluster:
                victim = cluster.nodes["decode-0"].pid if name != "undisturbed" else None

                def moved_ids(log=cluster.log_dir / "router.log") -> list[str]:
                    return [line.split()[5].rstrip(":") for line in log.read_text().splitlines()
                            if "resuming on other nodes" in line]

                runs[name] = asyncio.run(load(cluster.address, args, victim, moved_ids))
    print(f"machine: {machine()}")
    print(f"1P2D, {args.clients} clients, {args.requests} requests of {args.prompt_tokens} + {args.output_tokens} "
          "tokens; medians and p99 in ms")
    print(f"{'':22}{'done':>6}{'failed':>7}{'req/s':>7}{'TTFT p50':>10}{'p99':>8}{'TPOT p50':>10}{'p99':>7}"
          f"{'e2e p50':>9}{'p99':>8}{'gap p99':>9}")
    for name, r in runs.items():
        print(f"{name:22}{r['completed']:6}{r['failed']:7}{r['goodput_rps']:7.2f}{pct(r['ttft_ms'], .5):10.1f}"
              f"{pct(r['ttft_ms'], .99):8.1f}{pct(r['tpot_ms'], .5):10.1f}{pct(r['tpot_ms'], .99):7.1f}"
              f"{pct(r['e2e_ms'], .5):9.1f}{pct(r['e2e_ms'], .99):8.1f}{pct(r['max_gap_ms'], .99):9.1f}")
    base, hit = runs["undisturbed"], runs["decode node killed"]
    stalls = hit["stall_after_kill_ms"]
    print(f"goodput with the kill: {hit['goodput_rps'] / base['goodput_rps']:.2f}x the undisturbed run's; "
          f"{hit['moved']} streams moved")
    if stalls:
        print(f"stall of the {len(stalls)} streams that moved (kill -> next token), ms: min "
              f"{min(stalls):.0f}, median {statistics.median(stalls):.0f}, max {max(stalls):.0f} "
              f"(an undisturbed stream's longest gap, median: {statistics.median(base['max_gap_ms']):.0f})")
    if hit["moved_before_first_token_ttft_ms"]:
        early = hit["moved_before_first_token_ttft_ms"]
        print(f"{len(early)} streams moved before their first token; their TTFT, ms: median "
              f"{statistics.median(early):.0f}, max {max(early):.0f} (all requests' TTFT p50 "
              f"{pct(base['ttft_ms'], .5):.0f} undisturbed)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(machine=machine(), commit=git_commit(), options=vars(args) | {
            "json": str(args.json)}, runs=runs), indent=2))


if __name__ == "__main__":
    main()
