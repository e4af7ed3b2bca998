"""`baton planner`: runs the SLO planner (cluster/planner.py) against a live cluster.

Every interval it scrapes each router's metrics (their addresses are in etcd): requests ended, prompt and
output tokens, and the TTFT and TPOT histograms, as differences from the previous scrape (a router that
restarted counts from zero again); and each prefill node's, for the prompt tokens its prefix cache held. The
planner gets those figures and the split the placement runs (its prefill and decode nodes), and when it
decides on another split, the placement is changed (cluster/resize.py):
nodes change role first, in place (`baton launch` starts nodes that follow the placement), those with the fewest
requests running (their membership records say) first; with `--max-nodes`, nodes are also added where machines
have room and removed (drained) when fewer hold the SLO. The placement is written only if nobody changed
it since it was read, with the decision's reason and inputs in its history (`baton place --history`).
`--dry-run` prints the decisions and changes nothing. A cluster without a placement (nodes that Kubernetes
starts) gets advice: the split is read from the nodes registered, and the decision is only logged and
published as `baton_planner_nodes{role}`, for an autoscaler (examples/kubernetes/components/autoscale). The
planner's own figures are Prometheus metrics (`--metrics-port`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import urllib.request
from dataclasses import dataclass, field

import aetcd
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from baton.cluster import placement_store
from baton.cluster.planner import Decision, Observation, Planner
from baton.cluster.resize import resize, room
from baton.common.membership import MembershipWatcher, close_quietly, etcd_client, read_routers

log = logging.getLogger("planner")

SCRAPE_TIMEOUT_S = 5.0
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # routers are dialled directly


@dataclass(slots=True)
class Scrape:
    """One router's cumulative figures for one model."""
    requests: float = 0.0
    prompt: float = 0.0
    output: float = 0.0
    ttft: dict[float, float] = field(default_factory=dict)  # bucket bound -> cumulative count
    tpot: dict[float, float] = field(default_factory=dict)

    def minus(self, old: Scrape | None) -> Scrape:
        """What happened since `old` (all of it if the router restarted meanwhile: a counter went down)."""
        if old is None or self.requests < old.requests:
            return self
        return Scrape(self.requests - old.requests, self.prompt - old.prompt, self.output - old.output,
                      {le: n - old.ttft.get(le, 0.0) for le, n in self.ttft.items()},
                      {le: n - old.tpot.get(le, 0.0) for le, n in self.tpot.items()})

    def add(self, other: Scrape) -> None:
        self.requests += other.requests
        self.prompt += other.prompt
        self.output += other.output
        for mine, theirs in ((self.ttft, other.ttft), (self.tpot, other.tpot)):
            for le, n in theirs.items():
                mine[le] = mine.get(le, 0.0) + n


_NAMES = {"baton_router_requests_total": "requests", "baton_router_prompt_tokens_total": "prompt",
          "baton_router_completion_tokens_total": "output"}
_HISTOGRAMS = {"baton_router_time_to_first_token_seconds_bucket": "ttft",
               "baton_router_time_per_output_token_seconds_bucket": "tpot"}


def parse(text: str, model: str = "") -> Scrape:
    """A router's figures for `model` ("": every model) from its Prometheus text."""
    scrape = Scrape()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if model and s.labels.get("model", model) != model:
                continue
            if s.name in _NAMES:
                setattr(scrape, _NAMES[s.name], getattr(scrape, _NAMES[s.name]) + s.value)
            elif s.name in _HISTOGRAMS:
                buckets = getattr(scrape, _HISTOGRAMS[s.name])
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
    return scrape


def prefix_hits(text: str) -> float:
    """A node's prompt tokens found in its prefix cache so far (`baton_prefix_cache_hits`), from its metrics."""
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "baton_prefix_cache_hits_total")


def median(buckets: dict[float, float]) -> float:
    """The median of a histogram's observations (cumulative counts by bound), interpolated in its bucket; nan
    when it holds none."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return math.nan
    lower, below = 0.0, 0.0
    for le in bounds:
        if buckets[le] >= total / 2:
            if math.isinf(le):
                return lower
            inside = buckets[le] - below
            return lower + (le - lower) * ((total / 2 - below) / inside if inside > 0 else 1.0)
        lower, below = le, buckets[le]
    return lower


def fetch(address: str) -> str | None:
    try:
        with _OPENER.open(f"http://{address}/metrics", timeout=SCRAPE_TIMEOUT_S) as reply:
            return reply.read().decode()
    except (OSError, ValueError):
        return None


def served_model(watcher: MembershipWatcher) -> str:
    """The model the cluster's nodes serve (a placement has one)."""
    return next((n.model for n in watcher.nodes()), "")


class PlannerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rate = Gauge("baton_planner_predicted_requests_per_second", "The request rate the planner sized for",
                          registry=r)
        self.tokens = Gauge("baton_planner_predicted_tokens", "Mean tokens per request the planner sized for",
                            ["kind"], registry=r)
        self.needed = Gauge("baton_planner_needed_nodes", "Nodes the prediction needs, by role (fractional)",
                            ["role"], registry=r)
        self.nodes = Gauge("baton_planner_nodes", "Nodes each role has after the decision (without a placement: "
                           "the advice, for an autoscaler)", ["role"], registry=r)
        self.correction = Gauge("baton_planner_correction", "Observed over the profile's prediction", ["metric"],
                                registry=r)
        self.decisions = Counter("baton_planner_decisions", "Decisions, by whether they changed the placement",
                                 ["applied"], registry=r)

    def record(self, d: Decision) -> None:
        self.rate.set(d.load.rate)
        self.tokens.labels("prompt").set(d.load.prompt)
        self.tokens.labels("output").set(d.load.output)
        for role, need, nodes in (("prefill", d.needs[0], d.prefill), ("decode", d.needs[1], d.decode)):
            self.needed.labels(role).set(need if math.isfinite(need) else -1)
            self.nodes.labels(role).set(nodes)
        self.correction.labels("ttft").set(d.correction[0])
        self.correction.labels("tpot").set(d.correction[1])
        self.decisions.labels(str(d.apply).lower()).inc()


