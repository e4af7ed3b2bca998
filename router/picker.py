"""Chooses the node for each role among the live ones, from the load they report and what this router sent
them since, by the routing policy (routing.py: where the prompt's prefix lives, the least loaded, or in turn)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

from baton.common.membership import MembershipWatcher, NodeInfo

from .kv_index import PromptBlocks
from .routing import LeastLoaded, Routing


class NoNode(LookupError):
    """No live node of a needed role (UNAVAILABLE)."""


T = TypeVar("T")


class Picker:
    def __init__(self, membership: MembershipWatcher, suspect_seconds: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, routing: Routing | None = None) -> None:
        self.membership = membership
        self.routing = routing or LeastLoaded()
        # Requests this router sent that the node's last report may not show yet, and their prompt tokens still
        # to compute; a node's keys go when its counts are back to 0, so nodes that come and go leave nothing.
        self.in_flight: Counter[str] = Counter()
        self.in_flight_tokens: Counter[str] = Counter()
        # Nodes that just failed a request, until when: a dead node stays in the membership until its lease
        # runs out (the TTL), and every request sent to it meanwhile would fail once before moving on.
        self.suspects: dict[str, float] = {}
        self.suspect_seconds = suspect_seconds
        self._clock = clock

    def suspect(self, node_id: str) -> None:
        """`node_id` failed a request: pick others for a while, if there are others."""
        self.suspects[node_id] = self._clock() + self.suspect_seconds

    def acquire(self, node_id: str, tokens: int = 0) -> None:
        self.in_flight[node_id] += 1
        if tokens:
            self.in_flight_tokens[node_id] += tokens

    def release(self, node_id: str, tokens: int = 0) -> None:
        for counts, n in ((self.in_flight, 1), (self.in_flight_tokens, tokens)):
            left = counts[node_id] - n
            if left > 0:
                counts[node_id] = left
            else:
                counts.pop(node_id, None)

    def load(self, node: NodeInfo) -> int:
        """Requests on `node`: as it last reported, and those this router sent it since."""
        return node.running + node.waiting + self.in_flight[node.node_id]

    def queued(self, node: NodeInfo) -> int:
        """Prompt tokens waiting on `node`: as it last reported, and those this router sent it since."""
        return node.queued_tokens + self.in_flight_tokens[node.node_id]

    def pick(self, role: str, avoid: set[str] | frozenset[str] = frozenset(), model: str | None = None,
             prompt: PromptBlocks | None = None, decode: NodeInfo | None = None) -> NodeInfo:
        """The routing policy's choice of a live node of `role` (serving `model`, when given) for `prompt`,
        other than those in `avoid` (nodes that failed a request); for a prefill node, `decode` is the decode
        node picked for the request (what a prefill node can read back from it counts)."""
        nodes = [n for n in self.membership.nodes(role)
                 if n.node_id not in avoid and (model is None or n.model == model)]
        if not nodes:
            raise NoNode(f"no live {role} node" + (f" of model {model}" if model is not None else "")
                         + (f" (other than {', '.join(sorted(avoid))})" if avoid else ""))
        now = self._clock()
        for node_id in [n for n, until in self.suspects.items() if until <= now]:
            del self.suspects[node_id]  # bounded: an entry lives suspect_seconds
        trusted = [n for n in nodes if n.node_id not in self.suspects]
        nodes = trusted or nodes  # a suspect is still better than no node
        return self.routing.choose(role, nodes, self.load, self.queued, prompt, decode)

    async def when_live(self, choose: Callable[[], T], timeout: float) -> T:
        """`choose()` (a `pick` or `mode`) once it finds a node, trying again on every membership change for up
        to `timeout` seconds; NoNode after that. A role left without a node for a moment (etcd expiring every
        lease at once as it comes back from a stall, the nodes registering again a few ms later) costs the
        requests of that moment a wait, not a failure."""
        deadline = time.monotonic() + timeout
        while True:
            version = self.membership.version
            try:
                return choose()
            except NoNode:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
            try:
                await self.membership.wait_for(lambda: self.membership.version != version, left)
            except TimeoutError:
                return choose()

    def ready(self, model: str | None = None) -> bool:
        """Whether a request could be served now (a live node of every needed role): for `model`, or for any
        model when None."""
        models = [model] if model is not None else sorted({n.model for n in self.membership.nodes()})
        for name in models:
            try:
                self.mode(name)
                return True
            except NoNode:
                pass
        return False

    def mode(self, model: str | None = None) -> str:
        """'disaggregated' when prefill and decode nodes (of `model`, when given) are live, else 'colocated'
        (raises NoNode if neither)."""
        has = {role: any(model is None or n.model == model for n in self.membership.nodes(role))
               for role in ("prefill", "decode", "colocated")}
        if has["prefill"] and has["decode"]:
            return "disaggregated"
        if has["colocated"]:
            return "colocated"
        missing = "prefill" if has["decode"] else "decode" if has["prefill"] else "prefill, decode or colocated"
        raise NoNode(f"no live {missing} node" + (f" of model {model}" if model is not None else ""))
