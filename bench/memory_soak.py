"""Memory soak: prompts of many lengths through a cluster, and every process's resident memory over time.

A prefill node once grew by gigabytes under prompts of many lengths. Here each scenario starts a cluster of the
random ~51M-parameter Llama of engine_throughput.py (context 4096 here, written once into
~/.cache/baton-bench/), with the router's OpenAI HTTP front on, and sends it `--requests` requests,
`--concurrency` at a time: random token-id prompts of a length drawn uniformly from `--min-len` to `--max-len`,
4 new tokens each, greedy, EOS ignored. They alternate between the fronts: baton.v1 gRPC (AsyncBatonClient) and
POST /v1/completions (token ids as the prompt; streamed or not, at random). A fraction `--cancel` is cancelled
by its client at a random moment: after 1-3 deltas (gRPC) or events (HTTP, the connection closed), or after a
random delay of up to 0.5 s.

    pd         1 prefill + 1 decode node
    colocated  1 colocated node
    tp2        1 prefill + 1 decode node, each of two tensor-parallel ranks (the second rank is a child process)

Requests go out in rounds of `--every`; after each round (and before the first) the VmRSS of every process is
read: the router, each node, and each node's descendants (a two-rank node's rank 1, a multiprocessing
resource tracker), labelled e.g. router, prefill-0, prefill-0/rank1.

    python bench/memory_soak.py [--scenario pd|colocated|tp2|all ...] [--requests 10000] [--concurrency 4]
        [--min-len 16] [--max-len 1500] [--cancel 0.2] [--every 500] [--warmup 1000] [--limit 5] [--seed 0]
        [--json PATH]

Prints, per scenario: the requests' outcomes by front (ok, cancelled, failed; every failure's message), a table of
RSS in MiB (one row per process, one column per sample, headed by the requests done), and per process the growth
from the first sample at or after `--warmup` requests to the last, PASS or FAIL against `--limit` percent. Exits
with status 1 if any process fails, or if any request failed other than by its client's cancellation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import aiohttp

from baton.bench.engine_throughput import MODEL, machine, write_checkpoint
from baton.bench.faults import rss_kb, run_cluster, write_json
from baton.cluster.etcd_server import free_port
from baton.cluster.launch import ClusterSpec, LocalCluster
from baton.engine.checkpoint import served_name
from baton.router.client import AsyncBatonClient, BatonError, Delta, Finished

SOAK_MODEL = MODEL | {"max_position_embeddings": 4096}  # room for the longest prompts and then some
CACHE = Path.home() / ".cache" / "baton-bench" / "llama51m-ctx4096"
MAX_TOKENS = 4
REQUEST_TIMEOUT_S = 300.0  # no request may hang the soak
CANCEL_DELAY_S = 0.5  # the longest random delay before a client cancels
SCENARIOS = ("pd", "colocated", "tp2")


# -- the model ----------------------------------------------------------------------------------------------------

def cached_model(folder: Path = CACHE) -> Path:
    """The checkpoint folder, written once (into a temporary folder renamed into place: no half-written one)."""
    if not (folder / "config.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        write_checkpoint(tmp, SOAK_MODEL)
        try:
            tmp.rename(folder)
        except OSError:  # another run wrote it meanwhile
            pass
    return folder


def spec_for(scenario: str, model: Path, log_dir: Path) -> ClusterSpec:
    common = dict(model=str(model), http_port=free_port(), log_dir=str(log_dir))
    if scenario == "pd":
        return ClusterSpec(prefill=1, decode=1, **common)
    if scenario == "colocated":
        return ClusterSpec(prefill=0, decode=0, colocated=1, **common)
    if scenario == "tp2":
        return ClusterSpec(prefill=1, decode=1, role_args={"prefill": ["--tp", "2"], "decode": ["--tp", "2"]},
                           **common)
    raise ValueError(f"unknown scenario {scenario!r}")


# -- processes and their memory -----------------------------------------------------------------------------------

@dataclass(slots=True, frozen=True)
class ProcRSS:
    pid: int
    rss_kb: int


@dataclass(slots=True)
class Sample:
    requests: int  # requests done when it was read
    seconds: float  # since the load began
    rss: dict[str, ProcRSS]  # by label


def proc_table() -> dict[int, tuple[int, int, bytes]]:
    """Every live process: pid -> (parent pid, start time in clock ticks, command line)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
        if fields[0] != "Z":
            table[int(entry.name)] = (int(fields[1]), int(fields[19]), cmdline)
    return table


