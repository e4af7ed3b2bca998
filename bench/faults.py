"""Faults: a storm of cancellations and deadlines, and nodes SIGKILLed and restarted under load.

`cancel`: a 1P2D cluster of the bundled stories260K takes `--requests` requests, `--concurrency` at a time,
most of them cancelled by their client or ended by a deadline at a random moment (queued, mid-prefill, between
the first token and Continue, mid-decode). Afterwards every node's free KV blocks must be back at their
baseline with nothing running, waiting or reserved, and requests sent right after must succeed (token for
token what they returned before the storm). Then the cancellation latency: `--probes` requests one at a time
on the quiet cluster, each cancelled (or ended by its deadline) at a random phase, while all three nodes'
GetStats are polled every 5 ms from the cancel until none of them holds anything.

`chaos`: a 2P2D cluster of stories260K under `--clients` closed-loop clients for `--minutes` (greedy and seeded
requests of various lengths, each answer checked token for token against the offline engine's). Every
`--every` seconds a random node (never the router or etcd) is SIGKILLed and started again with its command line,
environment and working folder, on the port it had (the nodes of a LocalCluster bind port 0, so the same
address needs `--port`), and waited for in the membership before the next fault. Reports the success rate,
failures by status, migrations, stalls, KV blocks once the load has stopped, and the RSS of the router and
nodes at start and end. A run in which no fault was injected exits with status 1.

    python bench/faults.py cancel [--requests 10000] [--concurrency 48] [--probes 200] [--seed S] [--json P]
    python bench/faults.py chaos [--minutes 10] [--every 20] [--clients 16] [--templates 48] [--seed S] [--json P]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import grpc

from baton.bench.engine_throughput import machine
from baton.bench.metrics import percentile
from baton.bench.runner import git_commit
from baton.cluster.launch import ClusterSpec, LocalCluster
from baton.common.membership import MembershipWatcher, NodeInfo
from baton.router.client import AsyncBatonClient, BatonError, Cancelled, DeadlineExceeded, Delta, Finished
from baton.v1 import node_pb2, node_pb2_grpc

POLL_S = 0.005  # between two GetStats rounds while timing a cancellation
HOLD_S = 0.25  # a probe counts as cleaned up once every node has stayed idle this long (a late Reserve shows)

# -- shared: node statistics, percentiles, logs ---------------------------------------------------------------


class Stats:
    """GetStats on every node of a snapshot of the membership, one channel each."""

    def __init__(self, nodes: list[NodeInfo]) -> None:
        self.nodes = nodes
        self._channels = [grpc.aio.insecure_channel(n.address) for n in nodes]
        self._stubs = [(node_pb2_grpc.PrefillNodeStub if n.role == "prefill" else node_pb2_grpc.DecodeNodeStub)(c)
                       for n, c in zip(nodes, self._channels)]

    async def read(self) -> dict[str, node_pb2.NodeStats]:
        replies = await asyncio.gather(*(s.GetStats(node_pb2.GetStatsRequest(), timeout=10, wait_for_ready=True)
                                         for s in self._stubs))
        return {n.node_id: r for n, r in zip(self.nodes, replies)}

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels))


def idle(s: node_pb2.NodeStats, baseline: int) -> bool:
    return (s.free_blocks, s.running, s.waiting, s.reserved) == (baseline, 0, 0, 0)


def brief(s: node_pb2.NodeStats) -> dict:
    return dict(total_blocks=s.total_blocks, free_blocks=s.free_blocks, running=s.running, waiting=s.waiting,
                reserved=s.reserved, peers=s.peers, requests_served=s.requests_served)


async def settle(stats: Stats, baseline: dict[str, int], timeout: float) -> tuple[float | None, dict]:
    """Polls until every node is idle at its baseline: (seconds it took or None past `timeout`, last stats)."""
    start = time.perf_counter()
    while True:
        now = await stats.read()
        if all(idle(s, baseline[n]) for n, s in now.items()):
            return time.perf_counter() - start, {n: brief(s) for n, s in now.items()}
        if time.perf_counter() - start > timeout:
            return None, {n: brief(s) for n, s in now.items()}
        await asyncio.sleep(0.05)  # polling node state, which signals nothing


async def membership(cluster: LocalCluster) -> list[NodeInfo]:
    async with await MembershipWatcher.start(cluster.etcd_url, cluster.cluster) as watcher:
        return watcher.nodes()


def spread(values: list[float]) -> dict:
    """Count, p50, p99 and max; None (JSON null) for an empty list."""
    if not values:
        return dict(n=0, p50=None, p99=None, max=None)
    return dict(n=len(values), p50=percentile(values, 50), p99=percentile(values, 99), max=max(values))


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def took(seconds: float | None) -> str:
    return "NO (not within the bound)" if seconds is None else f"yes, in {seconds:.2f} s"


def log_findings(log_dir: Path) -> dict:
    """Per log file: KV transfers that failed, leases that ran out, and tracebacks (grpc.aio's ExecuteBatchError,
    logged when a response is written just as the client cancels, is its own harmless race)."""
    found = {}
    for path in sorted(log_dir.glob("*.log")):
        text = path.read_text(errors="replace")
        lines = text.splitlines()
        found[path.name] = dict(
            kv_failed=sum(("kv transfer" in x or "kv writes" in x) and "failed" in x for x in lines),
            lease_expired=sum("expired in phase" in x for x in lines),
            tracebacks=sum("ExecuteBatchError" not in chunk for chunk in text.split("Traceback")[1:]))
    return {name: f for name, f in found.items() if any(f.values())}


def leftovers(cluster_name: str) -> list[int]:
    """Live processes that still carry the cluster's name on their command line (SIGKILLed here)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and cluster_name.encode() in (entry / "cmdline").read_bytes() and \
                    (entry / "stat").read_text().split()[2] != "Z" and int(entry.name) != os.getpid():
                pids.append(int(entry.name))
        except OSError:
            continue
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return pids


