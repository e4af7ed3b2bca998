"""A placement resized to the planner's split (cluster/resize.py): roles change first, the least busy nodes
move or go, new nodes go where machines have room (free GPUs, `max_nodes`), and what comes out is a valid
placement."""

from __future__ import annotations

import pytest

from baton.cluster.placement import PlacementError, parse
from baton.cluster.resize import resize, room, template


def cpu(max_nodes: int = 6):
    return parse({"cluster": "c", "machines": [{"name": "m", "router": {"port": 50051}, "max_nodes": max_nodes,
                                                "nodes": [{"name": "p0", "role": "prefill", "threads": 2},
                                                          {"name": "p1", "role": "prefill", "threads": 2},
                                                          {"name": "d0", "role": "decode", "threads": 2},
                                                          {"name": "d1", "role": "decode", "threads": 2}]}]})


def roles(p) -> dict[str, str]:
    return {name: n.role for name, (_, n) in p.nodes().items()}


def model_nodes(p):
    return [n for _, n in p.nodes().values()]


def test_roles_change_first_the_least_busy_node_moving():
    p = cpu()
    out = resize(p, model_nodes(p), 3, 1, {"d0": 5, "d1": 1})
    assert roles(out) == {"p0": "prefill", "p1": "prefill", "d0": "decode", "d1": "prefill"}
    assert parse(out.to_dict()) == out  # still a valid placement


def test_the_least_busy_nodes_are_removed():
    p = cpu()
    out = resize(p, model_nodes(p), 1, 1, {"p0": 3, "p1": 0, "d0": 0, "d1": 2})
    assert roles(out) == {"p0": "prefill", "d1": "decode"}


def test_new_nodes_copy_the_usual_node_up_to_the_machines_room():
    p = cpu(max_nodes=6)
    assert room(p, model_nodes(p)) == 6 and room(cpu(max_nodes=0), model_nodes(p)) == 4  # cpu: as listed
    out = resize(p, model_nodes(p), 4, 3, {})  # wants 7, the machine holds 6: prefill first, then no room
    assert roles(out) == {"p0": "prefill", "p1": "prefill", "d0": "decode", "d1": "decode",
                          "prefill-0": "prefill", "prefill-1": "prefill"}
    assert out.nodes()["prefill-0"][1].threads == 2 and parse(out.to_dict()) == out
    # A re-role and an addition in one decision: 2P2D -> 1P4D.
    out = resize(p, model_nodes(p), 1, 4, {"p1": 1})
    assert roles(out) == {"p0": "decode", "p1": "prefill", "d0": "decode", "d1": "decode", "decode-0": "decode"}


def test_on_cuda_new_nodes_take_free_gpus_on_the_roomiest_machine():
    p = parse({"cluster": "c", "model": {"device": "cuda"}, "machines": [
        {"name": "a", "gpus": 4, "router": {"port": 50051},
         "nodes": [{"name": "prefill-0", "role": "prefill", "tp": 2, "gpus": [0, 1]},
                   {"name": "decode-0", "role": "decode", "tp": 2, "gpus": [2, 3]}]},
        {"name": "b", "gpus": 8, "max_nodes": 3, "nodes": [{"name": "decode-1", "role": "decode", "tp": 2,
                                                             "gpus": [0, 1]}]}]})
    nodes = model_nodes(p)
    assert template(nodes).tp == 2 and room(p, nodes) == 5  # b: 3 GPU pairs free, but max_nodes 3
    out = resize(p, nodes, 2, 4, {})
    added = {name: (m.name, n.gpus) for name, (m, n) in out.nodes().items() if name not in p.nodes()}
    assert added == {"prefill-1": ("b", (2, 3)), "decode-2": ("b", (4, 5))}
    assert parse(out.to_dict()) == out


def test_a_machine_listing_more_nodes_than_its_max_is_refused():
    with pytest.raises(PlacementError, match=r"machines\[0\] \(m\): max_nodes: 3, but the machine lists 4 nodes"):
        cpu(max_nodes=3)
