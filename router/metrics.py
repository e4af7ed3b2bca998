"""The router's Prometheus metrics: requests by model, front and outcome; latencies as the client sees them;
tokens relayed; migrations; live nodes per role. One registry per router (no process-global state), served at
/metrics on the router's HTTP port.

Latencies are measured where the router relays: TTFT from the front's receipt to the first token relayed,
inter-token latency between relayed chunks (per token within a chunk), time per output token over a whole
request after its first token, end-to-end from receipt to the Finish.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.utils import floatToGoString

# Seconds: from a loaded CPU node (hundreds of ms) down to a GPU decode step (~10 ms) and below.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                    1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)


class _LiveNodes:
    """Live nodes per role, read from the membership when scraped (the membership owns that state)."""

    def __init__(self, nodes: Callable[[], list]) -> None:
        self._nodes = nodes

    def collect(self):
        family = GaugeMetricFamily("baton_router_live_nodes", "Live nodes in the membership, by role and model",
                                   labels=["role", "model"])
        counts: dict[tuple[str, str], int] = {}
        for node in self._nodes():
            key = (node.role, node.model)
            counts[key] = counts.get(key, 0) + 1
        for role in ("prefill", "decode", "colocated"):
            if not any(r == role for r, _ in counts):
                counts[(role, "")] = 0
        for (role, model), n in sorted(counts.items()):
            family.add_metric([role, model], n)
        yield family


class _IndexedBlocks:
    """Per node, the blocks the KV index knows it holds, read from the index when scraped (it owns them)."""

    def __init__(self, sizes: Callable[[], dict[str, int]]) -> None:
        self._sizes = sizes

    def collect(self):
        family = GaugeMetricFamily("baton_router_kv_index_blocks", "Blocks each node holds named, as this "
                                   "router's KV index knows them (nodes in sync only)", labels=["node"])
        for node_id, blocks in sorted(self._sizes().items()):
            family.add_metric([node_id], blocks)
        yield family


class _Series:
    """One label set's buckets (non-cumulative; the last is +Inf) and sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        """`times` observations of `value` (the buckets count values <= their bound)."""
        self.counts[bisect_left(self.bounds, value)] += times
        self.sum += value * times


class _Queues:
    """Per model, requests with the nodes and waiting in the router's queue, read when scraped (flow.py owns
    them)."""

    def __init__(self, queues: Callable[[], dict]) -> None:
        self._queues = queues

    def collect(self):
        waiting = GaugeMetricFamily("baton_router_queue_waiting", "Requests waiting for a place with the nodes",
                                    labels=["model"])
        placed = GaugeMetricFamily("baton_router_queue_placed", "Requests with the nodes (placed by the queue)",
                                   labels=["model"])
        for model, queue in sorted(self._queues().items()):
            waiting.add_metric([model], queue.waiting)
            placed.add_metric([model], queue.in_flight)
        yield waiting
        yield placed


class _KeyAddresses:
    """Per key, distinct client addresses this window and whether it is flagged, read when scraped (usage.py
    owns them)."""

    def __init__(self, usage) -> None:
        self._usage = usage

    def collect(self):
        addresses = GaugeMetricFamily("baton_router_key_client_addresses", "Distinct client addresses that used "
                                      "the key in the current window (usage.py)", labels=["key"])
        flagged = GaugeMetricFamily("baton_router_key_flagged", "1 for a key used from more client addresses in "
                                    "a window than --flag-addresses (resold or leaked)", labels=["key"])
        marked = self._usage.flagged()
        for name, n in sorted(self._usage.addresses().items()):
            addresses.add_metric([name], n)
            flagged.add_metric([name], 1 if name in marked else 0)
        yield addresses
        yield flagged


class _ChunkHistogram:
    """A histogram that takes k equal observations at the cost of one (a chunk of k tokens: k gaps, each 1/k of
    its wait), exposed as any Prometheus histogram. prometheus_client's takes two locks per value, and this
    runs for every token relayed; the router's metrics are read on its own event loop."""

    def __init__(self, name: str, documentation: str, labelnames: list[str], buckets: tuple[float, ...],
                 registry: CollectorRegistry) -> None:
        self._name, self._documentation, self._labelnames = name, documentation, labelnames
        self._bounds = list(buckets)
        self._series: dict[tuple[str, ...], _Series] = {}
        registry.register(self)

    def labels(self, *values: str) -> _Series:
        series = self._series.get(values)
        if series is None:
            series = self._series[values] = _Series(self._bounds)
        return series

    def collect(self):
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, series in sorted(self._series.items()):
            cumulative, buckets = 0, []
            for bound, count in zip([*self._bounds, math.inf], series.counts):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            family.add_metric(list(values), buckets, series.sum)
        yield family


