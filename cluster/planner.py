"""The SLO planner's decisions: how many of a model's nodes should prefill and how many decode, for the load it
predicts, from a node profile (engine/profile.py). Pure: no I/O, no clock; `planner_run.py` feeds it what the
routers measured and applies what it decides, and the simulator (cluster/simulator.py) drives it the same way.

Each interval it is given what the routers saw (requests, prompt and output tokens, median TTFT and TPOT):
  predict   the next interval's request rate (a linear trend over the last three intervals, never below the
            last one's half) and mean lengths (the last interval's);
  size      prefill: a prompt's service time s (profile x correction, for its tokens past the mean found in the
            prefill nodes' prefix caches); an M/D/1 queue keeps TTFT = s (1 + rho /
            (2 (1 - rho))) within the SLO up to utilisation rho*, so the nodes needed are rate x s / rho*;
            decode: a step of B sequences takes d + B g (g: per-sequence cost at the mean context), and Little's
            law puts rate x output x step sequences in decode: TPOT holds with rate x output x g / (1 - d /
            TPOT) nodes (and enough KV blocks for them);
  correct   the profile's predictions are scaled by what was observed against what they predicted for the
            split that ran (exponentially averaged, clipped to [0.5, 2], and only in a steady state);
  split     the nodes it has go to prefill and decode in proportion to their needs, each need met first when
            the total allows; or, given `max_nodes`, each role gets its need plus `headroom` (up to that many
            and the `room` the machines have);
  damp      a new split is applied only when proposed `confirm` intervals running (the same way for each role;
            removing nodes, the most cautious of the proposals) and at least `cooldown` intervals after the last
            change (hysteresis), but a role that needs more nodes gets them at once (the other role's surplus,
            if any, waits as above); every decision carries its inputs and reason.
  backlog   prompt tokens left waiting (an unforeseen shift) add the prefill nodes that compute them within
            the TTFT SLO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from baton.engine.profile import Profile


@dataclass(frozen=True, slots=True)
class Slo:
    ttft: float  # seconds
    tpot: float  # seconds per output token

    @classmethod
    def parse(cls, text: str, complete: bool = True) -> Slo:
        """`ttft=MS,tpot=MS` (`itl=` for `tpot=`); with `complete` both are needed, else one left out is no
        bound (inf). ValueError naming `slo` otherwise."""
        bounds = {"ttft": math.inf, "tpot": math.inf}
        given = set()
        for part in filter(None, text.split(",")):
            name, _, ms = part.partition("=")
            name = {"itl": "tpot"}.get(name.strip(), name.strip())
            try:
                value = float(ms)
            except ValueError:
                value = -1.0
            if name not in bounds or not value > 0:
                raise ValueError(f"slo: must be ttft=MS,tpot=MS with MS > 0; got {part!r}")
            bounds[name] = value / 1e3
            given.add(name)
        if complete and given != set(bounds):
            raise ValueError("slo: give both ttft=MS and tpot=MS")
        return cls(**bounds)


@dataclass(frozen=True, slots=True)
class Observation:
    """One interval of the routers' figures."""
    seconds: float
    requests: int
    prompt_tokens: int
    output_tokens: int
    ttft_p50: float = math.nan  # seconds; nan: no request ended in the interval
    tpot_p50: float = math.nan
    queued_tokens: int = 0  # prompt tokens waiting to be computed at the interval's end (nodes' reports)
    cached_tokens: int = 0  # prompt tokens the prefill nodes found in their prefix caches (not computed)


@dataclass(frozen=True, slots=True)
class Load:
    rate: float  # requests per second
    prompt: float  # mean tokens
    output: float
    cached: float = 0.0  # mean prompt tokens found in a prefix cache (of `prompt`)


@dataclass(frozen=True, slots=True)
class Decision:
    prefill: int
    decode: int
    apply: bool  # a change to make now
    reason: str
    load: Load  # the prediction it sized for
    needs: tuple[float, float]  # prefill and decode nodes the prediction needs (fractional)
    correction: tuple[float, float]  # TTFT and TPOT: observed over the profile's prediction

    def inputs(self) -> str:
        cached = f" ({self.load.cached:.0f} cached)" if self.load.cached >= 0.5 else ""
        return (f"predicted {self.load.rate:.2f} req/s, prompt {self.load.prompt:.0f}{cached}, output "
                f"{self.load.output:.0f} tokens; needs {self.needs[0]:.2f}P {self.needs[1]:.2f}D; correction ttft "
                f"x{self.correction[0]:.2f} tpot x{self.correction[1]:.2f}")