def descendants(pid: int, table: dict[int, tuple[int, int, bytes]]) -> list[int]:
    """`pid`'s children, grandchildren, ..., each after its parent, siblings in order of start."""
    children = sorted((p for p, (ppid, _, _) in table.items() if ppid == pid), key=lambda p: table[p][1])
    return [q for c in children for q in (c, *descendants(c, table))]


def child_labels(pid: int, table: dict[int, tuple[int, int, bytes]]) -> dict[str, int]:
    """Labels of a process's descendants: rank1, rank2, ... (multiprocessing-spawned, in order of start),
    tracker (multiprocessing's resource tracker), else the program's name and pid."""
    labels, ranks = {}, 0
    for child in descendants(pid, table):
        cmdline = table[child][2]
        if b"resource_tracker" in cmdline:
            label = "tracker"
        elif b"spawn_main" in cmdline:
            ranks += 1
            label = f"rank{ranks}"
        else:
            program = cmdline.split(b"\0")[0].decode(errors="replace")
            label = f"{Path(program).name}-{child}"
        labels[label if label not in labels else f"{label}-{child}"] = child
    return labels


def cluster_processes(cluster: LocalCluster) -> dict[str, int]:
    """label -> pid for the router, every node and their descendants."""
    table = proc_table()
    found = {}
    for name, proc in {"router": cluster.router, **cluster.nodes}.items():
        found[name] = proc.pid
        found |= {f"{name}/{label}": pid for label, pid in child_labels(proc.pid, table).items()}
    return found


def sample(cluster: LocalCluster, requests: int, seconds: float) -> Sample:
    return Sample(requests, seconds, {label: ProcRSS(pid, rss_kb(pid))
                                      for label, pid in cluster_processes(cluster).items()})


# -- the load -----------------------------------------------------------------------------------------------------

@dataclass(slots=True, frozen=True)
class Request:
    prompt: list[int]
    front: str  # "grpc" or "http"
    cancel_after: int  # deltas (or events) before the client closes: 0 -> never
    cancel_delay: float | None  # seconds before the client cancels: None -> never
    stream: bool  # HTTP: streamed (cancelled ones always are)


def make_request(i: int, rng: random.Random, args: argparse.Namespace) -> Request:
    prompt = [rng.randrange(3, SOAK_MODEL["vocab_size"]) for _ in range(rng.randint(args.min_len, args.max_len))]
    after, delay = 0, None
    if rng.random() < args.cancel:
        if rng.random() < 0.5:
            after = rng.randint(1, 3)
        else:
            delay = rng.uniform(0.0, CANCEL_DELAY_S)
    cancelled = bool(after) or delay is not None
    return Request(prompt, "grpc" if i % 2 == 0 else "http", after, delay, cancelled or rng.random() < 0.5)


@dataclass(slots=True)
class Tally:
    """Outcomes by front: "grpc ok", "http cancelled", "grpc failed", ...; and each failure's message."""
    outcomes: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)

    def failed(self, front: str, message: str) -> None:
        self.outcomes[f"{front} failed"] += 1
        self.failures[f"{front}: {message[:300]}"] += 1


class Closed(Exception):
    """The client closed its stream on purpose (after `cancel_after` deltas or events)."""