class RouterMetrics:
    def __init__(self, nodes: Callable[[], list] = list, indexed: Callable[[], dict[str, int]] = dict) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes and the rest, as Prometheus names them
        r = self.registry
        self.requests = Counter("baton_router_requests", "Requests ended, by model, front and outcome (ok, or the "
                                "gRPC status name)", ["model", "front", "status"], registry=r)
        self.prompt_tokens = Counter("baton_router_prompt_tokens", "Prompt tokens of the requests served",
                                     ["model", "front"], registry=r)
        self.completion_tokens = Counter("baton_router_completion_tokens", "Generated tokens relayed to clients",
                                         ["model", "front"], registry=r)
        self.running = Gauge("baton_router_running_requests", "Requests being served now", ["model", "front"],
                             registry=r)
        self.ttft = Histogram("baton_router_time_to_first_token_seconds", "From receipt to the first token relayed",
                              ["model", "front"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = _ChunkHistogram("baton_router_inter_token_latency_seconds", "Between tokens relayed (a chunk "
                                   "of k tokens counts k, each 1/k of its gap)", ["model", "front"], _LATENCY_BUCKETS,
                                   r)
        self.tpot = Histogram("baton_router_time_per_output_token_seconds", "A request's time after its first "
                              "token over its other tokens", ["model", "front"], buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("baton_router_e2e_request_latency_seconds", "From receipt to the end of the request",
                             ["model", "front"], buckets=_E2E_BUCKETS, registry=r)
        self.migrations = Counter("baton_router_migrations", "Streams resumed on other nodes after a node failed "
                                  "(cause: failed), was given up for silence and fenced off (cause: silent) or "
                                  "left the membership while a prompt was computed (cause: left)",
                                  ["model", "cause"], registry=r)
        self.client_resumes = Counter("baton_router_client_resumes", "Streams a client resumed here after its "
                                      "router failed", ["model"], registry=r)
        self.prefill_decisions = Counter("baton_router_prefill_decisions", "Where disaggregated requests' prompts "
                                         "were computed: remote (a prefill node) or local (the decode node held "
                                         "the prefix and computed the short rest itself)", ["model", "where"],
                                         registry=r)
        self.kv_resyncs = Counter("baton_router_kv_index_resyncs", "Times a node's entry in the KV index was "
                                  "rebuilt from a snapshot after losing sync (cause: gap, broken, refused)",
                                  ["cause"], registry=r)
        self.key_refusals = Counter("baton_router_key_refusals", "Requests refused by their API key's limits, by "
                                    "key name and reason", ["key", "reason"], registry=r)
        self.busy = Counter("baton_router_busy", "Requests refused busy (RESOURCE_EXHAUSTED, not UNAVAILABLE), by "
                            "model and reason: queue_full, queue_timeout, shed", ["model", "reason"], registry=r)
        self.key_requests = Counter("baton_router_key_requests", "Requests of each API key, by outcome (ok, or the "
                                    "gRPC status name)", ["key", "status"], registry=r)
        self.key_tokens = Counter("baton_router_key_tokens", "Tokens of each API key's requests: prompt, and "
                                  "completion tokens relayed", ["key", "kind"], registry=r)
        self.stalled = Counter("baton_router_stalled_streams", "Streams cancelled because their client read nothing "
                               "for the stall timeout, by front", ["front"], registry=r)
        self.content_blocked = Counter("baton_router_content_blocked", "Prompts refused and streams ended by a "
                                       "content rule, by rule and target (prompt, output)", ["rule", "target"],
                                       registry=r)
        r.register(_LiveNodes(nodes))
        r.register(_IndexedBlocks(indexed))

    def watch_key_usage(self, usage) -> None:
        """Exposes the keys' address counts (usage.KeyUsage) when scraped."""
        self.registry.register(_KeyAddresses(usage))

    def watch_queues(self, queues: Callable[[], dict]) -> None:
        """Exposes the router's queues (flow.Flow.queues) when scraped."""
        self.registry.register(_Queues(queues))

    def key_refused(self, key, reason: str) -> None:
        """A request refused by its key's limits (`reason`: "limit", "limits_unavailable")."""
        self.key_refusals.labels(key.name, reason).inc()

    def request(self, model: str, front: str, start: float) -> RequestMetrics:
        return RequestMetrics(self, model, front, start)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestMetrics:
    """One request's figures, observed as its chunks are relayed and recorded once when it ends."""

    __slots__ = ("_m", "_model", "_front", "_start", "_first", "_last", "_tokens", "_itl", "_ended")

    def __init__(self, metrics: RouterMetrics, model: str, front: str, start: float) -> None:
        self._m, self._model, self._front, self._start = metrics, model, front, start
        self._first = self._last = 0.0
        self._tokens = 0
        self._itl = metrics.itl.labels(model, front)  # resolved once: observed on every chunk
        self._ended = False
        metrics.running.labels(model, front).inc()

    def tokens(self, n: int) -> None:
        now = time.perf_counter()
        if not self._tokens:
            self._first = now
            self._m.ttft.labels(self._model, self._front).observe(now - self._start)
        else:
            self._itl.observe((now - self._last) / n, n)
        self._last = now
        self._tokens += n

    def end(self, status: str, prompt_tokens: int = 0) -> None:
        if self._ended:
            return
        self._ended = True
        m, labels = self._m, (self._model, self._front)
        m.running.labels(*labels).dec()
        m.requests.labels(self._model, self._front, status).inc()
        if prompt_tokens:
            m.prompt_tokens.labels(*labels).inc(prompt_tokens)
        if self._tokens:
            m.completion_tokens.labels(*labels).inc(self._tokens)
        if self._tokens > 1:
            m.tpot.labels(*labels).observe((self._last - self._first) / (self._tokens - 1))
        m.e2e.labels(*labels).observe(time.perf_counter() - self._start)
