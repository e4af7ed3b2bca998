"""Router overhead: tokens relayed per second and added latency per token, router against a direct client.

One local cluster (what `baton up` runs): one colocated node with one torch thread pinned to the first core,
and the router pinned to the second core (every thread of it, after start), on the bundled stories260K
(tiny: an engine step is cheap, so the relay's cost shows). The client is this process, under uvloop, pinned
by default to the router's core: the node's core is then the engine's alone on both paths, and the router
has at most a share of one core. (`--client-core -1` leaves the client on every core; on a 2-core machine
it then takes time from the engine, on the router path most, where it has more to do.) In the same run, at each concurrency level (1, 16, 64, 256 streams by default), both paths are
driven with raw grpc.aio stubs over one channel each:

  direct   DecodeNode.Generate (proto/baton/v1/node.proto) on the colocated node, what the router itself calls
  router   Baton.Generate (proto/baton/v1/baton.proto) on the router, which relays that same node call

Every stream: a random 8-token prompt (token ids), `max_tokens` new tokens, greedy, EOS ignored. Levels
repeat `--rounds` times, the two paths back to back in alternating order. Measured on the client: the
arrival time of every message, from which ITL (per-token inter-arrival; a message carrying k tokens counts
its gap once and k-1 zeros), TTFT (call to first token) and tokens/s (all tokens / wall time of the level);
errors by status code. Added latency per token = ITL via router - ITL direct (p50 and p99).

The colocated engine batches every stream into one step, so ITL is mostly the engine's step time, and the
router's share of it shrinks as the batch grows. The router's own cost is therefore also measured apart from
the engine: its process CPU time (the run time in /proc/<pid>/task/*/schedstat, every thread) per relayed token
(less what it burns idle, from the direct phases), and the
ceiling that implies on one core (1e6 / us per token). The node's and the client's CPU per token are shown
for scale.

    python bench/router_overhead.py [--levels 1,16,64,256] [--max-tokens 160] [--rounds 3] [--client-core C] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
import uuid
from pathlib import Path

import grpc
import uvloop

from baton.bench.engine_throughput import machine
from baton.bench.metrics import percentile
from baton.cluster.launch import ClusterSpec, LocalCluster
from baton.common.membership import MembershipWatcher
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc, node_pb2, node_pb2_grpc


TICK = os.sysconf("SC_CLK_TCK")
TARGET_ADDED_P50_MS = 0.5
TARGET_ROUTER_US = 15.0  # router CPU per relayed token at the top level (issue 15)
SUSTAIN_RATIO = 0.9  # router tokens/s at the top level at least this fraction of direct's: "close"


def cpu_seconds(pid: int) -> float:
    """CPU time of a whole process (every thread), in seconds: the sum of its threads' schedstat run time
    (nanoseconds), else utime + stime from /proc/<pid>/stat (clock ticks, 10 ms)."""
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except FileNotFoundError:  # a thread that just ended
                pass
        return total / 1e9
    except OSError:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK  # fields 14 and 15 of stat(5), after pid and comm


def pin_process(pid: int, core: int) -> int:
    """Pins every thread of `pid` (sched_setaffinity on a pid moves only that one thread). Returns the count."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {core})
            n += 1
        except ProcessLookupError:
            pass
    return n


class Stream:
    __slots__ = ("t0", "arrivals", "tokens", "error")

    def __init__(self) -> None:
        self.t0 = 0.0
        self.arrivals: list[tuple[float, int]] = []  # (perf_counter, tokens in that message)
        self.tokens = 0
        self.error = ""


async def one_stream(path: str, stub, prompt: list[int], max_tokens: int, timeout: float) -> Stream:
    s = Stream()
    sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    if path == "direct":
        call = stub.Generate(node_pb2.NodeGenerateRequest(request_id=f"bench-{uuid.uuid4().hex}",
                                                          prompt_token_ids=prompt, sampling=sampling),
                             timeout=timeout)
    else:
        call = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=sampling),
                             timeout=timeout)
    perf = time.perf_counter
    s.t0 = perf()
    arrivals = s.arrivals
    try:
        async for response in call:
            n = len(response.chunk.token_ids)
            if n:
                arrivals.append((perf(), n))
                s.tokens += n
    except grpc.aio.AioRpcError as e:
        s.error = e.code().name
    if not s.error and s.tokens != max_tokens:
        s.error = f"SHORT({s.tokens})"
    return s


