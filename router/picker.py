"""Chooses the node for each role: the least loaded of the live nodes, from the load they report."""

from __future__ import annotations

from collections import Counter

from baton.cluster.membership import MembershipWatcher, NodeInfo


class NoNode(LookupError):
    """No live node of a needed role (UNAVAILABLE)."""


class Picker:
    def __init__(self, membership: MembershipWatcher) -> None:
        self.membership = membership
        # Requests this router sent that the node's last report may not show yet.
        self.in_flight: Counter[str] = Counter()

    def pick(self, role: str) -> NodeInfo:
        nodes = self.membership.nodes(role)
        if not nodes:
            raise NoNode(f"no live {role} node")
        return min(nodes, key=lambda n: (n.running + n.waiting + self.in_flight[n.node_id], -n.free_blocks,
                                         n.node_id))

    def mode(self) -> str:
        """'disaggregated' when prefill and decode nodes are live, else 'colocated' (raises NoNode if neither)."""
        has = {role: bool(self.membership.nodes(role)) for role in ("prefill", "decode", "colocated")}
        if has["prefill"] and has["decode"]:
            return "disaggregated"
        if has["colocated"]:
            return "colocated"
        missing = "prefill" if has["decode"] else "decode" if has["prefill"] else "prefill, decode or colocated"
        raise NoNode(f"no live {missing} node")