async def via_grpc(client: AsyncBatonClient, req: Request) -> str:
    """"" when the request finished with MAX_TOKENS tokens; else what went wrong. Raises Closed."""
    tokens, deltas, finished = 0, 0, None
    async with contextlib.aclosing(client.generate(req.prompt, max_tokens=MAX_TOKENS, temperature=0,
                                                   ignore_eos=True, timeout=REQUEST_TIMEOUT_S)) as stream:
        async for item in stream:
            if isinstance(item, Delta):
                tokens, deltas = tokens + len(item.token_ids), deltas + 1
                if deltas == req.cancel_after:
                    raise Closed  # aclosing closes the stream: the gRPC call is cancelled
            elif isinstance(item, Finished):
                finished = item
    if finished is None or tokens != MAX_TOKENS:
        return f"{tokens} tokens, finish {finished.finish_reason if finished else 'missing'}"
    return ""


async def via_http(session: aiohttp.ClientSession, url: str, model: str, req: Request) -> str:
    """As via_grpc, through POST /v1/completions."""
    body = {"model": model, "prompt": req.prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": req.stream}
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    async with session.post(url, json=body) as response:
        if response.status != 200:
            return f"HTTP {response.status}: {(await response.text())[:200]}"
        if not req.stream:
            tokens = (await response.json())["usage"]["completion_tokens"]
            return "" if tokens == MAX_TOKENS else f"{tokens} tokens"
        return await read_events(response, req.cancel_after)


async def read_events(response: aiohttp.ClientResponse, cancel_after: int) -> str:
    """Reads a completion's server-sent events; closes the connection after `cancel_after` (raising Closed)."""
    events, tokens = 0, None
    async for line in response.content:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        event = json.loads(line[6:])
        if "error" in event:
            return f"error event: {event['error']}"
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        events += 1
        if events == cancel_after:
            response.close()  # the connection itself: the router sees its client gone
            raise Closed
    return "" if tokens == MAX_TOKENS else f"{tokens} tokens (usage)"


async def one(req: Request, client: AsyncBatonClient, session: aiohttp.ClientSession, url: str, model: str,
              tally: Tally) -> None:
    """Sends one request, cancels it as planned, and counts how it ended."""
    call = via_grpc(client, req) if req.front == "grpc" else via_http(session, url, model, req)
    task, ours = asyncio.ensure_future(call), False
    try:
        if req.cancel_delay is not None and not (await asyncio.wait({task}, timeout=req.cancel_delay))[0]:
            ours = task.cancel()
        error = await task
    except Closed:
        tally.outcomes[f"{req.front} cancelled"] += 1
        return
    except asyncio.CancelledError:
        if not ours:  # a cancel of the whole run
            raise
        tally.outcomes[f"{req.front} cancelled"] += 1
        return
    except BatonError as e:  # not of the client's choosing: a failure of the cluster
        tally.failed(req.front, f"{e.code.name}: {e.details}")
        return
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as e:
        tally.failed(req.front, f"{type(e).__name__}: {e}")
        return
    if error:
        tally.failed(req.front, error)
    else:
        tally.outcomes[f"{req.front} ok"] += 1


async def wait_http(session: aiohttp.ClientSession, base: str, model: str, bound: float = 120.0) -> None:
    """Until the HTTP front lists the model (the router loads it as it starts)."""
    deadline = time.monotonic() + bound
    while True:
        with contextlib.suppress(aiohttp.ClientError, ValueError):
            async with session.get(f"{base}/v1/models") as response:
                if response.status == 200 and model in [m["id"] for m in (await response.json())["data"]]:
                    return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base}/v1/models does not list {model!r} after {bound:.0f} s")
        await asyncio.sleep(0.2)  # polling a server that is starting, which signals nothing


# -- a scenario ---------------------------------------------------------------------------------------------------

@dataclass(slots=True)
class Verdict:
    process: str
    base_requests: int  # the sample growth is measured from
    base_mib: float
    last_mib: float
    growth_pct: float
    passed: bool
    note: str = ""  # e.g. the process was replaced, or missing from a sample


@dataclass(slots=True)
class ScenarioResult:
    scenario: str
    seconds: float  # of load
    outcomes: dict[str, int]
    failures: dict[str, int]
    samples: list[Sample]
    verdicts: list[Verdict]
    log_dir: str