def latencies(streams: list[Stream]) -> tuple[list[float], list[float], dict[str, int]]:
    """ITL (ms; a message of k tokens counts its gap once and k-1 zeros), TTFT (ms) and errors by kind."""
    itl, ttft, errors = [], [], {}
    for s in streams:
        if s.error:
            errors[s.error] = errors.get(s.error, 0) + 1
        if s.arrivals:
            ttft.append((s.arrivals[0][0] - s.t0) * 1e3)
        prev = None
        for t, n in s.arrivals:
            if prev is not None:
                itl.append((t - prev) * 1e3)
            itl.extend([0.0] * (n - 1))
            prev = t
    return itl, ttft, errors


async def run_level(path: str, stub, prompts: list[list[int]], max_tokens: int, pids: dict[str, int],
                    timeout: float) -> dict:
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    client0 = time.process_time()
    t0 = time.perf_counter()
    streams = await asyncio.gather(*(one_stream(path, stub, p, max_tokens, timeout) for p in prompts))
    wall = time.perf_counter() - t0
    cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
    cpu["client"] = time.process_time() - client0
    itl, ttft, errors = latencies(streams)
    tokens = sum(s.tokens for s in streams)
    return dict(streams=len(streams), tokens=tokens, wall_s=wall, itl_ms=itl, ttft_ms=ttft, errors=errors, cpu_s=cpu,
                messages=sum(len(s.arrivals) for s in streams))


def summarize(runs: list[dict]) -> dict:
    itl = [x for r in runs for x in r["itl_ms"]]
    ttft = [x for r in runs for x in r["ttft_ms"]]
    tokens = sum(r["tokens"] for r in runs)
    wall = sum(r["wall_s"] for r in runs)
    errors: dict[str, int] = {}
    for r in runs:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    cpu = {name: sum(r["cpu_s"][name] for r in runs) for name in runs[0]["cpu_s"]}
    return dict(
        streams=sum(r["streams"] for r in runs), tokens=tokens, messages=sum(r["messages"] for r in runs),
        wall_s=wall, tokens_per_s=tokens / wall if wall else 0.0,
        tokens_per_s_each_round=[r["tokens"] / r["wall_s"] for r in runs],
        itl_p50_ms=percentile(itl, 50), itl_p99_ms=percentile(itl, 99), itl_mean_ms=statistics.fmean(itl) if itl else 0,
        ttft_p50_ms=percentile(ttft, 50), ttft_p99_ms=percentile(ttft, 99),
        errors=errors, cpu_s=cpu,
        cpu_us_per_token={name: (v / tokens * 1e6 if tokens else float("nan")) for name, v in cpu.items()},
    )