@dataclass(slots=True)
class PlannerRun:
    etcd: str
    cluster: str
    planner: Planner
    interval: float = 30.0
    dry_run: bool = False
    scrapes: dict[str, Scrape] = field(default_factory=dict)
    hits: dict[str, float] = field(default_factory=dict)  # each prefill node's prefix-cache hits, last scraped
    metrics: PlannerMetrics = field(default_factory=PlannerMetrics)

    async def observe(self, model: str, seconds: float) -> Observation:
        client = etcd_client(self.etcd, 5.0)
        try:
            routers = await read_routers(client, self.cluster)
        finally:
            await close_quietly(client)
        total = Scrape()
        for router in routers:
            text = await asyncio.to_thread(fetch, router.metrics_address) if router.metrics_address else None
            if text is None:
                continue
            now = parse(text, model)
            total.add(now.minus(self.scrapes.get(router.router_id)))
            self.scrapes[router.router_id] = now
        return Observation(seconds, round(total.requests), round(total.prompt), round(total.output),
                           median(total.ttft), median(total.tpot))

    async def cached_since(self, watcher: MembershipWatcher) -> int:
        """Prompt tokens the prefill nodes found in their prefix caches since the last call (a node first seen
        counts from then; one whose counter went down restarted, and counts from zero)."""
        total = 0.0
        for node in watcher.nodes("prefill"):
            text = await asyncio.to_thread(fetch, node.metrics_address) if node.metrics_address else None
            if text is None:
                continue
            now, before = prefix_hits(text), self.hits.get(node.node_id)
            total += 0.0 if before is None else now - before if now >= before else now
            self.hits[node.node_id] = now
        return round(total)

    async def step(self, watcher: MembershipWatcher, seconds: float) -> Decision | None:
        placement = await placement_store.read(self.etcd, self.cluster)
        if placement is not None:
            nodes = [n for _, n in placement.nodes().values() if n.role in ("prefill", "decode")]
            current = (sum(n.role == "prefill" for n in nodes), sum(n.role == "decode" for n in nodes))
            what = "the placement"
        else:  # nodes something else starts (Kubernetes): the split is what has registered
            current = (len(watcher.nodes("prefill")), len(watcher.nodes("decode")))
            what = "the membership (no placement)"
        observed = await self.observe(served_model(watcher), seconds)
        if min(current) < 1:
            log.info("%s has %dP%dD: the planner splits prefill and decode nodes only", what, *current)
            return None
        # Prompt tokens waiting on the prefill nodes, as they last reported them, and those their caches held.
        observed = dataclasses.replace(observed, queued_tokens=sum(n.queued_tokens for n in watcher.nodes("prefill")),
                                       cached_tokens=await self.cached_since(watcher))
        room_left = room(placement, nodes) if placement is not None and self.planner.max_nodes else None
        decision = self.planner.decide(observed, current, room_left)
        self.metrics.record(decision)
        log.info("%s requests in %.0f s, ttft p50 %.3f s, tpot p50 %.4f s: %s (%s)", observed.requests, seconds,
                 observed.ttft_p50, observed.tpot_p50, decision.reason, decision.inputs())
        if decision.apply and placement is None:
            log.info("advice: %dP%dD (no placement to change: baton_planner_nodes says it, for whatever scales the "
                     "nodes, e.g. a HorizontalPodAutoscaler)", decision.prefill, decision.decode)
        elif decision.apply and not self.dry_run:
            running = {n.node_id: n.running for n in watcher.nodes()}
            changed = resize(placement, nodes, decision.prefill, decision.decode, running)
            try:
                record = await placement_store.place(self.etcd, changed, by="planner", reason=f"{decision.reason}; "
                                                     f"{decision.inputs()}", based_on=placement)
                log.info("placed (history #%d): %s", record.seq, "; ".join(record.changes))
            except placement_store.PlacementChanged as e:
                log.warning("%s: the decision is dropped; the next interval plans from the new one", e)
        return decision

    async def run(self, stop: asyncio.Event, metrics_port: int = 0) -> None:
        if metrics_port:
            start_http_server(metrics_port, registry=self.metrics.registry)
        watcher = await MembershipWatcher.start(self.etcd, self.cluster)
        try:
            loop = asyncio.get_running_loop()
            await self.observe(served_model(watcher), self.interval)  # the baselines
            await self.cached_since(watcher)
            last = loop.time()
            while True:
                try:
                    await asyncio.wait_for(stop.wait(), self.interval)
                    return
                except TimeoutError:
                    pass
                now = loop.time()
                try:
                    await self.step(watcher, now - last)
                except (OSError, aetcd.ClientError) as e:  # etcd unreachable for a moment: the next interval
                    log.warning("planning failed this interval: %s", e)
                last = now
        finally:
            await watcher.close()


def run_planner(etcd: str, cluster: str, planner: Planner, interval: float, dry_run: bool, metrics_port: int) -> int:
    """Process entry point: plans until SIGINT or SIGTERM."""
    import signal

    logging.basicConfig(level=logging.INFO, format="%(asctime)s planner %(levelname)s %(message)s")
    run = PlannerRun(etcd, cluster, planner, interval, dry_run)
    with asyncio.Runner() as runner:
        loop = runner.get_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"baton: planning cluster {cluster} every {interval:g} s{' (dry run)' if dry_run else ''}", flush=True)
        runner.run(run.run(stop, metrics_port))
    return 0
