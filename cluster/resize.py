"""A placement resized to a prefill/decode split: what `baton planner` writes when it decides on one.

The fewest changes that reach the split, in this order:
  re-role   nodes move from the role with too many to the role with too few (in place: no process started,
            no weights loaded; cluster/roles.py), those with the fewest requests running first;
  remove    a role still with too many loses its least busy nodes (`baton launch` drains them: their streams
            move, as on SIGTERM);
  add       a role still with too few gains nodes where machines have room: on cuda, free GPUs (a new node
            takes `tp` of them, lowest ids first); on either device, up to a machine's `max_nodes`. A new node
            copies the model's usual node (its most common tp and threads) and is named `<role>-<i>`.
Room is counted per machine and the machine with the most goes first, so new nodes spread out.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from baton.cluster.placement import MachineSpec, NodeSpec, Placement


def template(nodes: list[NodeSpec]) -> NodeSpec:
    """The node a new one copies: the most common (tp, threads) among the model's nodes (the first on a tie)."""
    (tp, threads), _ = Counter((n.tp, n.threads) for n in nodes).most_common(1)[0]  # ties: the first seen
    return NodeSpec(name="", role="", tp=tp, threads=threads)


def free_gpus(m: MachineSpec) -> list[int]:
    used = {g for n in m.nodes for g in n.gpus}
    return [g for g in m.gpus if g not in used]


def slots(p: Placement, m: MachineSpec, tp: int) -> int:
    """How many more nodes of degree `tp` machine `m` can run."""
    cap = m.max_nodes - len(m.nodes) if m.max_nodes else None
    if p.model.device == "cuda":
        fit = len(free_gpus(m)) // tp
        return max(0, min(fit, cap) if cap is not None else fit)
    return max(0, cap or 0)  # a CPU machine holds what it lists unless it says how many more


def room(p: Placement, nodes: list[NodeSpec]) -> int:
    """The most nodes the model can have: those it has, and as many again as the machines have room for."""
    tp = template(nodes).tp
    return len(nodes) + sum(slots(p, m, tp) for m in p.machines)


def resize(p: Placement, nodes: list[NodeSpec], prefill: int, decode: int, running: dict[str, int]) -> Placement:
    """`p` with `prefill` of the model's `nodes` prefill nodes and `decode` decode nodes, as near as the
    machines' room allows (module doc). `running`: requests each node runs now, by name."""
    want = {"prefill": prefill, "decode": decode}
    roles = {n.name: n.role for n in nodes}

    def idle_first(role: str) -> list[str]:
        return sorted((name for name, r in roles.items() if r == role), key=lambda name: (running.get(name, 0), name))

    def excess(role: str) -> int:
        return sum(r == role for r in roles.values()) - want[role]

    for src, dst in (("prefill", "decode"), ("decode", "prefill")):
        for name in idle_first(src)[:max(0, min(excess(src), -excess(dst)))]:
            roles[name] = dst
    removed = set()
    for role in want:
        removed |= set(idle_first(role)[:max(0, excess(role))])
    machines = [dataclasses.replace(m, nodes=tuple(dataclasses.replace(n, role=roles[n.name]) if n.name in roles
                                                   else n for n in m.nodes if n.name not in removed))
                for m in p.machines]
    model_nodes = [n for m in machines for n in m.nodes if n.name in roles]
    shape = template(nodes)
    taken = {n.name for m in p.machines for n in m.nodes}
    resized = dataclasses.replace(p, machines=tuple(machines))
    for role in want:
        for _ in range(max(0, -sum(n.role == role for n in model_nodes) + want[role])):
            i, m = max(enumerate(resized.machines), key=lambda im: (slots(resized, im[1], shape.tp), -im[0]))
            if slots(resized, m, shape.tp) < 1:
                return resized  # no machine has room for more: as near as it gets
            name = next(f"{role}-{k}" for k in range(len(taken) + 1) if f"{role}-{k}" not in taken)
            taken.add(name)
            gpus = tuple(free_gpus(m)[:shape.tp]) if p.model.device == "cuda" else ()
            node = dataclasses.replace(shape, name=name, role=role, gpus=gpus)
            model_nodes.append(node)
            resized = dataclasses.replace(resized, machines=resized.machines[:i] + (
                dataclasses.replace(m, nodes=m.nodes + (node,)),) + resized.machines[i + 1:])
    return resized