async def soak(cluster: LocalCluster, model: str, args: argparse.Namespace, rng: random.Random) -> tuple:
    """Sends the requests in rounds of `--every` (`--concurrency` at a time), reading RSS before the first and
    after each: (tally, samples, seconds of load)."""
    base = f"http://{cluster.spec.host}:{cluster.spec.http_port}"
    tally, gate = Tally(), asyncio.Semaphore(args.concurrency)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with AsyncBatonClient(cluster.address) as client, aiohttp.ClientSession(timeout=timeout) as session:
        await wait_http(session, base, model)

        async def gated(i: int) -> None:
            async with gate:
                await one(make_request(i, rng, args), client, session, f"{base}/v1/completions", model, tally)

        start = time.perf_counter()
        samples = [sample(cluster, 0, 0.0)]
        for first in range(0, args.requests, args.every):
            last = min(first + args.every, args.requests)
            await asyncio.gather(*(gated(i) for i in range(first, last)))
            samples.append(sample(cluster, last, time.perf_counter() - start))
            progress(samples[-1], tally)
    return tally, samples, time.perf_counter() - start


def progress(s: Sample, tally: Tally) -> None:
    counts = Counter()
    for key, n in tally.outcomes.items():
        counts[key.split()[1]] += n
    rss = " ".join(f"{label} {p.rss_kb / 1024:.0f}" for label, p in s.rss.items())
    print(f"  {s.requests:6d} requests, {s.seconds:7.0f} s: ok {counts['ok']} cancelled {counts['cancelled']} "
          f"failed {counts['failed']}; RSS MiB: {rss}", flush=True)


def judge(samples: list[Sample], warmup: int, limit: float) -> list[Verdict]:
    """Per process: growth from the first sample at or after `warmup` requests to the last."""
    base = next((s for s in samples if s.requests >= warmup), samples[-1])
    last = samples[-1]
    verdicts = []
    for label in dict.fromkeys([*base.rss, *last.rss]):
        a, b = base.rss.get(label), last.rss.get(label)
        if a is None or b is None or not a.rss_kb or not b.rss_kb:
            verdicts.append(Verdict(label, base.requests, (a.rss_kb if a else 0) / 1024, (b.rss_kb if b else 0) / 1024,
                                    0.0, False, "missing from a sample (gone, or started late)"))
            continue
        growth = 100.0 * (b.rss_kb - a.rss_kb) / a.rss_kb
        note = "" if a.pid == b.pid else f"pid {a.pid} -> {b.pid}: the process was replaced"
        verdicts.append(Verdict(label, base.requests, a.rss_kb / 1024, b.rss_kb / 1024, growth,
                                growth <= limit and not note, note))
    return verdicts


def run_scenario(scenario: str, model: Path, args: argparse.Namespace) -> ScenarioResult:
    log_dir = Path(tempfile.mkdtemp(prefix=f"baton-memory-soak-{scenario}-"))
    spec = spec_for(scenario, model, log_dir)
    rng = random.Random(f"{args.seed}-{scenario}")
    print(f"\n== {scenario}: {args.requests} requests, {args.concurrency} at a time, prompts "
          f"{args.min_len}-{args.max_len} tokens, {args.cancel:.0%} cancelled", flush=True)
    tally, samples, seconds = run_cluster(spec, lambda cluster: soak(cluster, served_name(model), args, rng))
    return ScenarioResult(scenario, seconds, dict(sorted(tally.outcomes.items())), dict(tally.failures.most_common()),
                          samples, judge(samples, args.warmup, args.limit), str(log_dir))


# -- the report ---------------------------------------------------------------------------------------------------

def print_outcomes(r: ScenarioResult) -> None:
    print(f"{r.scenario}: {sum(r.outcomes.values())} requests in {r.seconds:.0f} s: "
          + ", ".join(f"{k} {n}" for k, n in r.outcomes.items()))
    if r.failures:
        print(f"!!! {r.scenario}: {sum(r.failures.values())} REQUESTS FAILED (not cancelled by their client):",
              file=sys.stderr)
        for message, n in r.failures.items():
            print(f"!!!   {n:6d}  {message}", file=sys.stderr)
        sys.stderr.flush()