def write_json(path: Path | None, args: argparse.Namespace, result: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        path.write_text(json.dumps(dict(machine=machine(), commit=git_commit(), options=options) | result, indent=2))


# -- cancel: the storm ------------------------------------------------------------------------------------------

PROMPTS = [
    "Once upon a time",
    "The little dog ran to the park and",
    "Lily and Ben were best friends. One day, they went to the beach to play in the sand. " * 4,
    "Tom had a big red ball. He liked to throw it high in the sky and catch it. " * 8,  # 258 tokens
]
LONG = PROMPTS[-1]
KINDS = ("finish", "cancel", "deadline", "after-tokens")


async def storm_request(client: AsyncBatonClient, rng: random.Random, outcomes: Counter, errors: Counter) -> None:
    """One request of the storm: finished, cancelled after a random delay or a random number of tokens, or given
    a deadline that may land anywhere from before the router to mid-decode."""
    prompt, max_tokens, kind = rng.choice(PROMPTS), rng.randint(4, 64), rng.choice(KINDS)
    timeout = rng.uniform(0.002, 0.5) if kind == "deadline" else 120.0
    delay, after = rng.uniform(0.0, 0.5), rng.randint(1, 8)

    async def consume() -> None:
        seen = 0
        async with contextlib.aclosing(client.generate(prompt, max_tokens=max_tokens, temperature=0,
                                                       ignore_eos=True, timeout=timeout)) as stream:
            async for item in stream:
                seen += len(item.token_ids) if isinstance(item, Delta) else 0
                if kind == "after-tokens" and seen >= after:
                    return  # closing the stream cancels the call: at the first token, or mid-decode

    task = asyncio.ensure_future(consume())
    try:
        if kind == "cancel" and not (await asyncio.wait({task}, timeout=delay))[0]:
            task.cancel()
        await task
        outcomes[kind + (": ended early" if kind == "after-tokens" else ": finished")] += 1
    except asyncio.CancelledError:
        outcomes["cancel: cancelled"] += 1
    except (DeadlineExceeded, Cancelled) as e:
        outcomes[f"{kind}: {e.code.name}"] += 1
    except BatonError as e:  # not of the client's choosing: a failure of the cluster
        errors[f"{e.code.name}: {e.details}"] += 1


async def storm(address: str, n: int, concurrency: int, rng: random.Random) -> tuple[Counter, Counter, float]:
    outcomes, errors = Counter(), Counter()
    gate = asyncio.Semaphore(concurrency)

    async def gated(r: random.Random) -> None:
        async with gate:
            await storm_request(client, r, outcomes, errors)

    start = time.perf_counter()
    async with AsyncBatonClient(address) as client:
        async with asyncio.timeout(1800):  # no request may hang the benchmark
            await asyncio.gather(*(gated(random.Random(rng.getrandbits(64))) for _ in range(n)))
    return outcomes, errors, time.perf_counter() - start


async def answers(address: str) -> list[list[int]]:
    """The PROMPTS' greedy answers (16 tokens), one request each."""
    async with AsyncBatonClient(address, timeout=60) as client:
        return [(await client.complete(p, max_tokens=16, temperature=0)).token_ids for p in PROMPTS]


# -- cancel: the latency probes ---------------------------------------------------------------------------------

@dataclass(slots=True)
class Probe:
    kind: str  # "cancel" (the client cancels) or "deadline" (the call's deadline passes)
    aim: str  # the phase aimed at: "before first token", "at first token", "mid-decode", "deadline"
    tokens: int  # tokens the client had received when it cancelled (or when the deadline passed)
    held_at_cancel: bool  # the last poll begun before the cancel found a node holding something
    busy_after: bool  # a poll begun after the cancel did
    latency_ms: float | None  # cancel -> the end of the first poll after it that found every node idle, for good
    low_ms: float  # and the lower bound: cancel -> the start of the last poll after it that found a node busy
    outcome: str  # how the client's call ended


@dataclass(slots=True, frozen=True)
class Poll:
    start: float
    end: float
    idle: bool  # every node at its baseline, nothing running, waiting or reserved


@dataclass(slots=True)
class Mark:
    """When the probe was cancelled, or its deadline passes: set once, read by the poller."""
    t0: float | None = None


def clean_at(polls: list[Poll], t0: float) -> float | None:
    """The end of the first idle poll begun after `t0` and after the last busy one: from then on every node held
    nothing for the request."""
    after = [p for p in polls if p.start >= t0]
    busy = [i for i, p in enumerate(after) if not p.idle]
    rest = after[busy[-1] + 1:] if busy else after
    return rest[0].end if rest else None


async def poll_nodes(stats: Stats, baseline: dict[str, int], task: asyncio.Future, mark: Mark,
                     bound: float = 30.0) -> list[Poll]:
    """Polls every node from the probe's start until its call has ended and every node has stayed idle for
    HOLD_S since the cancel (a Reserve that lands late shows); gives up after `bound` seconds."""
    polls: list[Poll] = []
    begin = time.perf_counter()
    while True:
        start = time.perf_counter()
        now = await stats.read()
        polls.append(Poll(start, time.perf_counter(), all(idle(s, baseline[n]) for n, s in now.items())))
        if task.done():
            if mark.t0 is None and polls[-1].idle:
                return polls  # it ended without a cancel
            clean = clean_at(polls, mark.t0) if mark.t0 is not None else None
            if clean is not None and polls[-1].end - clean >= HOLD_S:
                return polls
        if polls[-1].end - begin > bound:
            return polls
        await asyncio.sleep(POLL_S)  # the poll period: what sets the measurement's resolution


async def probe(client: AsyncBatonClient, stats: Stats, baseline: dict[str, int], rng: random.Random,
                ttft: float) -> tuple[Probe, list[float]]:
    """One request of the long prompt, cancelled at a random phase (or given a deadline that falls anywhere from
    the router to mid-decode), with the nodes polled throughout."""
    aim = rng.choice(("before first token", "at first token", "mid-decode", "deadline"))
    stop_after = {"at first token": 1, "mid-decode": rng.randint(2, 100)}.get(aim, 10**9)
    timeout = rng.uniform(0.001, 3 * ttft) if aim == "deadline" else 60.0
    arrivals: list[float] = []  # one per token
    mark = Mark()

    async def consume() -> str:
        async with contextlib.aclosing(client.generate(LONG, max_tokens=200, temperature=0, ignore_eos=True,
                                                       timeout=timeout)) as stream:
            async for item in stream:
                arrivals.extend([time.perf_counter()] * len(getattr(item, "token_ids", ())))
                if len(arrivals) >= stop_after:
                    mark.t0 = time.perf_counter()
                    return "cancelled"  # aclosing closes the stream: the gRPC call is cancelled now
        return "finished"

    start = time.perf_counter()
    if aim == "deadline":
        mark.t0 = start + timeout
    task = asyncio.ensure_future(consume())
    poller = asyncio.ensure_future(poll_nodes(stats, baseline, task, mark))
    if aim == "before first token":
        await asyncio.wait({task}, timeout=rng.uniform(0.0, ttft))
        if not task.done():
            mark.t0 = time.perf_counter()
            task.cancel()
    polls = await poller
    try:
        outcome = await task
    except asyncio.CancelledError:
        outcome = "cancelled"
    except BatonError as e:
        outcome = e.code.name
    gaps = [b.end - a.end for a, b in zip(polls, polls[1:])]
    t0 = mark.t0
    if t0 is None:
        return Probe("cancel", aim, len(arrivals), False, False, None, 0.0, outcome), gaps
    before = [p for p in polls if p.start < t0]
    busy_after = [p.start for p in polls if p.start >= t0 and not p.idle]
    clean = clean_at(polls, t0)
    return Probe("deadline" if aim == "deadline" else "cancel", aim, sum(a <= t0 for a in arrivals),
                 bool(before) and not before[-1].idle, bool(busy_after),
                 (clean - t0) * 1e3 if clean is not None else None, (max(busy_after, default=t0) - t0) * 1e3,
                 outcome), gaps


def phase_of(p: Probe) -> str:
    """Where the request was, as the client saw it, when it was cancelled."""
    where = "before its first token" if not p.tokens else "after its first token" if p.tokens == 1 else "mid-decode"
    return f"{p.kind} {where}"


async def probes(address: str, stats: Stats, baseline: dict[str, int], n: int, rng: random.Random) -> dict:
    async with AsyncBatonClient(address) as client:
        warm = [await client.complete(LONG, max_tokens=1, temperature=0) for _ in range(5)]
        ttft = statistics.median(c.finished.ttft_ms for c in warm) / 1e3
        results, gaps = [], []
        for _ in range(n):
            p, g = await probe(client, stats, baseline, rng, ttft)
            results.append(p)
            gaps += g
    seen = [p for p in results if p.held_at_cancel or p.busy_after]
    measured = [p for p in seen if p.latency_ms is not None]
    by_phase = {}
    for p in measured:
        by_phase.setdefault(phase_of(p), []).append(p.latency_ms)
    return dict(
        ttft_ms=ttft * 1e3, resolution_ms=statistics.median(gaps) * 1e3 if gaps else None,
        measured=spread([p.latency_ms for p in measured]), lower_bound=spread([p.low_ms for p in measured]),
        by_phase={k: spread(v) for k, v in sorted(by_phase.items())},
        busy_after_the_cancel=sum(p.busy_after for p in measured),
        not_seen_on_a_node=len(results) - len(seen) - sum(p.outcome == "finished" for p in results),
        ended_before_the_cancel=sum(p.outcome == "finished" for p in results),
        never_idle=len(seen) - len(measured),
        probes=[asdict(p) for p in results])


# -- cancel: the scenario ---------------------------------------------------------------------------------------

async def cancel_run(cluster: LocalCluster, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    nodes = await membership(cluster)
    stats = Stats(nodes)
    try:
        baseline = {n: s.free_blocks for n, s in (await stats.read()).items()}
        before = await answers(cluster.address)
        outcomes, errors, wall = await storm(cluster.address, args.requests, args.concurrency, rng)
        settled_s, after_storm = await settle(stats, baseline, timeout=60)
        after = await answers(cluster.address)
        latency = await probes(cluster.address, stats, baseline, args.probes, rng)
        settled_probes_s, final = await settle(stats, baseline, timeout=60)
    finally:
        await stats.close()
    return dict(
        nodes={n.node_id: n.role for n in nodes}, baseline_free_blocks=baseline,
        storm=dict(requests=args.requests, wall_s=wall, requests_per_s=args.requests / wall,
                   outcomes=dict(sorted(outcomes.items())), errors=dict(errors), settled_s=settled_s,
                   stats_after=after_storm),
        after_storm_same_answers=after == before, cancel_latency=latency,
        settled_after_probes_s=settled_probes_s, stats_final=final, logs=log_findings(cluster.log_dir))


def print_cancel(r: dict) -> None:
    s, lat = r["storm"], r["cancel_latency"]
    print(f"machine: {machine()}")
    print(f"1P2D stories260K: {s['requests']} requests in {s['wall_s']:.1f} s ({s['requests_per_s']:.0f}/s)")
    for k, v in s["outcomes"].items():
        print(f"  {k:28}{v:7}")
    print(f"  errors: {sum(s['errors'].values())} {dict(list(s['errors'].items())[:5]) or ''}")
    print(f"after the storm: every node idle at its baseline: {took(s['settled_s'])}; answers right after "
          f"identical to before: {r['after_storm_same_answers']}")
    for node, st in s["stats_after"].items():
        print(f"  {node:10} free {st['free_blocks']}/{r['baseline_free_blocks'][node]} running {st['running']} "
              f"waiting {st['waiting']} reserved {st['reserved']} peers {st['peers']}")
    m, low = lat["measured"], lat["lower_bound"]
    print(f"cancellation latency, cancel -> every node idle ({m['n']} probes held by a node at or after the cancel, "
          f"{lat['busy_after_the_cancel']} of them seen busy after it; polls every {fmt(lat['resolution_ms'])} ms): "
          f"p50 {fmt(m['p50'])} ms, p99 {fmt(m['p99'])} ms, max {fmt(m['max'])} ms (lower bounds: p50 "
          f"{fmt(low['p50'])}, p99 {fmt(low['p99'])}, max {fmt(low['max'])})")
    for phase, v in lat["by_phase"].items():
        print(f"  {phase:36}{v['n']:5}  p50 {fmt(v['p50']):>7}  p99 {fmt(v['p99']):>7}  max {fmt(v['max']):>7}")
    print(f"  not seen on any node {lat['not_seen_on_a_node']}, finished before the cancel "
          f"{lat['ended_before_the_cancel']}, never idle within 30 s {lat['never_idle']} (TTFT of the probes' "
          f"prompt, idle: {lat['ttft_ms']:.1f} ms)")
    print(f"after the probes: every node idle at its baseline: {took(r['settled_after_probes_s'])}")
    print(f"logs: {r['logs'] or 'no failed transfer, expired lease or traceback'}")


# -- chaos: the load --------------------------------------------------------------------------------------------

OPENERS = ["Once upon a time", "The little dog", "Lily and Ben went to the park.", "One day, Tom found a shiny",
           "Sue liked to sing", "The sun was hot and the cat", "Mom said", "A big bird sat on a tree and",
           "Tim had a toy car. He", "There was a girl named Amy who loved to draw. " * 3]


@dataclass(slots=True, frozen=True)
class Template:
    prompt: str
    options: dict  # generate()'s keyword options
    want: tuple[int, ...]  # the offline engine's tokens
    finish: str  # and finish reason


def templates(n: int, rng: random.Random) -> list[Template]:
    """`n` requests (greedy and seeded, 8-160 tokens, EOS honoured or not) with the offline engine's answers."""
    from baton.engine import LLM, SamplingParams

    cases = []
    for i in range(n):
        options = dict(max_tokens=rng.choice((8, 24, 48, 96, 160)), ignore_eos=rng.random() < 0.5)
        if i % 2:
            options |= dict(temperature=rng.choice((0.7, 1.0)), top_p=rng.choice((0.9, 1.0)),
                            top_k=rng.choice((0, 40)), seed=rng.getrandbits(31))
        else:
            options |= dict(temperature=0.0)
        cases.append((rng.choice(OPENERS), options))
    with LLM() as llm:
        outs = llm.generate([p for p, _ in cases], [SamplingParams(**o) for _, o in cases])
    return [Template(p, o, tuple(out.token_ids), out.finish_reason.value) for (p, o), out in zip(cases, outs)]


@dataclass(slots=True)
class Outcome:
    start_s: float  # since the load began
    seconds: float
    error: str  # "" when the answer was complete and right
    tokens: int
    ttft_ms: float  # a request moved before its first token pays its stall here
    max_gap_ms: float  # its longest wait between two chunks (a moved stream's stall)


_IDS = re.compile(r"'[^']*#[0-9a-f]{12}(~\d+)?'|[0-9a-f]{32}(#[0-9a-f]{12}(~\d+)?)?")
_MOVE = re.compile(r"request \S+: (\S+(?: or \S+)?) failed after \d+ tokens \((.*)\); resuming on other nodes")


def checked(t: Template, deltas: list[Delta], finish: Finished | None) -> str:
    got = [tok for d in deltas for tok in d.token_ids]
    indices = [d.index + k for d in deltas for k in range(len(d.token_ids))]
    if indices != list(range(len(got))):
        return "WRONG: a token lost or repeated"
    if tuple(got) != t.want:
        return "WRONG: tokens differ from the offline engine's"
    if finish is None or finish.finish_reason != t.finish:
        return f"WRONG: finish {finish.finish_reason if finish else None}, not {t.finish}"
    return ""


async def one(client: AsyncBatonClient, t: Template, t_load: float) -> Outcome:
    start = time.perf_counter()
    deltas, finish, stamps = [], None, [start]
    try:
        async for item in client.generate(t.prompt, timeout=120, **t.options):
            stamps.append(time.perf_counter())
            if isinstance(item, Delta):
                deltas.append(item)
            else:
                finish = item
        error = checked(t, deltas, finish)
    except BatonError as e:
        error = f"{e.code.name}: {_IDS.sub('<id>', e.details)}"
    gaps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    ttft = (stamps[1] - start) * 1e3 if len(stamps) > 1 else 0.0
    return Outcome(start - t_load, time.perf_counter() - start, error, sum(len(d.token_ids) for d in deltas),
                   ttft, max(gaps, default=0.0) * 1e3)


async def client_loop(client: AsyncBatonClient, cases: list[Template], rng: random.Random, t_load: float,
                      until: float, out: list[Outcome]) -> None:
    while time.perf_counter() < until:
        out.append(await one(client, rng.choice(cases), t_load))


# -- chaos: the faults ------------------------------------------------------------------------------------------

@dataclass(slots=True)
class Fault:
    at_s: float  # since the load began
    node_id: str
    killed_pid: int
    new_pid: int
    back_s: float | None  # kill -> registered again and answering GetStats (None: not within the bound)
    rss_kb: dict[str, int]  # every process's (router and nodes), just before the kill: the trend over faults
    killed_wall: float  # time.time() of the kill, to match the nodes' and router's log lines


def rss_kb(pid: int) -> int:
    """VmRSS in KiB; 0 for a process that is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def process_rss(cluster: LocalCluster) -> dict:
    procs = {"router": cluster.router, **cluster.nodes}
    return {name: dict(pid=p.pid, rss_kb=rss_kb(p.pid)) for name, p in procs.items()}


def proc_argv_env(pid: int) -> tuple[list[str], dict[str, str], str]:
    """A process's command line, environment and working folder, read before it is killed."""
    argv = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]]
    env = dict(e.decode().split("=", 1) for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in e)
    return argv, env, os.readlink(f"/proc/{pid}/cwd")


