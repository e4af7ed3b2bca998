"""Placement specs: every bad spec refused with its entry named, good ones round-tripped through JSON, the
launcher's reconcile as a pure function, and `baton place` / `--history` / `--remove` against a real etcd."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from baton.cluster import placement_store
from baton.cluster.cli import build_parser, main
from baton.cluster.etcd_server import EtcdServer
from baton.cluster.machine import MachineFiles, Plan, machine_processes, reconcile
from baton.cluster.placement import Placement, PlacementError, check_model, load, parse
from baton.cluster.placement_store import changes

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))

CPU = {
    "cluster": "c1",
    "machines": [
        {"name": "m1", "host": "127.0.0.1", "router": {"port": 50051},
         "nodes": [{"name": "n1", "role": "prefill"}, {"name": "n2", "role": "prefill"}]},
        {"name": "m2", "host": "127.0.0.1", "nodes": [{"name": "n3", "role": "decode"}]},
    ],
}
GPU = {
    "cluster": "g1",
    "model": {"path": "/nowhere/llama", "device": "cuda", "dtype": "bfloat16"},
    "machines": [
        {"name": "a", "gpus": 8, "router": {},
         "nodes": [{"name": "p0", "role": "prefill", "tp": 2, "gpus": [0, 1]},
                   {"name": "p1", "role": "prefill", "tp": 2, "gpus": [2, 3]},
                   {"name": "d0", "role": "decode", "tp": 4, "gpus": [4, 5, 6, 7]}]},
    ],
}


def edit(base: dict, change) -> dict:
    spec = copy.deepcopy(base)
    change(spec)
    return spec


def node(spec: dict, m: int, n: int) -> dict:
    return spec["machines"][m]["nodes"][n]


# (what is wrong, the spec, the whole message)
BAD = [
    ("unknown top-level field", edit(CPU, lambda s: s.update(clusters="x")), "unknown field 'clusters'"),
    ("unknown node field", edit(CPU, lambda s: node(s, 0, 1).update(gpu=1)),
     "machines[0].nodes[1] (n2): unknown field 'gpu'"),
    ("unknown model field", edit(CPU, lambda s: s.update(model={"paht": "x"})), "model: unknown field 'paht'"),
    ("unknown option", edit(CPU, lambda s: s.update(options={"max_seqs": 4})), "options: unknown field 'max_seqs'"),
    ("unknown router field", edit(CPU, lambda s: s["machines"][0]["router"].update(ports=1)),
     "machines[0] (m1).router: unknown field 'ports'"),
    ("no cluster", edit(CPU, lambda s: s.pop("cluster")), "cluster: is required"),
    ("no machines", edit(CPU, lambda s: s.pop("machines")), "machines: is required"),
    ("no role", edit(CPU, lambda s: node(s, 1, 0).pop("role")), "machines[1].nodes[0] (n3): role: is required"),
    ("no node name", edit(CPU, lambda s: node(s, 1, 0).pop("name")), "machines[1].nodes[0]: name: is required"),
    ("a machine twice", edit(CPU, lambda s: s["machines"][1].update(name="m1")),
     "machines[1] (m1): name: machine 'm1' is listed twice"),
    ("a node twice", edit(CPU, lambda s: node(s, 1, 0).update(name="n1")),
     "machines[1].nodes[0] (n1): name: node 'n1' is already on machine m1"),
    ("a gpu twice", edit(GPU, lambda s: node(s, 0, 2).update(gpus=[3, 4, 5, 6])),
     "machines[0].nodes[2] (d0): gpu 3 is already used by p1"),
    ("a gpu the machine lacks", edit(GPU, lambda s: node(s, 0, 2).update(gpus=[4, 5, 6, 8])),
     "machines[0].nodes[2] (d0): gpu 8: machine a has GPUs [0, 1, 2, 3, 4, 5, 6, 7]"),
    ("gpus listed by id", edit(GPU, lambda s: s["machines"][0].update(gpus=[4, 5, 6, 7])),
     "machines[0].nodes[0] (p0): gpu 0: machine a has GPUs [4, 5, 6, 7]"),
    ("gpus not tp", edit(GPU, lambda s: node(s, 0, 0).update(tp=4)),
     "machines[0].nodes[0] (p0): gpus: tp 4 needs 4 GPU id(s), one per rank; got 2: [0, 1]"),
    ("a gpu count on a node", edit(GPU, lambda s: node(s, 0, 0).update(gpus=2)),
     "machines[0].nodes[0] (p0): gpus: must be a list of GPU ids (integers >= 0), got 2"),
    ("gpus on a cpu node", edit(CPU, lambda s: node(s, 0, 0).update(gpus=[0])),
     "machines[0].nodes[0] (n1): gpus: model.device is cpu: nodes take no GPUs (tp is the number of CPU ranks)"),
    ("a gpu listed twice", edit(GPU, lambda s: node(s, 0, 0).update(gpus=[1, 1])),
     "machines[0].nodes[0] (p0): gpus: lists a GPU twice: [1, 1]"),
    ("bad role", edit(CPU, lambda s: node(s, 1, 0).update(role="decoder")),
     "machines[1].nodes[0] (n3): role: must be one of prefill, decode, colocated, got 'decoder'"),
    ("port out of range", edit(CPU, lambda s: node(s, 0, 0).update(port=70000)),
     "machines[0].nodes[0] (n1): port: must be an integer from 0 to 65535, got 70000"),
    ("router on port 0", edit(CPU, lambda s: s["machines"][0].update(router={"port": 0})),
     "machines[0] (m1).router: port: must be an integer from 1 to 65535, got 0"),
    ("a port twice", edit(CPU, lambda s: [node(s, 0, i).update(port=7000) for i in (0, 1)]),
     "machines[0].nodes[1] (n2): port 7000 is already used by n1 on machine m1"),
    ("the router's port", edit(CPU, lambda s: node(s, 0, 1).update(port=50051)),
     "machines[0].nodes[1] (n2): port 50051 is already used by the router on machine m1"),
    ("tp 0", edit(CPU, lambda s: node(s, 0, 0).update(tp=0)),
     "machines[0].nodes[0] (n1): tp: must be an integer >= 1, got 0"),
    ("tp true", edit(CPU, lambda s: node(s, 0, 0).update(tp=True)),
     "machines[0].nodes[0] (n1): tp: must be an integer >= 1, got True"),
    ("a name with a slash", edit(CPU, lambda s: node(s, 0, 0).update(name="a/b")),
     "machines[0].nodes[0]: name: 'a/b': use letters, digits, '_', '.' and '-' (63 at most, first a letter or "
     "digit)"),
    ("a number as a name", edit(CPU, lambda s: s["machines"][0].update(name=1)),
     "machines[0]: name: must be a string, got 1"),
    ("a node named router", edit(CPU, lambda s: node(s, 0, 0).update(name="router")),
     "machines[0].nodes[0] (router): name: 'router' is the machine's router process"),
    ("no router", edit(CPU, lambda s: s["machines"][0].pop("router")),
     "machines: no router: give one machine a `router:` entry"),
    ("prefill without decode", edit(CPU, lambda s: s["machines"].pop(1)),
     "machines: prefill nodes but no decode node: they serve requests together"),
    ("decode without prefill", edit(CPU, lambda s: s["machines"][0].update(nodes=[])),
     "machines: decode nodes but no prefill node: they serve requests together"),
    ("no node", edit(CPU, lambda s: [m.update(nodes=[]) for m in s["machines"]]),
     "machines: no node: a cluster needs a prefill and a decode node, or a colocated one"),
    ("a device", edit(CPU, lambda s: s.update(model={"device": "tpu"})),
     "model: device: must be one of cpu, cuda, got 'tpu'"),
    ("a dtype", edit(CPU, lambda s: s.update(model={"dtype": "fp8"})),
     "model: dtype: must be one of float32, bfloat16, float16, got 'fp8'"),
    ("a kv path", edit(CPU, lambda s: s.update(options={"kv_path": "nvlink"})),
     "options: kv_path: must be one of auto, pair, shared, got 'nvlink'"),
    ("a drain timeout", edit(CPU, lambda s: s.update(options={"drain_timeout": -1})),
     "options: drain_timeout: must be a number >= 0.0, got -1"),
    ("prefix caching", edit(CPU, lambda s: s.update(options={"enable_prefix_caching": "yes"})),
     "options: enable_prefix_caching: must be true or false, got 'yes'"),
    ("num_kv_blocks 0", edit(CPU, lambda s: s.update(options={"num_kv_blocks": 0})),
     "options: num_kv_blocks: must be an integer >= 1, got 0"),
    ("an etcd URL", edit(CPU, lambda s: s.update(etcd=["127.0.0.1"])),
     "etcd: must be http://host:port or a list of them, got ['127.0.0.1']"),
    ("a machine as a string", edit(CPU, lambda s: s["machines"].append("m3")),
     "machines[2]: must be a mapping, got 'm3'"),
    ("nodes as a mapping", edit(CPU, lambda s: s["machines"][1].update(nodes={"n3": "decode"})),
     "machines[1] (m2): nodes: must be a list, got {'n3': 'decode'}"),
    ("a spec that is a list", [CPU["cluster"]], "the spec must be a mapping, got ['c1']"),
]


@pytest.mark.parametrize("spec, message", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_spec_names_the_entry(spec, message):
    with pytest.raises(PlacementError) as e:
        parse(spec)
    assert str(e.value) == message


def test_degrees_the_model_cannot_take(stories_path):
    # stories260K: 8 query heads, 4 KV heads.
    spec = parse(edit(CPU, lambda s: (s.update(model={"path": str(stories_path)}), node(s, 0, 1).update(tp=3))))
    with pytest.raises(PlacementError) as e:
        check_model(spec)
    assert str(e.value) == "machines[0].nodes[1] (n2): tp: 3 does not divide the model's 8 query heads"
    assert check_model(parse(edit(CPU, lambda s: node(s, 1, 0).update(tp=4)))) == []  # the bundled model
    warnings = check_model(parse(GPU))  # a model that is not on this machine: said, not checked
    assert warnings == ["model.path: no checkpoint folder at /nowhere/llama: the nodes' tp degrees were not "
                        "checked against the model"]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_are_valid_and_round_trip_through_json(path):
    spec = load(path)
    assert Placement.from_json(spec.to_json()) == spec
    assert parse(yaml.safe_load(path.read_text())) == spec


def test_good_specs_round_trip_and_defaults_are_filled_in():
    spec = parse(GPU)
    assert Placement.from_json(spec.to_json()) == spec
    d = spec.to_dict()
    assert d["machines"][0]["gpus"] == list(range(8))  # a count becomes the ids
    assert d["machines"][0]["router"] == {"port": 50051, "host": "", "http_port": 0, "routing": "kv"}
    assert d["options"] == {"num_kv_blocks": None, "max_num_seqs": None, "kv_path": "auto", "drain_timeout": 30.0,
                            "enable_prefix_caching": True, "auth": False, "tls": False,
                            "mtls": False, "role_change": "in_place"}
    assert Placement.from_json(parse(CPU).to_json()) == parse(CPU)
    with pytest.raises(PlacementError, match="^not valid JSON"):
        Placement.from_json(b"{")


# -- reconcile -------------------------------------------------------------------------------------------
ETCD = "http://10.0.0.1:2379"


def plan(old: dict | None, new: dict | None, machine: str) -> Plan:
    running = machine_processes(parse(old), machine, ETCD) if old else {}
    wanted = machine_processes(parse(new), machine, ETCD) if new else {}
    return reconcile(running, wanted)


def test_reconcile_first_placement_starts_everything():
    assert plan(None, CPU, "m1") == Plan(start=("n1", "n2", "router"))
    assert plan(None, CPU, "m2") == Plan(start=("n3",))
    assert plan(None, CPU, "elsewhere") == Plan()
    assert plan(CPU, CPU, "m1") == Plan() and not plan(CPU, CPU, "m1")
    # The launcher passes only the processes still alive: placing again starts a node that died.
    wanted = machine_processes(parse(CPU), "m1", ETCD)
    assert reconcile({k: v for k, v in wanted.items() if k != "n1"}, wanted) == Plan(start=("n1",))


def test_reconcile_a_role_change_is_made_in_place_or_by_a_restart():
    new = edit(CPU, lambda s: node(s, 0, 1).update(role="decode"))
    assert plan(CPU, new, "m1") == Plan(rerole=("n2",))  # the node follows the placement itself
    assert plan(CPU, new, "m2") == Plan()
    restart = lambda spec: edit(spec, lambda s: s.update(options={"role_change": "restart"}))  # noqa: E731
    assert plan(restart(CPU), restart(new), "m1") == Plan(restart=("n2",))
    # A role change with another setting: a restart, which starts it in its new role.
    both = edit(new, lambda s: node(s, 0, 1).update(threads=1))
    assert plan(CPU, both, "m1") == Plan(restart=("n2",))
    assert machine_processes(parse(both), "m1", ETCD)["n2"].command()[-2:] == ("--role", "decode")


def test_reconcile_added_removed_and_moved_nodes():
    moved = edit(CPU, lambda s: s["machines"][1]["nodes"].append(s["machines"][0]["nodes"].pop(1)))
    assert plan(CPU, moved, "m1") == Plan(stop=("n2",))
    assert plan(CPU, moved, "m2") == Plan(start=("n2",))
    gone = edit(CPU, lambda s: s["machines"].pop(1) and s["machines"][0]["nodes"][1].update(role="decode"))
    assert plan(CPU, gone, "m2") == Plan(stop=("n3",))  # the machine left the placement: all of it stops


def test_reconcile_settings_in_the_command_line_restart():
    # An option every node shares restarts every node, not the router; a router port only the router.
    assert plan(CPU, edit(CPU, lambda s: s.update(options={"max_num_seqs": 8})), "m1") == Plan(restart=("n1", "n2"))
    assert plan(CPU, edit(CPU, lambda s: s["machines"][0].update(router={"port": 50052})), "m1") == \
        Plan(restart=("router",))
    # Two nodes swapping GPUs: both stop before either starts (stops come first in apply).
    swapped = edit(GPU, lambda s: (node(s, 0, 0).update(gpus=[2, 3]), node(s, 0, 1).update(gpus=[0, 1])))
    assert plan(GPU, swapped, "a") == Plan(restart=("p0", "p1"))


def test_machine_processes_command_lines():
    procs = machine_processes(parse(GPU), "a", ETCD)
    d0 = procs["d0"]
    assert d0.args[:8] == ("node", "--follow-placement", "--node-id", "d0", "--tp", "4", "--host", "0.0.0.0")
    assert d0.role == "decode" and d0.command()[-2:] == ("--role", "decode")  # the role it starts in
    assert dict(d0.env) == {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    args = build_parser().parse_args(d0.command())  # what the node process will read
    assert (args.etcd, args.cluster, args.model, args.follow_placement) == (ETCD, "g1", "/nowhere/llama", True)
    assert (args.device, args.dtype, args.drain_timeout, args.role) == ("cuda", "bfloat16", 30.0, "decode")
    assert d0.stop_timeout > 30.0  # SIGKILL only after the node's own drain and shutdown grace
    assert procs["router"].args == ("router", "--etcd", ETCD, "--cluster", "g1", "--model", "/nowhere/llama",
                                    "--host", "0.0.0.0", "--port", "50051", "--http-port", "0")
    assert "--no-enable-prefix-caching" not in d0.args  # on by default
    rr = machine_processes(parse(edit(GPU, lambda s: s["machines"][0]["router"].update(routing="round-robin"))), "a",
                           ETCD)["router"]
    assert build_parser().parse_args(rr.command()).routing == "round-robin"
    cpu = machine_processes(parse(CPU), "m1", ETCD)
    assert "--model" not in cpu["n1"].args and "CUDA_VISIBLE_DEVICES" not in dict(cpu["n1"].env)  # bundled model
    off = machine_processes(parse(edit(CPU, lambda s: s.update(options={"enable_prefix_caching": False}))), "m1", ETCD)
    assert "--no-enable-prefix-caching" in off["n1"].args
    # A closed cluster: every process gets the machine's secret file; the router checks keys if `auth` says so.
    closed = machine_processes(parse(edit(GPU, lambda s: s.update(options={"auth": True}))), "a", ETCD,
                               MachineFiles(secret="/etc/s"))
    for proc in closed.values():
        assert build_parser().parse_args(proc.command()).cluster_secret_file == "/etc/s"
    assert "--auth" in closed["router"].args and "--auth" not in closed["d0"].args
    assert "--auth" not in machine_processes(parse(GPU), "a", ETCD, MachineFiles(secret="/etc/s"))["router"].args
    assert "--cluster-secret-file" not in procs["router"].args  # an open cluster's


def test_machine_processes_tls_and_mutual_tls():
    """The placement says which secrets the cluster uses, each machine's launch where its copies are: the router
    gets its public certificate, every process the member ones; a machine without what the placement asks for
    is refused, naming the option and the flags; every command line parses with Baton's own parser."""
    files = MachineFiles(secret="/s", tls_cert="/t.pem", tls_key="/t.key", mtls_cert="/m.pem", mtls_key="/m.key",
                         mtls_ca="/ca.pem")
    closed = edit(GPU, lambda s: s.update(options={"auth": True, "tls": True, "mtls": True}))
    procs = machine_processes(parse(closed), "a", ETCD, files)
    parser = build_parser()
    for name, proc in procs.items():
        args = vars(parser.parse_args(proc.command()))
        assert (args["mtls_cert"], args["mtls_key"], args["mtls_ca"]) == ("/m.pem", "/m.key", "/ca.pem"), name
        assert args["cluster_secret_file"] == "/s"
        assert (args.get("tls_cert"), args.get("tls_key")) == (("/t.pem", "/t.key") if name == "router" else
                                                               (None, None)), name
    # Given files the placement does not ask for are not used (members must agree on mutual TLS).
    open_procs = machine_processes(parse(GPU), "a", ETCD, files)
    assert not any("--mtls-cert" in p.args or "--tls-cert" in p.args for p in open_procs.values())
    for option, field, flag in [("auth", "secret", "--cluster-secret-file"), ("tls", "tls_cert", "--tls-cert"),
                                ("mtls", "mtls_cert", "--mtls-cert")]:
        lacking = dataclasses.replace(files, **{field: ""})
        with pytest.raises(PlacementError, match=f"options.{option}: .*{flag}"):
            machine_processes(parse(closed), "a", ETCD, lacking)
    # A machine without a router needs no public certificate.
    no_router = edit(closed, lambda s: (s["machines"][0].pop("router"),
                                        s["machines"].append({"name": "r", "router": {}})))
    assert "router" not in machine_processes(parse(no_router), "a", ETCD, dataclasses.replace(files, tls_cert=""))