def print_table(r: ScenarioResult) -> None:
    labels = list(dict.fromkeys(label for s in r.samples for label in s.rss))
    width = max(map(len, labels)) + 2
    print(f"RSS, MiB, by requests done (logs in {r.log_dir}):")
    print(" " * width + "".join(f"{s.requests:>7d}" for s in r.samples))
    for label in labels:
        cells = [s.rss.get(label) for s in r.samples]
        print(f"{label:<{width}}" + "".join(f"{c.rss_kb / 1024:7.0f}" if c and c.rss_kb else "      -" for c in cells))


def print_verdicts(r: ScenarioResult, limit: float) -> None:
    base = r.verdicts[0].base_requests if r.verdicts else 0
    print(f"growth from {base} requests to {r.samples[-1].requests} (limit {limit:g}%):")
    width = max(len(v.process) for v in r.verdicts) + 2
    for v in r.verdicts:
        print(f"  {v.process:<{width}}{v.base_mib:8.1f} -> {v.last_mib:8.1f} MiB  {v.growth_pct:+6.2f}%  "
              f"{'PASS' if v.passed else 'FAIL'}{'  ' + v.note if v.note else ''}")




# -- entry point --------------------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", action="append", choices=[*SCENARIOS, "all"],
                    help="repeatable; default all")
    ap.add_argument("--requests", type=int, default=10_000, help="per scenario")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=1500)
    ap.add_argument("--cancel", type=float, default=0.2, help="fraction cancelled by their client")
    ap.add_argument("--every", type=int, default=500, help="requests between two RSS samples")
    ap.add_argument("--warmup", type=int, default=1000, help="growth is measured from the sample at this count")
    ap.add_argument("--limit", type=float, default=5.0, help="allowed growth after the warm-up, percent")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    chosen = args.scenario or ["all"]
    args.scenario = list(SCENARIOS) if "all" in chosen else list(dict.fromkeys(chosen))
    if not 1 <= args.min_len <= args.max_len <= SOAK_MODEL["max_position_embeddings"] - MAX_TOKENS:
        ap.error("need 1 <= --min-len <= --max-len <= 4092")
    if args.requests < 1 or args.every < 1 or args.concurrency < 1 or not 0 <= args.cancel <= 1:
        ap.error("--requests, --every and --concurrency must be >= 1, --cancel within [0, 1]")
    if args.warmup >= args.requests:
        ap.error("--warmup must be below --requests (growth is measured after it)")
    return args


def main() -> int:
    args = parse_args()
    # A SIGTERM (a `timeout`, a CI job cancelled) unwinds like Ctrl-C, so that the cluster is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    model = cached_model()
    print(f"machine: {machine(f'{os.cpu_count()} cores shared out between the nodes')}")
    print(f"model: {model} (random Llama, ~51M parameters, context {SOAK_MODEL['max_position_embeddings']})")
    results = []
    for scenario in args.scenario:
        r = run_scenario(scenario, model, args)
        results.append(r)
        print_outcomes(r)
        print_table(r)
        print_verdicts(r, args.limit)
    write_json(args.json, args, dict(date=datetime.now().isoformat(timespec="seconds"), model=str(model),
                                     scenarios={r.scenario: asdict(r) for r in results}))
    grew = [r.scenario for r in results if not all(v.passed for v in r.verdicts)]
    broke = [r.scenario for r in results if r.failures]
    if grew:
        print(f"FAIL: memory grew past {args.limit:g}% (or a process was replaced) in {', '.join(grew)}",
              file=sys.stderr)
    if broke:
        print(f"FAIL: requests failed in {', '.join(broke)}", file=sys.stderr)
    return 1 if grew or broke else 0


if __name__ == "__main__":
    sys.exit(main())