def on_port(argv: list[str], port: str) -> list[str]:
    """The command line bound to `port`: a LocalCluster's nodes take port 0, which would move the node."""
    if "--port" in argv:
        i = argv.index("--port")
        return argv[: i + 1] + [port] + argv[i + 2:] if argv[i + 1] == "0" else argv
    return [*argv, "--port", port]


class Chaos:
    """Kills a random node and starts it again as it was; the cluster's Popen entry is replaced, so that
    LocalCluster.stop stops the new process."""

    def __init__(self, cluster: LocalCluster, watcher: MembershipWatcher, rng: random.Random, bound: float) -> None:
        self.cluster, self.watcher, self.rng, self.bound = cluster, watcher, rng, bound
        self.started: list[subprocess.Popen] = []

    async def fault(self, t_load: float) -> Fault:
        node_id = self.rng.choice(sorted(self.cluster.nodes))
        proc = self.cluster.nodes[node_id]
        address = self.watcher.get(node_id).address
        argv, env, cwd = proc_argv_env(proc.pid)
        rss = {name: p["rss_kb"] for name, p in process_rss(self.cluster).items()}
        killed_at, killed_wall = time.perf_counter(), time.time()
        os.kill(proc.pid, signal.SIGKILL)
        await asyncio.to_thread(proc.wait)
        old = self.watcher.get(node_id)  # its last record: a new one can only come from the new process
        log = self.cluster.log_dir / f"{node_id}.restart{len(self.started) + 1}.log"
        with open(log, "wb") as out:  # started from the main thread: its parent-death signal follows this thread
            new = subprocess.Popen(on_port(argv, address.rpartition(":")[2]), stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True)
        self.started.append(new)
        self.cluster.nodes[node_id] = new
        back = await self._back(node_id, old, address, killed_at)
        print(f"  fault {len(self.started)}: {node_id} pid {proc.pid} SIGKILLed at {killed_at - t_load:.1f} s, "
              f"pid {new.pid} back {'after %.1f s' % back if back is not None else 'NOT within the bound'}",
              flush=True)
        return Fault(killed_at - t_load, node_id, proc.pid, new.pid, back, rss, killed_wall)

    async def _back(self, node_id: str, old: NodeInfo | None, address: str, killed_at: float) -> float | None:
        try:
            await self.watcher.wait_for(lambda: (n := self.watcher.get(node_id)) is not None and n is not old,
                                        self.bound)
            async with grpc.aio.insecure_channel(address) as channel:
                stub = node_pb2_grpc.PrefillNodeStub(channel) if "prefill" in node_id else \
                    node_pb2_grpc.DecodeNodeStub(channel)
                await stub.GetStats(node_pb2.GetStatsRequest(), timeout=self.bound, wait_for_ready=True)
        except (TimeoutError, grpc.aio.AioRpcError):
            return None
        return time.perf_counter() - killed_at


