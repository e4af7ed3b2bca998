"""How the router chooses among the live nodes of a role (`--routing`), once `picker.Picker` has left out the
nodes it must not use (of another model, failed under the request, suspected).

least-loaded  the fewest requests (running + waiting as last reported, plus those this router sent since),
              then the most free blocks
round-robin   each node in turn, whatever its load
kv            where the prompt's prefix lives, against load (the default). Its cost model:
              - a prefill node: the prompt tokens it would compute before this request's first token, that is
                the tokens queued on it (as reported, plus those this router sent since) and this prompt's
                tokens it neither holds cached nor reads back from the decode node picked for the request
                (which it does when that node holds at least its `kv_pull_min_tokens` more than it), each
                token read back counted as PULL_COST of one computed: the least wins. A token held is a token
                neither computed nor, when the decode node lacks it, read from the pool twice.
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
# A prompt token read back from the decode node, against one computed. Measured on the 2-core VM for the 51M
# Llama: 6 KB of K/V a token at 1.4-3 GB/s over loopback (bench/README, kv_transfer.py) is 2-4 µs, against about
# 125 µs to compute it on two cores, a 30th to a 60th; a tenth leaves room for links slower against the compute
# than loopback is. Only its being between 0 and 1 decides: a node's own cache first, reading back before
# computing.
PULL_COST = 0.1


class Routing(abc.ABC):
    """`choose` is given the candidates (never empty), `load(node)`: requests on it (reported and in flight),
    and `queued(node)`: prompt tokens waiting on it (reported and in flight)."""

    name: str

    @abc.abstractmethod
    def choose(self, role: str, nodes: Sequence[NodeInfo], load: Callable[[NodeInfo], int],
               queued: Callable[[NodeInfo], int], prompt: PromptBlocks | None,
               decode: NodeInfo | None = None) -> NodeInfo:
        """`decode`: for a prefill node, the decode node already picked for the request."""

    def held_tokens(self, node: NodeInfo, prompt: PromptBlocks | None) -> int:
        """The prompt tokens `node` holds cached, as far as this policy knows (only kv knows)."""
        return 0

    def prompt_work(self, node: NodeInfo, prompt: PromptBlocks | None,
                    decode: NodeInfo | None = None) -> tuple[int, int]:
        """(tokens `node` would compute, tokens it would read back from `decode`) of `prompt`, as far as this
        policy knows: a prefill node reads back what the decode node holds beyond its own cache when that is
        at least its `kv_pull_min_tokens` (the node's own rule, prefill/pull.py)."""
        if prompt is None:
            return 0, 0
        length, own = len(prompt.token_ids), self.held_tokens(node, prompt)
        pulled = 0
        if decode is not None and node.kv_pull_min_tokens:
            theirs = min(self.held_tokens(decode, prompt), length - 1)  # the last token is always computed
            if theirs - own >= node.kv_pull_min_tokens:
                pulled = theirs - own
        return length - own - pulled, pulled


class LeastLoaded(Routing):
    name = "least-loaded"

    def choose(self, role, nodes, load, queued, prompt, decode=None):
        return min(nodes, key=lambda n: (load(n), -n.free_blocks, n.node_id))


class RoundRobin(Routing):
    name = "round-robin"

    def __init__(self) -> None:
        self._turns: Counter[str] = Counter()  # per role: requests sent so far

    def choose(self, role, nodes, load, queued, prompt, decode=None):
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

    def choose(self, role, nodes, load, queued, prompt, decode=None):
        if prompt is None:
            return min(nodes, key=lambda n: (load(n), -n.free_blocks, n.node_id))
        if role == "prefill":
            def cost(n: NodeInfo) -> tuple[float, str]:
                computed, pulled = self.prompt_work(n, prompt, decode)
                return queued(n) + computed + PULL_COST * pulled, n.node_id

            return min(nodes, key=cost)
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
