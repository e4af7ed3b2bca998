"""A discrete-event model of a Baton cluster (`baton simulate`): what TTFT, TPOT and goodput a placement gives
a workload trace, from a node profile (engine/profile.py), without running a model.

What it models, as Baton does it:
  router   admits a request when a decode (or colocated) node has room for it: a place among its
           max_num_seqs x slots_per_seq and KV blocks for prompt + output (reserved at admission, as the
           decode node's Reserve does); otherwise the request waits in the router's FIFO queue. It picks the
           least loaded such node, and the prefill node with the least work queued (tokens still to compute,
           less what its prefix cache holds of the prompt).
  prefill  a FIFO of prompts, computed in steps of up to `step_tokens` tokens (profile.prefill_batch_s); the
           first token is the step's end (TTFT). The K/V go to the decode node layer by layer during the
           step: they are there at max(step end, step start + bytes / bandwidth) + the transfer's latency.
           Each node keeps an LRU of the prefixes it computed (capacity: its KV blocks).
  decode   continuous batching: every step decodes one token of every running sequence
           (profile.decode_step_s over the batch and its total context); a sequence whose K/V arrived joins
           at the next step boundary. Between joins and ends the batch is fixed, so a run of steps is summed
           in closed form instead of stepped: events come per request, not per token.
  colocated  prefill steps of waiting prompts (which decode the running sequences too, one token each), then
           decode-only runs as above.

Not modelled: preemption (the admission check reserves every block a request can use), the network between
router and nodes, and the router's own CPU. Nodes of a role are identical (one profile).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from baton.cluster.planner import Decision, Observation, Planner
from baton.engine.profile import Profile


@dataclass(frozen=True, slots=True)
class Request:
    arrival: float  # seconds from the trace's start
    prompt: int  # tokens
    output: int  # tokens generated (max_tokens, EOS ignored)
    prefix: str = ""  # a shared prefix's name ("": none): requests naming it share its first prefix_len tokens
    prefix_len: int = 0


@dataclass(frozen=True, slots=True)
class SimConfig:
    prefill: int = 1
    decode: int = 1
    colocated: int = 0
    bandwidth: float = 1e9  # bytes per second of one KV transfer
    transfer_latency: float = 0.001  # seconds a transfer adds past its last byte (reservation, acknowledgement)
    step_tokens: int = 4096  # a prefill step's token budget
    # What the offline profile does not see, calibrated on a live cluster (bench/sim_accuracy.py): seconds from
    # admission to the prompt reaching its node (the router's work, the decode node's reservation, the RPCs),
    # and seconds each decode step adds to stream its tokens to the routers.
    dispatch_s: float = 0.0
    step_overhead_s: float = 0.0
    slots_per_seq: int = 2  # the router's places per max_num_seqs (router/flow.py)


@dataclass(slots=True)
class Outcome:
    request: Request
    admitted: float = math.nan
    first_token: float = math.nan
    end: float = math.nan
    prefill_node: int = -1
    decode_node: int = -1
    cached: int = 0  # prompt tokens the prefill node's cache held

    @property
    def ttft(self) -> float:
        return self.first_token - self.request.arrival

    @property
    def tpot(self) -> float:
        """Mean seconds per output token after the first (0 for a one-token answer)."""
        return (self.end - self.first_token) / (self.request.output - 1) if self.request.output > 1 else 0.0


class _Seq:
    __slots__ = ("outcome", "left", "context", "blocks")

    def __init__(self, outcome: Outcome, blocks: int) -> None:
        self.outcome = outcome
        self.left = outcome.request.output - 1  # the first token came with the prompt
        self.context = outcome.request.prompt + 1
        self.blocks = blocks


class _Decoder:
    """A decode or colocated node: the sequences it holds (running or waiting for their K/V or prompt)."""

    def __init__(self, index: int, profile: Profile, colocated: bool) -> None:
        self.index = index
        self.profile = profile
        self.colocated = colocated
        self.free_blocks = profile.num_kv_blocks
        self.held = 0  # requests admitted here and not ended
        self.running: list[_Seq] = []
        self.context = 0  # the running sequences' context tokens, summed (kept, not recounted: a hot path)
        self.joining: list[_Seq] = []  # K/V arrived: join at the next step boundary
        self.prompts: deque[_Seq] = deque()  # colocated: prompts to compute
        self.busy_until = 0.0  # the end of the step (or run of steps) under way
        self.draining = False  # leaving: the router sends it nothing new; it goes once it holds nothing
        self.started, self.ended = 0.0, math.nan
        self.run_start = 0.0
        self.run_steps = 0  # steps planned in the run under way (0: idle or a single step)
        self.version = 0  # invalidates the events of a run cut short


class _Prefiller:
    def __init__(self, index: int, profile: Profile) -> None:
        self.index = index
        self.queue: deque[tuple[_Seq, _Decoder]] = deque()
        self.queued_tokens = 0
        self.busy = False
        self.cache: OrderedDict[str, int] = OrderedDict()  # prefix -> tokens, least recently used first
        self.cache_tokens = 0
        self.capacity = profile.num_kv_blocks * profile.block_size
        self.draining = False
        self.started, self.ended = 0.0, math.nan

    def held(self, r: Request) -> int:
        return self.cache.get(r.prefix, 0) if r.prefix else 0

    def remember(self, r: Request) -> list[str]:
        """Caches the request's prefix; returns the prefixes evicted for it."""
        if not r.prefix or r.prefix_len <= 0:
            return []
        if r.prefix in self.cache:
            self.cache.move_to_end(r.prefix)
            return []
        self.cache[r.prefix] = r.prefix_len
        self.cache_tokens += r.prefix_len
        evicted = []
        while self.cache_tokens > self.capacity and self.cache:
            prefix, tokens = self.cache.popitem(last=False)
            self.cache_tokens -= tokens
            evicted.append(prefix)
        return evicted


