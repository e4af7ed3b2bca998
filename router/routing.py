"""How the router chooses among the live nodes of a role (`--routing`), once `picker.Picker` has left out the
nodes it must not use (of another model, failed under the request, suspected).

least-loaded  the fewest requests (running + waiting as last reported, plus those this router sent since),
              then the most free blocks
round-robin   each node in turn, whatever its load
kv            where the prompt's prefix lives, against load (the default). Its cost model:
              - a prefill node: the prompt tokens it would compute before this request's first token, that is
                the tokens queued on it (as reported, plus those this router sent since) and this prompt's
                tokens it does not hold cached: the least wins. A token held is a token neither computed
                nor, when the decode node lacks it, read from the pool twice.
              - a decode or colocated node: a node's load (requests, as for least-loaded) costs every request
                on it, so the prefix only decides among the nodes whose load is within a bound of the least
                loaded one (`slack`: a quarter of it, at least 2 requests); among those, the one holding the
                most of the prompt wins (a decode node sends for nothing the blocks it holds; a colocated one
                computes nothing for them), then the least loaded.
              The index (kv_index.py) is built from the nodes' own events, so routers that see the same events
              and loads choose alike; ties go to the lowest node id.
"""

from __future__ import annotations

import abc
from collections import Counter
from collections.abc import Callable, Sequence

from baton.common.membership import NodeInfo

from .kv_index import KVIndex, PromptBlocks

POLICIES = ("kv", "least-loaded", "round-robin")


class Routing(abc.ABC):
    """`choose` is given the candidates (never empty), `load(node)`: requests on it (reported and in flight),
    and `queued(node)`: prompt tokens waiting on it (reported and in flight)."""

    name: str

    @abc.abstractmethod
    def choose(self, role: str, nodes: Sequence[NodeInfo], load: Callable[[NodeInfo], int],
               queued: Callable[[NodeInfo], int], prompt: PromptBlocks | None) -> NodeInfo: ...

    def held_tokens(self, node: NodeInfo, prompt: PromptBlocks | None) -> int:
        """The prompt tokens `node` holds cached, as far as this policy knows (only kv knows)."""
        return 0


class LeastLoaded(Routing):
    name = "least-loaded"

    def choose(self, role, nodes, load, queued, prompt):
        return min(nodes, key=lambda n: (load(n), -n.free_blocks, n.node_id))


class RoundRobin(Routing):
    name = "round-robin"

    def __init__(self) -> None:
        self._turns: Counter[str] = Counter()  # per role: requests sent so far

    def choose(self, role, nodes, load, queued, prompt):
        ordered = sorted(nodes, key=lambda n: n.node_id)
        turn = self._turns[role]
        self._turns[role] = turn + 1
        return ordered[turn % len(ordered)]


class KVAware(Routing):
    name = "kv"

    def __init__(self, index: KVIndex) -> None:
        self.index = index

    def held_tokens(self, node, prompt):
        return self.index.held_tokens(node.node_id, prompt) if prompt is not None else 0

    def choose(self, role, nodes, load, queued, prompt):
        if prompt is None:
            return min(nodes, key=lambda n: (load(n), -n.free_blocks, n.node_id))
        length = len(prompt.token_ids)
        if role == "prefill":
            return min(nodes, key=lambda n: (queued(n) + length - self.held_tokens(n, prompt), n.node_id))
        least = min(load(n) for n in nodes)
        bound = least + max(2, least // 4)
        within = [n for n in nodes if load(n) <= bound]
        return min(within, key=lambda n: (-self.held_tokens(n, prompt), load(n), -n.free_blocks, n.node_id))


def routing(policy: str, index: KVIndex | None) -> Routing:
    if policy == "kv":
        if index is None:
            raise ValueError("routing: kv needs the KV index")
        return KVAware(index)
    if policy == "least-loaded":
        return LeastLoaded()
    if policy == "round-robin":
        return RoundRobin()
    raise ValueError(f"routing: must be one of {', '.join(POLICIES)}, got {policy!r}")
