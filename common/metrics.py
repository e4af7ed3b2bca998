"""A node's Prometheus metrics, and the HTTP endpoint that serves them (`GET /metrics`).

Each node service owns one `NodeMetrics`: its own `CollectorRegistry` (never prometheus_client's global one),
the counters and histograms it updates as requests pass, and the figures read at scrape time from the state's
owner (`stats()`: the engine's blocks and queues, read on the engine thread; the decode node's reservations;
the KV bytes each service counts). Every metric carries the node's `node`, `role` and `model` labels; the
others are bounded: `status` (ok, or the gRPC status code's name, as the router's metrics say it: CANCELLED,
UNAVAILABLE, ...) and `direction` (sent, received).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, Info, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from baton.engine import FinishReason, RequestOutput
from baton.engine.engine import StepShape
from baton.v1 import node_pb2

log = logging.getLogger(__name__)

LABELS = ("node", "role", "model")
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = tuple(2.0**i for i in range(15))  # 1 .. 16384 tokens in a step's prefill
SEQUENCE_BUCKETS = tuple(2.0**i for i in range(10))  # 1 .. 512 sequences in a decode step
STATE_TIMEOUT_S = 5.0  # a scrape waits this long for the engine's figures (a step in progress), then goes without


class NodeMetrics:
    def __init__(self, node_id: str, role: str, model: str, tensor_parallel_size: int = 1,
                 rank_pids: Sequence[int] = ()) -> None:
        self.role = role
        self.rank_pids = tuple(rank_pids)  # ranks 1, 2, ...: processes of their own, their memory read at scrapes
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes and the rest, as Prometheus names them
        self.labels = dict(node=node_id, role=role, model=model)
        r, values = self.registry, self.labels

        def one(kind, name: str, doc: str, **kw):
            return kind(name, doc, LABELS, registry=r, **kw).labels(**values)

        self.requests = Counter("baton_requests", "Requests this node served, by how they ended: ok, or the gRPC "
                                "status code's name (CANCELLED, UNAVAILABLE, ...)", (*LABELS, "status"), registry=r)
        for status in ("ok", "CANCELLED"):
            self.requests.labels(**values, status=status)  # present at 0 from the start
        self.prompt_tokens = one(Counter, "baton_prompt_tokens", "Prompt tokens of the requests whose prompt this "
                                 "node computed")
        self.completion_tokens = one(Counter, "baton_completion_tokens", "Generated tokens this node sampled and "
                                     "streamed (a prefill node: each request's first)")
        self.ttft = one(Histogram, "baton_time_to_first_token_seconds", "From a request's arrival (Prefill or "
                        "Generate call) to its first token", buckets=SECONDS_BUCKETS)
        self.tpot = one(Histogram, "baton_time_per_output_token_seconds", "Time between a request's successive "
                        "tokens on this node, one observation per token after the first (on a decode node, the "
                        "first is timed from the sequence's adoption)", buckets=TOKEN_GAP_BUCKETS)
        self.prefill_batch = one(Histogram, "baton_prefill_batch_tokens", "Prompt tokens computed per engine step "
                                 "(steps that compute any)", buckets=TOKEN_BUCKETS)
        self.decode_batch = one(Histogram, "baton_decode_batch_sequences", "Sequences decoding one token per engine "
                                "step (steps that decode any)", buckets=SEQUENCE_BUCKETS)
        self.direction = "sent" if role == "prefill" else "received"
        self.kv_transfer = Histogram(
            "baton_kv_transfer_seconds", "KV transfers that completed, from their start (the decode node asked to "
            "receive) to their end (every layer in, the decode node answered); layers go out as they are computed, "
            "so this includes the prompt's compute", (*LABELS, "direction"), registry=r, buckets=TRANSFER_BUCKETS,
        ).labels(**values, direction=self.direction)
        one(Info, "baton_node", "The node's engine").info({"tensor_parallel_size": str(tensor_parallel_size)})

    # -- updates ------------------------------------------------------------------------------------

    def request(self, context: grpc.aio.ServicerContext, prompt_tokens: int = 0) -> RequestMetrics:
        """`with metrics.request(context, len(prompt)) as track:` around a request's call (see RequestMetrics)."""
        return RequestMetrics(self, context, prompt_tokens)

    def observe_step(self, shape: StepShape) -> None:
        """The engine's step observer (engine thread; prometheus_client's metrics take their own locks)."""
        if shape.prefill_tokens:
            self.prefill_batch.observe(shape.prefill_tokens)
        if shape.decode_seqs:
            self.decode_batch.observe(shape.decode_seqs)

    def transfer_done(self, started: float) -> None:
        """A KV transfer that began at `started` (time.monotonic) completed now."""
        self.kv_transfer.observe(time.monotonic() - started)

    # -- exposition ---------------------------------------------------------------------------------

    def exposition(self, stats: node_pb2.NodeStats | None, accept: str = "") -> tuple[bytes, str]:
        """(body, content type) for a scrape: the registry's metrics, and the figures `stats` holds (the text
        format, or OpenMetrics if `accept` asks for it). Without `stats` (the engine did not answer in time),
        those figures are left out rather than reported stale."""
        encoder, content_type = choose_encoder(accept)
        return encoder(_Scrape(self.registry, self._state(stats) if stats is not None else [])), content_type

    def _state(self, s: node_pb2.NodeStats) -> list[Metric]:
        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=LABELS)
            g.add_metric(list(self.labels.values()), value)
            return g

        out = [
            gauge("baton_sequences_running", "Sequences in the engine's running batch", s.running),
            gauge("baton_sequences_waiting", "Sequences queued in the engine, waiting for a batch slot or blocks",
                  s.waiting),
            gauge("baton_kv_blocks_capacity", "KV cache blocks in all", s.total_blocks),
            gauge("baton_kv_blocks_free", "KV cache blocks free", s.free_blocks),
            gauge("baton_kv_blocks_used", "KV cache blocks held (by sequences or reservations)",
                  s.total_blocks - s.free_blocks),
            gauge("baton_prefix_cache_blocks", "KV cache blocks named for their contents, held or not (those not "
                  "held count as free)", s.prefix_cache.cached_blocks),
            gauge("baton_prefix_cache_offloaded_blocks", "Blocks in the prefix cache's second tier "
                  "(--kv-offload-bytes)", s.prefix_cache.offloaded_blocks),
        ]
        for name, doc, value in (
                ("baton_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", s.prefix_cache.queries),
                ("baton_prefix_cache_hits", "Prompt tokens found in the prefix cache (not computed)",
                 s.prefix_cache.hits),
                ("baton_prefix_cache_evictions", "Cached KV blocks taken for other contents",
                 s.prefix_cache.evictions),
                ("baton_prefix_cache_offload_hits", "Prompt tokens whose K/V were copied back from the second tier "
                 "(counted in the hits too)", s.prefix_cache.offload_hits)):
            counter = CounterMetricFamily(name, doc, labels=LABELS)
            counter.add_metric(list(self.labels.values()), value)
            out.append(counter)
        if self.role != "prefill":
            out.append(gauge("baton_sequences_reserved", "Reservations whose sequence is not decoding yet (blocks "
                             "reserved, K/V landing or landed)", s.reserved))
        if self.rank_pids:
            ranks = GaugeMetricFamily("baton_rank_resident_memory_bytes", "Resident memory of the node's other "
                                      "tensor-parallel ranks, each a process of its own (rank 0 is the serving "
                                      "process: process_resident_memory_bytes)", labels=(*LABELS, "rank"))
            for rank, pid in enumerate(self.rank_pids, 1):
                if (rss := resident_bytes(pid)) is not None:
                    ranks.add_metric([*self.labels.values(), str(rank)], rss)
            out.append(ranks)
        sent = CounterMetricFamily("baton_kv_transfer_bytes", "KV cache bytes of the transfers that completed",
                                   labels=(*LABELS, "direction"))
        sent.add_metric([*self.labels.values(), self.direction],
                        s.kv_bytes_sent if self.role == "prefill" else s.kv_bytes_received)
        pulled = CounterMetricFamily("baton_kv_pull_bytes", "KV cache bytes of cached blocks read back instead of "
                                     "recomputed (the pull path: a decode node sends, a prefill node receives)",
                                     labels=(*LABELS, "direction"))
        pulled.add_metric([*self.labels.values(), "received" if self.role == "prefill" else "sent"],
                          s.kv_bytes_pulled)
        return out + [sent, pulled]