def test_changes_say_what_moved():
    new = edit(CPU, lambda s: (node(s, 0, 1).update(role="decode", port=7001), s["machines"][1]["nodes"].pop(),
                               s["machines"][1]["nodes"].append({"name": "n4", "role": "prefill", "tp": 2}),
                               s.update(options={"max_num_seqs": 8})))
    assert changes(parse(CPU), parse(new)) == [
        "n2: prefill -> decode", "n2: port 0 -> 7001", "added n4 (prefill on m2, tp 2)", "removed n3 (decode on m2)",
        "options.max_num_seqs None -> 8"]
    assert changes(None, parse(CPU))[-1] == "router on m1 (port 50051)"
    assert changes(parse(CPU), parse(CPU)) == ["no change"]
    assert changes(parse(CPU), None) == ["removed the placement (3 nodes)"]


# -- baton place against etcd ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def etcd():
    with EtcdServer() as server:
        yield server


def write(tmp_path: Path, spec: dict, name: str = "spec.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_place_then_history_then_remove(etcd, tmp_path, capsys):
    spec = edit(CPU, lambda s: s.update(cluster="hist"))
    assert main(["place", write(tmp_path, spec), "--etcd", etcd.url]) == 0
    assert "placed cluster hist (history #1)" in capsys.readouterr().out
    changed = edit(spec, lambda s: node(s, 0, 1).update(role="decode"))
    assert main(["place", write(tmp_path, changed), "--etcd", etcd.url]) == 0
    assert "n2: prefill -> decode" in capsys.readouterr().out
    stored = placement_store_read(etcd.url, "hist")
    assert stored == parse(changed)

    assert main(["place", "--history", "--cluster", "hist", "--etcd", etcd.url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[0] == "1" and out[0].split()[2:4] == ["place", "by"]
    assert out[1:5] == ["      added n1 (prefill on m1, tp 1)", "      added n2 (prefill on m1, tp 1)",
                        "      added n3 (decode on m2, tp 1)", "      router on m1 (port 50051)"]
    assert out[5].split()[0] == "2" and out[6:] == ["      n2: prefill -> decode"]
    assert out[0].split()[1].endswith("+00:00")  # UTC

    assert main(["place", "--remove", "--cluster", "hist", "--etcd", etcd.url]) == 0
    assert "removed the placement (3 nodes)" in capsys.readouterr().out
    assert placement_store_read(etcd.url, "hist") is None
    assert main(["place", "--remove", "--cluster", "hist", "--etcd", etcd.url]) == 0
    assert "nothing to remove" in capsys.readouterr().out
    records = placement_store_history(etcd.url, "hist")
    assert [(r.seq, r.action) for r in records] == [(1, "place"), (2, "place"), (3, "remove")]


def test_place_refuses_a_bad_spec_with_status_2(etcd, tmp_path, capsys):
    bad = edit(GPU, lambda s: node(s, 0, 2).update(gpus=[3, 4, 5, 6]))
    assert main(["place", write(tmp_path, bad), "--etcd", etcd.url]) == 2
    err = capsys.readouterr().err
    assert err == "baton: error: machines[0].nodes[2] (d0): gpu 3 is already used by p1\n"
    assert placement_store_read(etcd.url, "g1") is None  # nothing written
    (tmp_path / "broken.yaml").write_text("cluster: [unclosed\n")
    assert main(["place", str(tmp_path / "broken.yaml"), "--etcd", etcd.url]) == 2
    assert capsys.readouterr().err.startswith(f"baton: error: {tmp_path / 'broken.yaml'}: not valid YAML")
    assert main(["place", "--check", write(tmp_path, GPU)]) == 0  # valid, model not here: a warning
    captured = capsys.readouterr()
    assert "a valid placement of cluster g1 (3 nodes on 1 machine)" in captured.out
    assert captured.err.startswith("baton: warning: model.path: no checkpoint folder at /nowhere/llama")


def placement_store_read(url: str, cluster: str):
    import asyncio

    return asyncio.run(placement_store.read(url, cluster))


def placement_store_history(url: str, cluster: str):
    import asyncio

    return asyncio.run(placement_store.history(url, cluster))