async def bench(cluster: LocalCluster, args, placement: dict) -> dict:
    watcher = await MembershipWatcher.start(cluster.etcd_url, cluster.cluster)
    try:
        node = watcher.nodes("colocated")[0]
    finally:
        await watcher.close()
    placement["node_address"] = node.address
    pids = {"router": cluster.router.pid, "node": cluster.nodes[node.node_id].pid}
    rng = random.Random(args.seed)
    options = [("grpc.max_concurrent_streams", 1 << 20)]
    async with grpc.aio.insecure_channel(node.address, options=options) as direct_ch, \
            grpc.aio.insecure_channel(cluster.address, options=options) as router_ch:
        stubs = {"direct": node_pb2_grpc.DecodeNodeStub(direct_ch), "router": baton_pb2_grpc.BatonStub(router_ch)}
        # Warm-up: connections, the engine's first steps at a few batch sizes, the router's code paths.
        for path in ("direct", "router"):
            for n in (1, 16, max(args.levels)):
                prompts = [[rng.randrange(3, 512) for _ in range(args.prompt_tokens)] for _ in range(n)]
                await run_level(path, stubs[path], prompts, 16, pids, args.timeout)
        raw: dict[int, dict[str, list[dict]]] = {}
        for level in args.levels:
            raw[level] = {"direct": [], "router": []}
            for r in range(args.rounds):
                # The same prompts for both paths in a round, new ones each round.
                prompts = [[rng.randrange(3, 512) for _ in range(args.prompt_tokens)] for _ in range(level)]
                order = ("direct", "router") if r % 2 == 0 else ("router", "direct")
                for path in order:
                    res = await run_level(path, stubs[path], prompts, args.max_tokens, pids, args.timeout)
                    raw[level][path].append(res)
                    print(f"  {level:4d} streams, round {r + 1}, {path:6}: {res['tokens'] / res['wall_s']:9.0f} tok/s"
                          f"  ITL p50 {percentile(res['itl_ms'], 50):6.2f} ms  errors {res['errors'] or 0}",
                          flush=True)
    return {level: {path: summarize(runs) for path, runs in paths.items()} for level, paths in raw.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64, 256])
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300.0, help="gRPC deadline of every stream (s)")
    ap.add_argument("--client-core", type=int, default=None,
                    help="pin this process (the client) to this core; default: the router's core, so that the "
                         "node's core is the engine's alone on both paths; -1: unpinned, on every core")
    ap.add_argument("--json", type=Path, default=None, help="also write every figure here")
    args = ap.parse_args()
    started = time.perf_counter()

    max_seqs = max(256, max(args.levels))
    spec = ClusterSpec(prefill=0, decode=0, colocated=1, threads=1, pin=True,
                       node_args=["--max-num-seqs", str(max_seqs), "--max-num-batched-tokens", "8192"])
    cores = sorted(os.sched_getaffinity(0))
    placement: dict = {"cores": cores}
    with LocalCluster(spec) as cluster:
        placement["node_core"] = cores[0]  # LocalCluster pins node i to cores[i]
        if len(cores) > 1:
            placement["router_core"] = cores[1]
            placement["router_threads_pinned"] = pin_process(cluster.router.pid, cores[1])
        else:
            placement["router_core"] = None
        client_core = args.client_core if args.client_core is not None else placement["router_core"]
        if client_core is not None and client_core >= 0:
            pin_process(os.getpid(), client_core)
            client_cores = [client_core]
            placement["client"] = f"this process, pinned to core {client_core}"
        else:
            client_cores = cores
            placement["client"] = "this process, unpinned (shares every core with the node and the router)"
        placement["client_cores"] = client_cores
        print(f"cluster up in {time.perf_counter() - started:.1f} s: node on core {placement['node_core']}, router "
              f"on core {placement['router_core']} ({placement.get('router_threads_pinned', 0)} threads pinned), "
              f"client on cores {client_cores}", flush=True)
        results = uvloop.run(bench(cluster, args, placement))

    runtime = time.perf_counter() - started
    print()
    print(f"machine: {machine()}")
    print(f"placement: colocated node (1 torch thread) on core {placement['node_core']}, router on core "
          f"{placement['router_core']}, client (this process, uvloop) on cores {placement['client_cores']}")
    print(f"transport: raw grpc.aio stubs on both paths (DecodeNode.Generate direct, Baton.Generate via the "
          f"router), one channel each; {args.prompt_tokens}-token prompts, {args.max_tokens} new tokens, greedy, "
          f"ignore_eos; {args.rounds} rounds per level, paths alternating")
    print()
    hdr = (f"{'streams':>7} {'path':>6} {'tok/s':>8} {'ITL p50':>8} {'ITL p99':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
           f"{'errors':>6} {'router':>7} {'node':>7} {'client':>7}")
    print(hdr)
    print(f"{'':7} {'':6} {'':8} {'ms':>8} {'ms':>8} {'ms':>9} {'ms':>9} {'':6} {'CPU µs per token':>23}")
    for level, paths in results.items():
        for path in ("direct", "router"):
            s = paths[path]
            c = s["cpu_us_per_token"]
            print(f"{level:7d} {path:>6} {s['tokens_per_s']:8.0f} {s['itl_p50_ms']:8.3f} {s['itl_p99_ms']:8.3f} "
                  f"{s['ttft_p50_ms']:9.2f} {s['ttft_p99_ms']:9.2f} {sum(s['errors'].values()):6d} "
                  f"{c['router']:7.1f} {c['node']:7.1f} {c['client']:7.1f}")
    print()
    print(f"{'streams':>7} {'added p50':>10} {'added p99':>10} {'tok/s ratio':>12} {'router CPU':>11} "
          f"{'1-core ceiling':>15} {'router core busy':>17} {'tokens per':>11}")
    print(f"{'':7} {'ms/token':>10} {'ms/token':>10} {'router/direct':>12} {'µs/token':>11} {'tok/s':>15} "
          f"{'':17} {'message':>11}")
    summary = {}
    for level, paths in results.items():
        d, r = paths["direct"], paths["router"]
        # The router's own CPU per relayed token: its CPU in the router phases less what it burns anyway
        # (membership, health) over the same time, scaled from the direct phases.
        idle_rate = d["cpu_s"]["router"] / d["wall_s"] if d["wall_s"] else 0.0
        router_cpu = max(0.0, r["cpu_s"]["router"] - idle_rate * r["wall_s"])
        us = router_cpu / r["tokens"] * 1e6 if r["tokens"] else float("nan")
        summary[level] = dict(
            added_itl_p50_ms=r["itl_p50_ms"] - d["itl_p50_ms"], added_itl_p99_ms=r["itl_p99_ms"] - d["itl_p99_ms"],
            added_ttft_p50_ms=r["ttft_p50_ms"] - d["ttft_p50_ms"],
            tokens_per_s_ratio=r["tokens_per_s"] / d["tokens_per_s"] if d["tokens_per_s"] else float("nan"),
            router_cpu_us_per_token=us, router_one_core_ceiling_tok_s=1e6 / us if us else float("inf"),
            router_core_busy=r["cpu_s"]["router"] / r["wall_s"] if r["wall_s"] else 0.0,
            router_idle_cpu_per_s=idle_rate,
            router_tokens_per_message=r["tokens"] / r["messages"] if r["messages"] else 0.0,
        )
        x = summary[level]
        print(f"{level:7d} {x['added_itl_p50_ms']:+10.3f} {x['added_itl_p99_ms']:+10.3f} {x['tokens_per_s_ratio']:12.3f} "
              f"{us:11.1f} {x['router_one_core_ceiling_tok_s']:15.0f} {x['router_core_busy'] * 100:16.0f}% "
              f"{x['router_tokens_per_message']:11.2f}")

    # Verdict.
    print()
    top = max(results)
    worst_p50 = max(s["added_itl_p50_ms"] for s in summary.values())
    latency_ok = worst_p50 < TARGET_ADDED_P50_MS
    print(f"added ITL p50 per token: worst {worst_p50:+.3f} ms over levels {list(results)} "
          f"(target < {TARGET_ADDED_P50_MS} ms): {'MET' if latency_ok else 'NOT MET'}")
    r_top, d_top = results[top]["router"], results[top]["direct"]
    complete = not r_top["errors"] and r_top["tokens"] == r_top["streams"] * args.max_tokens
    ratio = summary[top]["tokens_per_s_ratio"]
    sustain_ok = complete and ratio >= SUSTAIN_RATIO
    print(f"{top} concurrent streams: {r_top['streams']} streams, {r_top['tokens']} tokens, errors "
          f"{r_top['errors'] or 'none'}; relayed {r_top['tokens_per_s']:.0f} tok/s against {d_top['tokens_per_s']:.0f} "
          f"direct (ratio {ratio:.3f}, 'close' = >= {SUSTAIN_RATIO}): {'MET' if sustain_ok else 'NOT MET'}")
    us_top = summary[top]["router_cpu_us_per_token"]
    print(f"router CPU: {us_top:.1f} µs per relayed token at {top} streams -> at most "
          f"{summary[top]['router_one_core_ceiling_tok_s']:.0f} tok/s on one core; at {top} streams it ran at "
          f"{summary[top]['router_core_busy'] * 100:.0f}% of its core, {summary[top]['router_tokens_per_message']:.2f} "
          f"tokens per message to the client (target <= {TARGET_ROUTER_US} µs: "
          f"{'MET' if us_top <= TARGET_ROUTER_US else 'NOT MET'})")
    print(f"runtime: {runtime:.1f} s")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(
            machine=machine(), placement=placement,
            config=dict(levels=args.levels, max_tokens=args.max_tokens, prompt_tokens=args.prompt_tokens,
                        rounds=args.rounds, seed=args.seed, model="stories260K (bundled)",
                        cluster="1 colocated node, threads=1, pin=True, --max-num-seqs "
                                f"{max_seqs} --max-num-batched-tokens 8192",
                        transport="raw grpc.aio stubs: DecodeNode.Generate direct, Baton.Generate via the router"),
            targets=dict(added_itl_p50_ms_below=TARGET_ADDED_P50_MS, streams=top, tokens_per_s_ratio_at_least=SUSTAIN_RATIO),
            verdict=dict(added_latency_met=latency_ok, sustain_met=sustain_ok),
            results={str(k): v for k, v in results.items()}, overhead={str(k): v for k, v in summary.items()},
            runtime_s=runtime,
        ), indent=2))


if __name__ == "__main__":
    main()
