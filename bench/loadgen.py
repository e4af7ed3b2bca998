"""The asyncio load driver of `baton bench`: sends requests to a router and times every token chunk.

Open loop: requests start on a schedule (Poisson arrivals at `rate`, or a fixed interval) whatever the
cluster's state, so a slow cluster builds a queue, as real traffic would. Closed loop: `concurrency`
clients each send their next request when the previous one ends, so load adapts to the cluster.

A run is bounded by `num_requests` and/or `duration_s` (whichever comes first: no new request starts after
either) and every request by `request_timeout_s` (the gRPC deadline), so it always ends by itself.
Warm-up requests run first, to completion, and are recorded with warmup=True; metrics leave them out.

Times are client-side, from time.perf_counter() in seconds relative to the start of the measured window.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tqdm import tqdm

from baton.bench.workload import Request
from baton.router.client import AsyncBatonClient, BatonError, Delta, Finished

MODES = ("open", "closed")
ARRIVALS = ("poisson", "fixed")
T = TypeVar("T")


@dataclass(slots=True)
class LoadSpec:
    """How to send: open loop at `rate` requests/s (inf: all at once) or closed loop with `concurrency`."""
    mode: str = "open"
    rate: float = 1.0
    arrival: str = "poisson"
    concurrency: int = 1
    num_requests: int | None = None
    duration_s: float | None = None
    warmup_requests: int = 0
    request_timeout_s: float = 120.0
    seed: int = 0  # the arrival process's; the requests themselves come from the workload's seed
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival: must be one of {', '.join(ARRIVALS)}, not {self.arrival!r}")
        if self.mode == "open" and not self.rate > 0:
            raise ValueError(f"rate: must be > 0, not {self.rate}")
        if self.mode == "closed" and self.concurrency < 1:
            raise ValueError(f"concurrency: must be >= 1, not {self.concurrency}")
        if self.mode == "open" and math.isinf(self.rate) and self.num_requests is None:
            raise ValueError("num_requests: an infinite rate (all at once) needs a request count")
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("num_requests: give num_requests or duration_s (or both)")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests: must be >= 1, not {self.num_requests}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration_s: must be > 0, not {self.duration_s}")
        if self.warmup_requests < 0:
            raise ValueError(f"warmup_requests: must be >= 0, not {self.warmup_requests}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s: must be > 0, not {self.request_timeout_s}")


@dataclass(slots=True)
class RequestRecord:
    """What one request did, as the client saw it. Times in ms except the *_s offsets (seconds from the
    start of the measured window). ttft/tpot/e2e are None for a failed request."""
    index: int
    workload: str
    warmup: bool
    scheduled_s: float  # when the schedule wanted it sent (closed loop: when its client was free)
    start_s: float  # when it was actually sent: later than scheduled_s when the driver itself lags
    prompt_tokens: int
    output_tokens: int = 0
    ttft_ms: float | None = None  # to the first Delta that carries tokens
    tpot_ms: float | None = None  # (e2e - ttft) / (output tokens - 1); None with fewer than 2 tokens
    e2e_ms: float | None = None
    chunk_s: list[float] = field(default_factory=list)  # arrival of each token-carrying chunk
    chunk_tokens: list[int] = field(default_factory=list)  # tokens in each of those chunks
    error: str | None = None  # the grpc.StatusCode name (or the exception's type) if it failed
    finish_reason: str = ""
    prefill_node: str = ""
    decode_node: str = ""
    repeat: int = 0  # which repeat of its sweep point (bench configs' `repeats`)

    @property
    def itl_ms(self) -> list[float]:
        """Gaps between consecutive token chunks. A chunk of k tokens counts once, as in vLLM's benchmark:
        it is what a streaming user waits, and the router sends one token per chunk in steady decoding."""
        return [(b - a) * 1e3 for a, b in zip(self.chunk_s, self.chunk_s[1:])]

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__slots__} | {"itl_ms": self.itl_ms}

    @classmethod
    def from_dict(cls, d: dict) -> RequestRecord:
        """A record read back from raw.json (what to_dict wrote; `itl_ms` is derived again)."""
        return cls(**{name: d[name] for name in cls.__slots__ if name in d})


async def send(client: AsyncBatonClient, req: Request, t0: float, scheduled_s: float, warmup: bool,
               timeout: float) -> RequestRecord:
    """Sends one request (greedy, EOS ignored, max_tokens = its drawn output length) and records it."""
    rec = RequestRecord(req.index, req.workload, warmup, scheduled_s, time.perf_counter() - t0, req.prompt_len)
    start = t0 + rec.start_s
    finished: Finished | None = None
    try:
        # The deadline bounds the call on the server too; the local timeout is a backstop against a
        # stream that never delivers its status (it should not happen; a hung bench would be worse).
        async with asyncio.timeout(timeout + 5.0):
            stream = client.generate(req.prompt, timeout=timeout, max_tokens=req.output_len, temperature=0.0,
                                     ignore_eos=True)
            async with contextlib.aclosing(stream):
                async for item in stream:
                    now = time.perf_counter()
                    if isinstance(item, Delta):
                        if item.token_ids:
                            rec.chunk_s.append(now - t0)
                            rec.chunk_tokens.append(len(item.token_ids))
                    else:
                        finished, end = item, now
    except BatonError as e:
        rec.error = e.code.name
    except TimeoutError:
        rec.error = "DEADLINE_EXCEEDED"
    except Exception as e:  # noqa: BLE001 -- a load generator reports failures, it does not stop on them
        rec.error = type(e).__name__
    rec.output_tokens = sum(rec.chunk_tokens)
    if finished is not None and rec.error is None:
        rec.finish_reason = finished.finish_reason
        rec.prefill_node, rec.decode_node = finished.prefill_node, finished.decode_node
        rec.prompt_tokens = finished.prompt_tokens or rec.prompt_tokens  # text prompts: the router's count
        rec.e2e_ms = (end - start) * 1e3
        if rec.chunk_s:
            rec.ttft_ms = (t0 + rec.chunk_s[0] - start) * 1e3
            if rec.output_tokens > 1:
                rec.tpot_ms = (rec.e2e_ms - rec.ttft_ms) / (rec.output_tokens - 1)
    return rec


def _arrivals(spec: LoadSpec) -> Iterator[float]:
    """Offsets (s) of open-loop arrivals: exponential gaps (a Poisson process) or a fixed interval
    (n / rate, not a running sum, so that float error never lets an extra request into a duration)."""
    rng = random.Random(spec.seed)
    t, n = 0.0, 0
    while True:
        yield t
        n += 1
        if math.isinf(spec.rate):
            continue
        t = t + rng.expovariate(spec.rate) if spec.arrival == "poisson" else n / spec.rate


@dataclass(slots=True)
class RunResult:
    records: list[RequestRecord]  # warm-up first, then the measured ones in start order
    wall_s: float  # the measured window: first send to last completion


async def _warmup(client: AsyncBatonClient, requests: Iterator[Request], spec: LoadSpec) -> list[RequestRecord]:
    """Warm-up requests, a few at a time (first gRPC channels, KV pair groups, allocator), to completion."""
    width = spec.concurrency if spec.mode == "closed" else 4
    t0 = time.perf_counter()
    reqs = [next(requests) for _ in range(spec.warmup_requests)]
    gate = asyncio.Semaphore(width)

    async def one(r: Request) -> RequestRecord:
        async with gate:
            return await send(client, r, t0, time.perf_counter() - t0, True, spec.request_timeout_s)

    return list(await asyncio.gather(*(one(r) for r in reqs)))


async def _open_loop(client: AsyncBatonClient, requests: Iterator[Request], spec: LoadSpec, t0: float,
                     done: Callable[[object], None]) -> list[RequestRecord]:
    tasks: list[asyncio.Task] = []
    for n, at in enumerate(_arrivals(spec)):
        if (spec.num_requests is not None and n >= spec.num_requests) or \
                (spec.duration_s is not None and at >= spec.duration_s):
            break
        req = next(requests)  # drawn before sleeping, so drawing never delays a send
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(send(client, req, t0, at, False, spec.request_timeout_s))
        task.add_done_callback(done)
        tasks.append(task)
    return list(await asyncio.gather(*tasks))


async def _closed_loop(client: AsyncBatonClient, requests: Iterator[Request], spec: LoadSpec, t0: float,
                       done: Callable[[object], None]) -> list[RequestRecord]:
    records: list[RequestRecord] = []

    async def worker() -> None:
        while True:
            now = time.perf_counter() - t0
            if (spec.num_requests is not None and len(records) >= spec.num_requests) or \
                    (spec.duration_s is not None and now >= spec.duration_s):
                return
            rec = RequestRecord(-1, "", False, now, now, 0)  # holds the slot, so the count is never passed
            records.append(rec)
            slot = len(records) - 1
            records[slot] = rec = await send(client, next(requests), t0, now, False, spec.request_timeout_s)
            done(rec)

    await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
    return records


async def run_load(address: str, requests: Iterator[Request], spec: LoadSpec) -> RunResult:
    """Runs warm-up then the measured window against the router at `address`."""
    async with AsyncBatonClient(address) as client:
        warm = await _warmup(client, requests, spec)
        total = spec.num_requests
        if total is None and spec.mode == "open" and not math.isinf(spec.rate):
            total = round(spec.rate * spec.duration_s)  # the expected count: a guide for the bar only
        bar = tqdm(total=total, desc=f"{spec.mode} {spec.rate if spec.mode == 'open' else spec.concurrency}",
                   unit="req", file=sys.stderr, disable=not spec.progress, leave=False)

        def done(_: object) -> None:
            bar.update(1)

        t0 = time.perf_counter()
        try:
            loop = _open_loop if spec.mode == "open" else _closed_loop
            records = await loop(client, requests, spec, t0, done)
        finally:
            bar.close()
        wall = time.perf_counter() - t0  # every request has ended (or failed) by now
        return RunResult(warm + sorted(records, key=lambda r: r.start_s), wall)


async def calibrate(address: str, requests: Iterator[Request], n: int, timeout: float) -> list[RequestRecord]:
    """`n` requests sent one at a time, each after the last has ended: the cluster's unloaded latency, which
    relative SLOs are multiples of. Nothing else runs meanwhile, so no request waits for another."""
    records = []
    async with AsyncBatonClient(address) as client:
        t0 = time.perf_counter()
        for _ in range(n):
            now = time.perf_counter() - t0
            records.append(await send(client, next(requests), t0, now, False, timeout))
    return records


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Runs a coroutine under uvloop (a lighter event loop: the driver's own overhead stays out of the
    timings), or the stock loop where uvloop is missing (it measures the same things, a little slower)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def run(address: str, requests: Iterator[Request], spec: LoadSpec) -> RunResult:
    return run_async(run_load(address, requests, spec))