class _Scrape:
    """The registry's metrics followed by one scrape's figures: what an encoder collects from."""

    def __init__(self, registry: CollectorRegistry, extra: Iterable[Metric]) -> None:
        self.registry, self.extra = registry, extra

    def collect(self) -> Iterable[Metric]:
        yield from self.registry.collect()
        yield from self.extra


class RequestMetrics:
    """One request's passage through a node. Its status is counted once: when its work is done (`settle`, or
    its last output), so that a call cancelled after that still counts as served and the count is there before
    the caller sees the end; else when the call ends (or the work it left running, `defer_to`), as it ended:
    CANCELLED, the code it was aborted with, or UNKNOWN (an exception). `output` counts each output's tokens:
    the first token of a node that computed the prompt (time to first token, the prompt's tokens), then the
    time per token of each that follows."""

    __slots__ = ("_m", "_context", "_prompt_tokens", "_start", "_last", "_work", "status")

    def __init__(self, metrics: NodeMetrics, context: grpc.aio.ServicerContext, prompt_tokens: int) -> None:
        self._m, self._context, self._prompt_tokens = metrics, context, prompt_tokens
        self._start = time.monotonic()
        self._last: float | None = None  # when the previous token came; None: the first is yet to come
        self._work: asyncio.Future | None = None
        self.status: str | None = None

    def __enter__(self) -> RequestMetrics:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        status = _status(kind, self._context)
        if self._work is not None and not self._work.done():
            self._work.add_done_callback(lambda _: self.settle(status))
        else:
            self.settle(status)

    def defer_to(self, work: asyncio.Future) -> asyncio.Future:
        """`work` finishes the request and goes on if the call ends first: the status is then counted when
        `work` ends (what it settled, else how the call ended). Returns `work`."""
        self._work = work
        return work

    def adopted(self) -> None:
        """A decode node took over a sequence whose first token came from elsewhere: its next is timed from now."""
        self._last = time.monotonic()

    def output(self, out: RequestOutput) -> None:
        n, now = len(out.token_ids), time.monotonic()
        if n:
            m = self._m
            if self._last is None:
                m.ttft.observe(now - self._start)
                m.prompt_tokens.inc(self._prompt_tokens)
                for _ in range(n - 1):  # tokens that came with the first (outputs that queued up, coalesced)
                    m.tpot.observe(0.0)
            else:
                for _ in range(n):
                    m.tpot.observe((now - self._last) / n)
            m.completion_tokens.inc(n)
            self._last = now
        if out.finish_reason is not None:
            self.settle("CANCELLED" if out.finish_reason is FinishReason.ABORT else "ok")

    def settle(self, status: str) -> None:
        """Counts the request's outcome now, whatever happens to its call from here on; once per request."""
        if self.status is None:
            self.status = status
            self._m.requests.labels(**self._m.labels, status=status).inc()