@dataclass(slots=True)
class Planner:
    profile: Profile
    slo: Slo
    confirm: int = 2  # intervals a new split must be proposed in a row
    cooldown: int = 3  # intervals after a change before the next
    smoothing: float = 0.5  # weight of the newest correction
    max_nodes: int = 0  # > 0: the planner also adds and removes nodes, up to this many (0: it splits what runs)
    headroom: float = 0.2  # adding nodes: each role's need is met with this much to spare
    history: list[Load] = field(default_factory=list)
    correction: list[float] = field(default_factory=lambda: [1.0, 1.0])
    proposed: tuple[int, int] | None = None
    proposed_for: int = 0
    since_change: int = 1_000_000

    # -- the cost model --------------------------------------------------------------------------------------
    def prefill_service_s(self, load: Load) -> float:
        """A prompt's compute time: its tokens past what the prefix caches hold, after those (profile x
        correction)."""
        cached = min(round(load.cached), max(0, round(load.prompt) - 1))
        return self.profile.prefill_s(max(1, round(load.prompt) - cached), cached) * self.correction[0]

    def decode_costs(self, load: Load) -> tuple[float, float]:
        """(d, g): a decode step's fixed cost and its cost per sequence at the load's mean context."""
        d, e, f = self.profile.decode_fit
        context = load.prompt + load.output / 2
        return d * self.correction[1], (e + f * context) * self.correction[1]

    def predicted(self, load: Load, prefill: int, decode: int) -> tuple[float, float]:
        """TTFT and TPOT the model gives `load` on a split (inf where a role is overloaded)."""
        s = self.prefill_service_s(load)
        rho = load.rate * s / max(prefill, 1)
        ttft = s * (1 + rho / (2 * (1 - rho))) if rho < 1 else math.inf
        d, g = self.decode_costs(load)
        per_node = load.rate * load.output * g / max(decode, 1)
        tpot = d / (1 - per_node) if per_node < 1 else math.inf
        return ttft, tpot

    def needs(self, load: Load, backlog: int = 0) -> tuple[float, float]:
        """Nodes `load` needs; prefill also enough to compute a `backlog` of prompt tokens within the TTFT SLO
        (a shift the prediction did not see coming leaves one: it must go, not only stop growing)."""
        if load.rate <= 0:
            return 0.0, 0.0
        s = self.prefill_service_s(load)
        x = self.slo.ttft / s - 1
        prefill = load.rate * s / (2 * x / (1 + 2 * x)) if x > 0 else math.inf
        prefill += backlog * (s / max(load.prompt, 1)) / self.slo.ttft
        d, g = self.decode_costs(load)
        decode = load.rate * load.output * g / (1 - d / self.slo.tpot) if self.slo.tpot > d else math.inf
        # KV blocks: a request holds its prompt's and output's on its decode node from admission (the router
        # reserves them before the prompt is computed) to its end: at most its prefill plus its output at the
        # TPOT the sizing allows (Little's law).
        blocks = -(-int(load.prompt + load.output) // self.profile.block_size)
        per_node = max(1, min(self.profile.max_num_seqs, self.profile.num_kv_blocks // max(blocks, 1)))
        holding = load.rate * (s + load.output * self.slo.tpot)
        return prefill, max(decode, holding / per_node)

    # -- one interval --------------------------------------------------------------------------------------
    def observe(self, obs: Observation, current: tuple[int, int]) -> None:
        if obs.seconds <= 0:
            return
        n = max(obs.requests, 1)
        load = Load(obs.requests / obs.seconds, obs.prompt_tokens / n, obs.output_tokens / n,
                    min(obs.cached_tokens, obs.prompt_tokens) / n)
        # Only in a steady state: not right after a change, nor over a backlog (more prompt tokens waiting than
        # arrive in one TTFT SLO): what the interval saw then was queueing the model does not describe, not
        # the profile's error, and correcting the profile by it would feed the backlog back into the sizing.
        steady = self.since_change > 0 and obs.queued_tokens <= load.rate * load.prompt * self.slo.ttft
        if obs.requests and all(current) and steady:
            ttft, tpot = self.predicted(load, *current)
            for i, (seen, model) in enumerate(((obs.ttft_p50, ttft), (obs.tpot_p50, tpot))):
                if math.isfinite(seen) and math.isfinite(model) and model > 0:
                    ratio = min(2.0, max(0.5, seen / model * self.correction[i]))
                    self.correction[i] += self.smoothing * (ratio - self.correction[i])
        self.history = (self.history + [load])[-3:]

    def predict(self) -> Load:
        if not self.history:
            return Load(0.0, 0.0, 0.0)
        # The rate one interval on along its trend (never below half the last); lengths as the last interval's:
        # a trend in them overshot at a step change in the live bench (bench/README.md, planner_live.py).
        last = self.history[-1]
        rates = [h.rate for h in self.history]
        trend = (rates[-1] - rates[0]) / (len(rates) - 1) if len(rates) > 1 else 0.0
        return Load(max(last.rate + trend, last.rate / 2), last.prompt, last.output, last.cached)

    def decide(self, obs: Observation, current: tuple[int, int], room: int | None = None) -> Decision:
        """The split for the next interval, given the one that ran (`current`, prefill and decode nodes); with
        `max_nodes`, `room` caps the nodes too (what the machines can hold; None: no cap but `max_nodes`)."""
        self.observe(obs, current)
        self.since_change += 1
        load = self.predict()
        need_p, need_d = self.needs(load, obs.queued_tokens)
        target = self.target(current, need_p, need_d, room) if load.rate > 0 else current
        correction = (self.correction[0], self.correction[1])
        grow = (max(target[0], current[0]), max(target[1], current[1]))
        if self.max_nodes and grow != current and sum(grow) <= self._most(room):
            # Adding nodes cannot wait: the SLO is at stake now. Removing them (the other role's too, when the
            # target has fewer there) is damped, below, in a later interval.
            self.since_change, self.proposed, self.proposed_for = 0, None, 0
            return Decision(*grow, True, f"{current[0]}P{current[1]}D -> {grow[0]}P{grow[1]}D: more nodes "
                            "for the predicted load", load, (need_p, need_d), correction)
        if target == current:
            self.proposed, self.proposed_for = None, 0
            return Decision(*current, False, "the split that runs fits the prediction", load, (need_p, need_d),
                            correction)
        if self.proposed is None or _direction(current, target) != _direction(current, self.proposed):
            self.proposed, self.proposed_for = target, 0
        else:  # the same way again: the more cautious of the two (the most nodes of each role)
            target = self.proposed = (max(target[0], self.proposed[0]), max(target[1], self.proposed[1])) \
                if sum(target) < sum(current) else target
        self.proposed_for += 1
        why = f"{current[0]}P{current[1]}D -> {target[0]}P{target[1]}D"
        if self.proposed_for < self.confirm:
            return Decision(*current, False, f"{why} proposed ({self.proposed_for}/{self.confirm})", load,
                            (need_p, need_d), correction)
        if self.since_change < self.cooldown:
            return Decision(*current, False, f"{why} waits for the cool-down ({self.since_change}/{self.cooldown} "
                            "intervals since the last change)", load, (need_p, need_d), correction)
        self.since_change, self.proposed, self.proposed_for = 0, None, 0
        if sum(target) < sum(current):
            reason = "fewer nodes hold the SLO"
        else:
            reason = f"{'prefill' if target[0] > current[0] else 'decode'} needs more nodes for the SLO"
        return Decision(*target, True, f"{why}: {reason}", load, (need_p, need_d), correction)

    def target(self, current: tuple[int, int], need_p: float, need_d: float, room: int | None = None
               ) -> tuple[int, int]:
        if not self.max_nodes:
            return split(sum(current), need_p, need_d)
        most = self._most(room)
        if math.isinf(need_p) or math.isinf(need_d):
            return split(most, need_p, need_d)
        p = max(1, math.ceil(need_p * (1 + self.headroom) - 1e-9))
        d = max(1, math.ceil(need_d * (1 + self.headroom) - 1e-9))
        return (p, d) if p + d <= most else split(most, need_p, need_d)


    def _most(self, room: int | None) -> int:
        return max(2, min(self.max_nodes, room) if room is not None else self.max_nodes)


def split(total: int, need_p: float, need_d: float) -> tuple[int, int]:
    """`total` nodes (>= 2) into prefill and decode: each need met when the total allows, the spare shared in
    proportion to the needs; short of both, the smaller need met first; each role keeps at least one node."""
    if total < 2:
        raise ValueError(f"nodes: a disaggregated model needs at least 2, got {total}")
    if math.isinf(need_p) or math.isinf(need_d):
        p = total - 1 if math.isinf(need_p) and not math.isinf(need_d) else 1 if math.isinf(need_d) and \
            not math.isinf(need_p) else total // 2
        return p, total - p
    p_min, d_min = max(1, math.ceil(need_p - 1e-9)), max(1, math.ceil(need_d - 1e-9))
    if p_min + d_min <= total:
        spare = total - p_min - d_min
        extra = round(spare * need_p / (need_p + need_d)) if need_p + need_d > 0 else spare // 2
        return p_min + extra, total - p_min - extra
    # Short of both: the smaller need is met (up to half the nodes), the rest go to the larger. Starving the
    # small side instead (a proportional cut) would stall the large one behind it: a prefill surge with one
    # decode node left waits on that node's KV blocks.
    if d_min <= p_min:
        d = min(d_min, total // 2)
        return total - d, d
    p = min(p_min, total // 2)
    return p, total - p


def _direction(current: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """Which way each role moves: proposals that agree on it confirm each other."""
    return ((target[0] > current[0]) - (target[0] < current[0]), (target[1] > current[1]) - (target[1] < current[1]))