class Simulation:
    def __init__(self, profile: Profile, config: SimConfig) -> None:
        if config.prefill + config.decode + config.colocated == 0 or bool(config.prefill) != bool(config.decode):
            raise ValueError("nodes: need prefill and decode nodes together, or colocated ones")
        self.profile, self.config = profile, config
        self.prefillers = [_Prefiller(i, profile) for i in range(config.prefill)]
        # Indexes for picking a prefill node in O(log n), not O(n) (a thousand nodes): a heap of (queued tokens,
        # index), an entry stale once its node's figure changed or it drains; and which nodes cache a prefix.
        self._least: list[tuple[int, int]] = [(0, p.index) for p in self.prefillers]
        self._holders: dict[str, set[int]] = {}
        self.decoders = [_Decoder(i, profile, False) for i in range(config.decode)] + \
            [_Decoder(config.decode + i, profile, True) for i in range(config.colocated)]
        self.places = profile.max_num_seqs * config.slots_per_seq
        self._emptiest: list[tuple[int, int, int]] = [(0, -d.free_blocks, d.index) for d in self.decoders]  # likewise
        self.now = 0.0
        self.events: list = []
        self._order = itertools.count()
        self.waiting: deque[Outcome] = deque()  # the router's queue
        self.outcomes: list[Outcome] = []
        # The planner, when one drives the run: what the routers would have measured in the interval.
        self.planner: Planner | None = None
        self.decisions: list[tuple[float, Decision]] = []
        self._seen = (0, 0, 0)  # requests, prompt tokens, output tokens arrived
        self._ttfts: list[float] = []
        self._tpots: list[float] = []
        self._cached = 0  # prompt tokens found in prefill nodes' caches

    # -- the event queue ---------------------------------------------------------------------------------------
    def _at(self, time: float, action: Callable[..., None], *args) -> None:
        heapq.heappush(self.events, (time, next(self._order), action, args))

    def run(self, requests: Iterable[Request], planner: Planner | None = None, interval: float = 60.0,
            start_s: float = 0.55) -> list[Outcome]:
        """Serves `requests`; with a `planner`, asks it every `interval` seconds for the prefill/decode split
        and applies it: a node added serves `start_s` after the decision (0.55 s: a role changed in place on
        the 2-core VM, bench/role_change.py; a new process takes its start and weight load), a node removed
        takes nothing new and goes once it holds nothing."""
        requests = sorted(requests, key=lambda r: r.arrival)
        last = requests[-1].arrival if requests else 0.0
        first = len(self.outcomes)
        self.outcomes += [Outcome(r) for r in requests]
        if requests:  # arrivals are queued one at a time (a day holds millions: the heap stays small)
            self._at(requests[0].arrival, self._arrive, first)
        if planner is not None:
            self.planner = planner
            for k in range(1, int(last // interval) + 1):
                self._at(k * interval, self._plan, interval, start_s)
        while self.events:
            self.now, _, action, args = heapq.heappop(self.events)
            action(*args)
        return self.outcomes

    # -- the planner -----------------------------------------------------------------------------------------
    def live(self) -> tuple[int, int]:
        return (sum(not p.draining for p in self.prefillers), sum(not d.draining for d in self.decoders))

    def node_seconds(self) -> float:
        end = self.now
        return sum((end if math.isnan(n.ended) else n.ended) - n.started for n in self.prefillers + self.decoders)

    def _plan(self, interval: float, start_s: float) -> None:
        (requests, prompt, output), ttfts, tpots, cached = self._seen, self._ttfts, self._tpots, self._cached
        self._seen, self._ttfts, self._tpots, self._cached = (0, 0, 0), [], [], 0
        queued = sum(p.queued_tokens for p in self.prefillers) + sum(o.request.prompt for o in self.waiting)
        observed = Observation(interval, requests, prompt, output, percentile(ttfts, 50), percentile(tpots, 50),
                               queued, cached)
        decision = self.planner.decide(observed, self.live())
        self.decisions.append((self.now, decision))
        if decision.apply:
            self.resize(decision.prefill, decision.decode, start_s)

    def resize(self, prefill: int, decode: int, start_s: float) -> None:
        """Brings the live (not draining) nodes of each role to the counts given."""
        have_p, have_d = self.live()
        for node in sorted((p for p in self.prefillers if not p.draining), key=lambda p: p.queued_tokens)[
                :max(0, have_p - prefill)]:
            node.draining = True
            if not node.busy and not node.queue:
                node.ended = self.now
        for node in sorted((d for d in self.decoders if not d.draining), key=lambda d: d.held)[
                :max(0, have_d - decode)]:
            node.draining = True
            if not node.held:
                node.ended = self.now
        for _ in range(prefill - have_p):
            node = _Prefiller(len(self.prefillers), self.profile)
            node.started, node.draining = self.now, True  # counted from now; serving from start_s on
            self.prefillers.append(node)
            self._at(self.now + start_s, self._serve, node)
        for _ in range(decode - have_d):
            node = _Decoder(len(self.decoders), self.profile, False)
            node.started, node.draining = self.now, True
            self.decoders.append(node)
            self._at(self.now + start_s, self._serve, node)

    def _serve(self, node: _Prefiller | _Decoder) -> None:
        node.draining = False
        if isinstance(node, _Prefiller):
            heapq.heappush(self._least, (node.queued_tokens, node.index))
        else:
            heapq.heappush(self._emptiest, (node.held, -node.free_blocks, node.index))
        self._admit()

    # -- the router ----------------------------------------------------------------------------------------------
    def _blocks(self, r: Request) -> int:
        return -(-(r.prompt + r.output) // self.profile.block_size)

    def _arrive(self, i: int) -> None:
        outcome = self.outcomes[i]
        if i + 1 < len(self.outcomes):
            self._at(self.outcomes[i + 1].request.arrival, self._arrive, i + 1)
        r = outcome.request
        self._seen = (self._seen[0] + 1, self._seen[1] + r.prompt, self._seen[2] + r.output)
        self.waiting.append(outcome)
        self._admit()

    def _admit(self) -> None:
        while self.waiting:
            outcome = self.waiting[0]
            need = self._blocks(outcome.request)
            node = self._decoder_for(need)
            if node is None:
                if need > self.profile.num_kv_blocks:  # could never fit: ends at once, unserved
                    self.waiting.popleft()
                    continue
                return
            self.waiting.popleft()
            node.held += 1
            node.free_blocks -= need
            heapq.heappush(self._emptiest, (node.held, -node.free_blocks, node.index))
            outcome.admitted, outcome.decode_node = self.now, node.index
            seq = _Seq(outcome, need)
            if self.config.dispatch_s:
                self._at(self.now + self.config.dispatch_s, self._dispatch, seq, node)
            else:
                self._dispatch(seq, node)

    def _decoder_for(self, need: int) -> _Decoder | None:
        """The least loaded node with a place and `need` free blocks: (held, -free blocks, index) least."""
        while self._emptiest:
            held, free, i = self._emptiest[0]
            node = self.decoders[i]
            if node.draining or (node.held, -node.free_blocks) != (held, free):
                heapq.heappop(self._emptiest)
                continue
            if held >= self.places:
                return None  # the least held has no place: nor has any other
            if node.free_blocks >= need:
                return node
            break  # short of blocks, where a busier node may have more: look at them all
        room = [d for d in self.decoders if not d.draining and d.held < self.places and d.free_blocks >= need]
        return min(room, key=lambda d: (d.held, -d.free_blocks, d.index)) if room else None

    def _dispatch(self, seq: _Seq, node: _Decoder) -> None:
        if node.colocated:
            node.prompts.append(seq)
            self._kick(node)
        else:
            self._to_prefill(seq, node)

    # -- prefill nodes ---------------------------------------------------------------------------------------
    def _to_prefill(self, seq: _Seq, decoder: _Decoder) -> None:
        r = seq.outcome.request

        node = self._prefiller_for(r)
        node.queue.append((seq, decoder))
        node.queued_tokens += r.prompt - node.held(r)
        heapq.heappush(self._least, (node.queued_tokens, node.index))
        seq.outcome.prefill_node = node.index
        if not node.busy:
            self._prefill_step(node)

    def _prefiller_for(self, r: Request) -> _Prefiller:
        """The node with the least work to do before `r` is computed (queued tokens, plus r's less what its cache
        holds; the lowest index on a tie): the least queued node's, or a node's that caches r's prefix."""
        def work(p: _Prefiller) -> tuple[int, int]:
            return p.queued_tokens + r.prompt - p.held(r), p.index

        holders = (self.prefillers[i] for i in self._holders.get(r.prefix, ())) if r.prefix else ()
        return min([self._least_queued(), *(p for p in holders if not p.draining)], key=work)

    def _least_queued(self) -> _Prefiller:
        while True:
            queued, i = self._least[0]
            node = self.prefillers[i]
            if not node.draining and node.queued_tokens == queued:
                return node
            heapq.heappop(self._least)

    def _prefill_step(self, node: _Prefiller) -> None:
        batch, tokens = [], 0
        while node.queue and (not batch or tokens + node.queue[0][0].outcome.request.prompt <= self.config.step_tokens):
            seq, decoder = node.queue.popleft()
            r = seq.outcome.request
            cached = min(node.held(r), r.prompt - 1)
            seq.outcome.cached = cached
            self._cached += cached
            node.queued_tokens -= r.prompt - node.held(r)
            tokens += r.prompt
            batch.append((seq, decoder, cached))
        if batch and not node.draining:
            heapq.heappush(self._least, (node.queued_tokens, node.index))
        if not batch:
            node.busy = False
            if node.draining:
                node.ended = self.now
            return
        node.busy = True
        seconds = self.profile.prefill_batch_s([(s.outcome.request.prompt - c, c) for s, _, c in batch])
        self._at(self.now + seconds, self._prefill_done, node, batch, self.now)

    def _prefill_done(self, node: _Prefiller, batch: list, started: float) -> None:
        for seq, decoder, cached in batch:
            r = seq.outcome.request
            if r.prefix and r.prefix_len > 0:
                self._holders.setdefault(r.prefix, set()).add(node.index)
            for prefix in node.remember(r):
                self._holders[prefix].discard(node.index)
            seq.outcome.first_token = self.now
            self._ttfts.append(self.now - r.arrival)
            moved = (r.prompt - cached) * self.profile.kv_bytes_per_token
            arrives = max(self.now, started + moved / self.config.bandwidth) + self.config.transfer_latency
            if seq.left <= 0:
                self._end(seq, decoder, self.now)
            else:
                self._at(arrives, self._kv_arrived, decoder, seq)
        self._prefill_step(node)

    # -- decode and colocated nodes --------------------------------------------------------------------------
    def _kv_arrived(self, node: _Decoder, seq: _Seq) -> None:
        node.joining.append(seq)
        self._kick(node)

    def _kick(self, node: _Decoder) -> None:
        """Something joined: an idle node starts a step at once; a node in a run of decode steps cuts it at
        the next step boundary (its end is computed now; the run's own end event goes stale)."""
        if self.now >= node.busy_until:
            self._step(node)
        elif node.run_steps:
            done = self._steps_by(node, self.now) + 1  # the step under way finishes first
            if done < node.run_steps:
                end = self._run_time(node, done)
                self._advance(node, done)
                node.run_steps = 0
                node.version += 1
                node.busy_until = node.run_start + end
                self._at(node.busy_until, self._step_if_current, node, node.version)

    def _step_if_current(self, node: _Decoder, version: int) -> None:
        if version == node.version:
            self._step(node)

    def _step(self, node: _Decoder) -> None:
        """Starts the node's next step, or run of steps, at `now`."""
        room = self.profile.max_num_seqs - len(node.running)  # the engine's batch bound; the rest wait
        if node.joining[:room]:
            node.running += node.joining[:room]
            node.context += sum(s.context for s in node.joining[:room])
            node.joining = node.joining[room:]
        node.version += 1
        if node.colocated and node.prompts:  # a prefill step, decoding the running sequences with it
            batch, tokens = [], 0
            while node.prompts and (not batch or tokens + node.prompts[0].outcome.request.prompt
                                    <= self.config.step_tokens):
                seq = node.prompts.popleft()
                tokens += seq.outcome.request.prompt
                batch.append(seq)
            d, e, f = self.profile.decode_fit
            decode = e * len(node.running) + f * node.context + self.config.step_overhead_s if node.running else 0.0
            seconds = self.profile.prefill_batch_s([(s.outcome.request.prompt, 0) for s in batch]) + decode
            node.run_start, node.run_steps, node.busy_until = self.now, 0, self.now + seconds
            self._at(node.busy_until, self._mixed_done, node, batch, node.version)
            return
        if not node.running:
            node.busy_until = self.now
            return
        steps = min(s.left for s in node.running)
        node.run_start, node.run_steps = self.now, steps
        node.busy_until = self.now + self._run_time(node, steps)
        self._at(node.busy_until, self._run_done, node, node.version)

    def _mixed_done(self, node: _Decoder, batch: list[_Seq], version: int) -> None:
        self._advance(node, 1, self.now)
        for seq in batch:
            seq.outcome.first_token = self.now
            self._ttfts.append(self.now - seq.outcome.request.arrival)
            seq.outcome.prefill_node = node.index
            if seq.left <= 0:
                self._end(seq, node, self.now)
            else:
                node.joining.append(seq)
        self._step(node)

    def _run_done(self, node: _Decoder, version: int) -> None:
        if version != node.version:
            return
        self._advance(node, node.run_steps)
        self._step(node)

    def _run_time(self, node: _Decoder, k: int) -> float:
        """Seconds of the node's next `k` decode steps from the run's start: the batch is fixed and each
        sequence's context grows by one a step, so sum over i < k of d + e*B + f*(S + B*i)."""
        d, e, f = self.profile.decode_fit
        b, s = len(node.running), node.context
        return k * (d + self.config.step_overhead_s + e * b) + f * (k * s + b * k * (k - 1) / 2)

    def _steps_by(self, node: _Decoder, time: float) -> int:
        """Steps of the run under way finished by `time`."""
        lo, hi = 0, node.run_steps
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if node.run_start + self._run_time(node, mid) <= time:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _advance(self, node: _Decoder, k: int, end: float | None = None) -> None:
        """The running sequences' `k` steps are done: ends those that finished (at their last step's end:
        `end`, or the run's k-th step's)."""
        end = end if end is not None else node.run_start + self._run_time(node, k)
        still, context = [], 0
        for seq in node.running:
            seq.left -= k
            seq.context += k
            if seq.left <= 0:
                self._end(seq, node, end)
            else:
                still.append(seq)
                context += seq.context
        node.running, node.context = still, context

    def _end(self, seq: _Seq, node: _Decoder, when: float) -> None:
        seq.outcome.end = when
        node.held -= 1
        node.free_blocks += seq.blocks
        if not node.draining:
            heapq.heappush(self._emptiest, (node.held, -node.free_blocks, node.index))
        if node.draining and not node.held:
            node.ended = when
        if self.planner is not None and seq.outcome.request.output > 1:
            self._tpots.append(seq.outcome.tpot)
        self._at(when, self._admit)


# -- summaries -------------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


@dataclass(frozen=True, slots=True)
class Summary:
    requests: int
    served: int
    duration: float  # first arrival to last end
    ttft_p50: float
    ttft_p99: float
    tpot_p50: float
    tpot_p99: float
    goodput: float  # requests per second that met both SLOs (all served ones when no SLO is given)
    attained: float  # the share of requests that met both SLOs
    output_tokens_per_s: float = 0.0
    slo: tuple[float, float] = field(default=(math.inf, math.inf))


def summarize(outcomes: list[Outcome], ttft_slo: float = math.inf, tpot_slo: float = math.inf) -> Summary:
    served = [o for o in outcomes if not math.isnan(o.end)]
    good = [o for o in served if o.ttft <= ttft_slo and o.tpot <= tpot_slo]
    start = min((o.request.arrival for o in outcomes), default=0.0)
    duration = max((o.end for o in served), default=start) - start
    return Summary(
        requests=len(outcomes), served=len(served), duration=duration,
        ttft_p50=percentile([o.ttft for o in served], 50), ttft_p99=percentile([o.ttft for o in served], 99),
        tpot_p50=percentile([o.tpot for o in served], 50), tpot_p99=percentile([o.tpot for o in served], 99),
        goodput=len(good) / duration if duration > 0 else 0.0, attained=len(good) / len(outcomes) if outcomes else 0.0,
        output_tokens_per_s=sum(o.request.output for o in served) / duration if duration > 0 else 0.0,
        slo=(ttft_slo, tpot_slo))


def simulate(profile: Profile, config: SimConfig, requests: Iterable[Request]) -> list[Outcome]:
    return Simulation(profile, config).run(requests)


def thin(requests: Iterable[Request], k: int, seed: int = 0) -> list[Request]:
    """A random 1/k of `requests`, each kept with probability 1/k (a Poisson arrival process stays Poisson, at
    1/k the rate). 1/k of the nodes serving it stand for the whole cluster when nodes are many and the router
    spreads the load: each node sees about the same stream either way (bench/planner_sim.py measures the
    difference). A day of a thousand nodes then runs in 1/k of the time and memory."""
    if k < 1:
        raise ValueError(f"thin: must be >= 1, got {k}")
    rng = random.Random(seed)
    return [r for r in requests if k == 1 or rng.random() * k < 1]


# -- files ------------------------------------------------------------------------------------------------------
def read_trace(path: str) -> list[Request]:
    """A workload trace: JSON lines of {"t": seconds, "prompt": tokens, "output": tokens[, "prefix": name,
    "prefix_len": tokens]}, in any order. A bad line raises ValueError naming its line number and field."""
    import json

    requests = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"workload: {where}: not JSON: {e}") from None
            if not isinstance(item, dict):
                raise ValueError(f"workload: {where}: must be a JSON object")
            t, prompt, output = item.get("t"), item.get("prompt"), item.get("output")
            if not isinstance(t, (int, float)) or isinstance(t, bool) or not t >= 0:
                raise ValueError(f"workload: {where}: t: must be seconds >= 0, got {t!r}")
            for name, value in (("prompt", prompt), ("output", output)):
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ValueError(f"workload: {where}: {name}: must be a whole number >= 1, got {value!r}")
            prefix, prefix_len = item.get("prefix", ""), item.get("prefix_len", 0)
            if not isinstance(prefix, str) or not isinstance(prefix_len, int) or not 0 <= prefix_len < prompt:
                raise ValueError(f"workload: {where}: prefix, prefix_len: a name and a length below prompt")
            requests.append(Request(float(t), prompt, output, prefix, prefix_len))
    requests.sort(key=lambda r: r.arrival)
    return requests


def write_trace(path: str, requests: Iterable[Request]) -> None:
    import json

    with open(path, "w") as f:
        for r in requests:
            item = {"t": r.arrival, "prompt": r.prompt, "output": r.output}
            if r.prefix:
                item |= {"prefix": r.prefix, "prefix_len": r.prefix_len}
            f.write(json.dumps(item) + "\n")