async def inject(chaos: Chaos, t_load: float, until: float, every: float, faults: list[Fault]) -> None:
    """A fault every `every` seconds until `until`; stops early if a node did not come back."""
    next_at = t_load + every
    while True:
        # The fault schedule: a timer, not a synchronisation.
        await asyncio.sleep(max(0.0, min(next_at, until) - time.perf_counter()))
        if time.perf_counter() >= until:
            return
        faults.append(await chaos.fault(t_load))
        if faults[-1].back_s is None:
            return
        next_at = max(next_at + every, time.perf_counter())


# -- chaos: the scenario ----------------------------------------------------------------------------------------

def migration_causes(router_log: str) -> dict[str, int]:
    """The router's "resuming on other nodes" lines by failed node role and cause (ids, ports and numbers
    blanked): a node that refuses connections and one whose stream broke are different faults."""
    causes = Counter()
    for m in _MOVE.finditer(router_log):
        role = " or ".join(node.rsplit("-", 1)[0] for node in m.group(1).split(" or "))
        causes[f"{role}: {re.sub(r'[0-9]+', 'N', _IDS.sub('<id>', m.group(2)))[:160]}"] += 1
    return dict(causes.most_common())


def log_time(line: str) -> float:
    """The epoch time of a log line ("2026-12-01 08:51:05,062 router ...", local time)."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def refused_after_back(router_log: str, faults: list[Fault]) -> list[dict]:
    """Per fault: the router's moves off the node for "Connection refused" logged after the restarted node was
    registered and serving again (its channel to the address still failing), until that node's next kill."""
    lines = [line for line in router_log.splitlines() if "Connection refused" in line and "resuming" in line]
    found = []
    for i, f in enumerate(faults):
        if f.back_s is None:
            continue
        back = f.killed_wall + f.back_s
        end = next((g.killed_wall for g in faults[i + 1:] if g.node_id == f.node_id), float("inf"))
        late = [log_time(x) - back for x in lines if f": {f.node_id} failed" in x and back <= log_time(x) < end]
        if late:
            found.append(dict(node_id=f.node_id, fault=i + 1, moves=len(late), last_s_after_back=max(late)))
    return found