def _status(kind: type[BaseException] | None, context: grpc.aio.ServicerContext) -> str:
    if kind is None:
        return "ok"
    if issubclass(kind, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED.name  # the caller went away (or cancelled the call)
    code = context.code() if issubclass(kind, grpc.aio.AbortError) else None
    return (code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN).name


# -- the endpoint ------------------------------------------------------------------------------------------

class MetricsServer:
    """`GET /metrics` over HTTP/1.1 on the node's event loop: `server = await MetricsServer.start(metrics,
    servicer.stats, host, port)`, `server.port`, `await server.close()`.

    On the loop rather than prometheus_client's own server thread: the figures read at scrape time belong to
    the engine thread (read through `AsyncEngine.call`, between steps) and to the event loop (the decode
    node's reservations), and neither may be read from a third thread without locks they do not have. One
    request per connection, which is all a Prometheus scrape sends."""

    def __init__(self, metrics: NodeMetrics, read_state: Callable[[], Awaitable[node_pb2.NodeStats]]) -> None:
        self.metrics = metrics
        self.read_state = read_state
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task] = set()

    @classmethod
    async def start(cls, metrics: NodeMetrics, read_state: Callable[[], Awaitable[node_pb2.NodeStats]],
                    host: str, port: int) -> MetricsServer:
        server = cls(metrics, read_state)
        server._server = await asyncio.start_server(server._serve, host.strip("[]") or None, port)
        server.port = server._server.sockets[0].getsockname()[1]
        return server

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._handlers):  # a scrape waiting for the engine would outlive it
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            async with asyncio.timeout(STATE_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")  # at most the reader's limit (64 KiB)
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = (lines[0].split(" ") + ["", "", ""])[:3]
            headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
            accept = next((v.strip() for k, v in headers.items() if k.strip().lower() == "accept"), "")
            if method not in ("GET", "HEAD"):
                status, body, content_type = "405 Method Not Allowed", b"GET /metrics\n", "text/plain"
            elif path.partition("?")[0] not in ("/metrics", "/"):
                status, body, content_type = "404 Not Found", b"GET /metrics\n", "text/plain"
            else:
                try:
                    stats = await asyncio.wait_for(self.read_state(), STATE_TIMEOUT_S)
                except TimeoutError:
                    log.warning("metrics: the engine did not answer within %.0f s; scraped without its figures",
                                STATE_TIMEOUT_S)
                    stats = None
                body, content_type = self.metrics.exposition(stats, accept)
                status = "200 OK"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + (body if method != "HEAD" else b""))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass  # a client that sent no request in time, or too much, or went away
        except asyncio.CancelledError:
            pass  # close(): ended here, as asyncio's stream callback would otherwise log the cancellation
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def resident_bytes(pid: int) -> int | None:
    """A process's resident memory from /proc (None if it is gone, or there is no /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return None