def summarise(outcomes: list[Outcome]) -> dict:
    failed = Counter(o.error for o in outcomes if o.error)
    ok = [o for o in outcomes if not o.error]
    gaps = [o.max_gap_ms for o in ok]
    return dict(requests=len(outcomes), succeeded=len(ok), success_rate=len(ok) / max(1, len(outcomes)),
                failures=dict(failed.most_common()), tokens=sum(o.tokens for o in ok),
                ttft_ms=spread([o.ttft_ms for o in ok]), longest_gap_ms=spread(gaps),
                gaps_over_1s=sum(g > 1000 for g in gaps),
                e2e_s=spread([o.seconds for o in ok]))


async def chaos_run(cluster: LocalCluster, cases: list[Template], args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed + 1)
    watcher = await MembershipWatcher.start(cluster.etcd_url, cluster.cluster)
    chaos = Chaos(cluster, watcher, rng, bound=120.0)
    try:
        async with AsyncBatonClient(cluster.address) as client:
            warm = [await one(client, t, time.perf_counter()) for t in cases]  # before any fault
            rss_start = process_rss(cluster)
            outcomes, faults = [], []
            t_load = time.perf_counter()
            until = t_load + args.minutes * 60
            loops = [client_loop(client, cases, random.Random(rng.getrandbits(64)), t_load, until, outcomes)
                     for _ in range(args.clients)]
            await asyncio.gather(inject(chaos, t_load, until, args.every, faults), *loops)
            load_s = time.perf_counter() - t_load
        nodes = await membership(cluster)
        stats = Stats(nodes)
        try:
            totals = {n: s.total_blocks for n, s in (await stats.read()).items()}
            settled_s, after = await settle(stats, totals, timeout=60)
        finally:
            await stats.close()
        rss_end = process_rss(cluster)
    finally:
        await watcher.close()
    router_log = (cluster.log_dir / "router.log").read_text(errors="replace")
    return dict(
        prefault_mismatches=sum(bool(o.error) for o in warm), prefault_errors=[o.error for o in warm if o.error][:5],
        load_s=load_s, faults=[asdict(f) for f in faults], faults_by_node=dict(Counter(f.node_id for f in faults)),
        load=summarise(outcomes), migrations=router_log.count("resuming on other nodes"),
        migration_causes=migration_causes(router_log), refused_after_back=refused_after_back(router_log, faults),
        nodes_in_membership_after=sorted(n.node_id for n in nodes), settled_s=settled_s, stats_after=after,
        rss_start=rss_start, rss_end=rss_end, logs=log_findings(cluster.log_dir),
        failure_times_s=[round(o.start_s, 2) for o in outcomes if o.error][:200])


def print_chaos(r: dict, args: argparse.Namespace) -> None:
    load = r["load"]
    print(f"machine: {machine()}")
    print(f"2P2D stories260K, {args.clients} clients for {r['load_s']:.0f} s, a node SIGKILLed and restarted every "
          f"{args.every:g} s: {len(r['faults'])} faults {r['faults_by_node']}")
    print(f"before any fault: {r['prefault_mismatches']} of the reference requests wrong {r['prefault_errors']}")
    print(f"requests: {load['requests']}, succeeded {load['succeeded']} ({100 * load['success_rate']:.2f}%), "
          f"{load['tokens']} tokens; migrations (router log): {r['migrations']}")
    for error, n in load["failures"].items():
        print(f"  {n:6}  {error}")
    print("migrations by the failed node's role and cause:")
    for cause, n in list(r["migration_causes"].items())[:8]:
        print(f"  {n:6}  {cause}")
    for x in r["refused_after_back"]:
        print(f"  after fault {x['fault']}, {x['node_id']} was registered and serving, yet the router moved "
              f"{x['moves']} requests off it for 'Connection refused', the last {x['last_s_after_back']:.1f} s after")
    g = load["longest_gap_ms"]
    t = load["ttft_ms"]
    print(f"longest wait between two chunks per request, ms: p50 {fmt(g['p50'], 0)}, p99 {fmt(g['p99'], 0)}, "
          f"max {fmt(g['max'], 0)}; {load['gaps_over_1s']} requests waited over 1 s; TTFT p50 {fmt(t['p50'], 0)}, "
          f"p99 {fmt(t['p99'], 0)}, max {fmt(t['max'], 0)}")
    print(f"after the load: every node idle with all its blocks free: {took(r['settled_s'])}")
    for node, st in r["stats_after"].items():
        print(f"  {node:10} free {st['free_blocks']}/{st['total_blocks']} running {st['running']} "
              f"waiting {st['waiting']} reserved {st['reserved']} peers {st['peers']}")
    print("RSS, MiB (start -> end; a restarted node's end is its new process):")
    for name, start in r["rss_start"].items():
        end = r["rss_end"][name]
        print(f"  {name:10} {start['rss_kb'] / 1024:7.1f} -> {end['rss_kb'] / 1024:7.1f}"
              f"{'' if start['pid'] == end['pid'] else '  (restarted)'}")
    if r["faults"]:
        print("RSS at each fault (just before the kill), MiB:")
        for name in r["rss_start"]:
            print(f"  {name:10} " + " ".join(f"{f['rss_kb'][name] / 1024:.0f}" for f in r["faults"]))
    print(f"logs: {r['logs'] or 'no failed transfer, expired lease or traceback'}")


# -- entry point ------------------------------------------------------------------------------------------------

def run_cluster(spec: ClusterSpec, body) -> dict:
    """Runs `body(cluster)` (a coroutine function) on a fresh cluster and stops everything, whatever happens."""
    cluster = LocalCluster(spec)
    try:
        with cluster:
            print(f"cluster {cluster.cluster} up at {cluster.address}, logs in {cluster.log_dir}", flush=True)
            return asyncio.run(body(cluster))
    finally:
        left = leftovers(cluster.cluster)
        if left:
            print(f"killed leftover processes {left}", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="scenario", required=True)
    c = sub.add_parser("cancel", help="a storm of cancellations and deadlines, then the cancellation latency")
    c.add_argument("--requests", type=int, default=10_000)
    c.add_argument("--concurrency", type=int, default=48)
    c.add_argument("--probes", type=int, default=200, help="sequential requests whose cancellation is timed")
    k = sub.add_parser("chaos", help="nodes SIGKILLed and restarted under a checked closed-loop load")
    k.add_argument("--minutes", type=float, default=10.0)
    k.add_argument("--every", type=float, default=20.0, help="seconds between faults")
    k.add_argument("--clients", type=int, default=16)
    k.add_argument("--templates", type=int, default=48, help="distinct requests, answered offline up front")
    for p in (c, k):
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    # A SIGTERM (a `timeout`, a CI job cancelled) unwinds like Ctrl-C, so that the cluster is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    log_dir = Path(tempfile.mkdtemp(prefix=f"baton-faults-{args.scenario}-"))
    if args.scenario == "cancel":
        result = run_cluster(ClusterSpec(prefill=1, decode=2, log_dir=str(log_dir)),
                                lambda cluster: cancel_run(cluster, args))
        print_cancel(result)
        write_json(args.json, args, result | dict(log_dir=str(log_dir)))
        return 0
    cases = templates(args.templates, random.Random(args.seed))
    result = run_cluster(ClusterSpec(prefill=2, decode=2, log_dir=str(log_dir)),
                            lambda cluster: chaos_run(cluster, cases, args))
    print_chaos(result, args)
    write_json(args.json, args, result | dict(log_dir=str(log_dir)))
    if not result["faults"]:
        print("no fault was injected: the run shows nothing", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
