"""A cluster's placement: which machine runs which nodes, in which role, on which GPUs, and where the routers are.

An operator writes it as YAML (examples/), `baton place` validates it into the frozen dataclasses below and
stores it in etcd as JSON (`placement_store`), and `baton launch` on each machine starts what it assigns to
that machine (`machine`). The JSON form has the YAML's shape, with defaults filled in and GPU counts made
into id lists, and goes through the same checks when it is read back.

    cluster: prod                        # the etcd key prefix (/baton/prod/...) and the nodes' --cluster
    etcd: [http://10.0.0.1:2379]         # where `baton place` writes when it is given no --etcd
    model: {path: /models/llama-8b, dtype: bfloat16, device: cuda}  # path "" or absent: the bundled stories260K
    options: {num_kv_blocks: 8192, max_num_seqs: 64, kv_path: auto, drain_timeout: 30, enable_prefix_caching: true,
              auth: false,                 # routers require API keys (baton keys)
              tls: false,                  # routers' public fronts answer TLS only
              mtls: false,                 # members call each other over mutual TLS
              role_change: in_place}       # or restart: a node whose role changes is drained and started again
    machines:
      - name: a
        host: 0.0.0.0                    # what its nodes and router listen on (they publish this machine's address)
        gpus: 8                          # a count (ids 0..7) or a list of ids
        max_nodes: 4                     # optional: the planner may add nodes up to this many (and free GPUs)
        router: {port: 50051}          # also http_port (its OpenAI front; 0: none), routing (kv, least-loaded, ...)
        nodes:
          - {name: prefill-0, role: prefill, gpus: [0, 1], tp: 2}   # port 0 (the default): a free one
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from baton.common.membership import ROLES

# The engine's and the node's choices, repeated so that reading a spec needs no torch.
DEVICES = ("cpu", "cuda")  # on cuda, a node's ranks take its GPUs in order (see machine.py)
DTYPES = ("float32", "bfloat16", "float16")
KERNELS = ("auto", "torch", "triton")
KV_PATHS = ("auto", "pair", "shared")
ROLE_CHANGES = ("in_place", "restart")
ROUTING = ("kv", "least-loaded", "round-robin")  # router/routing.py's POLICIES, repeated: no router import here
ROUTER = "router"  # a machine's router process; no node may take the name
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")  # etcd key parts and log file names


class PlacementError(ValueError):
    """A placement that cannot be used; `where` names the entry (`machines[1].nodes[0] (decode-0)`)."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where
        self.message = message


@dataclass(frozen=True, slots=True)
class ModelSpec:
    path: str = ""  # a checkpoint folder on every machine; "": the bundled stories260K
    dtype: str | None = None  # None: the checkpoint's
    device: str = "cpu"
    kernels: str = "auto"


@dataclass(frozen=True, slots=True)
class NodeOptions:
    """Engine and node settings every node shares."""
    num_kv_blocks: int | None = None  # None: the engine's default (from its KV cache bytes)
    max_num_seqs: int | None = None
    kv_path: str = "auto"
    drain_timeout: float = 30.0  # seconds a stopped node waits for its running work before it stops serving
    enable_prefix_caching: bool = True
    auth: bool = False  # routers require API keys (each `baton launch` then needs --cluster-secret-file)
    tls: bool = False  # routers answer TLS only (each `baton launch` that runs one needs --tls-cert/--tls-key)
    mtls: bool = False  # members over mutual TLS (each `baton launch` needs --mtls-cert/--mtls-key/--mtls-ca)
    # A node whose role alone changes: "in_place" keeps its process, weights and KV cache (cluster/roles.py);
    # "restart" drains it and starts it again in the new role.
    role_change: str = "in_place"


@dataclass(frozen=True, slots=True)
class RouterSpec:
    port: int = 50051
    host: str = ""  # "": the machine's host
    http_port: int = 0  # the OpenAI-compatible HTTP front (0: none)
    routing: str = "kv"  # the router's policy (router/routing.py)


@dataclass(frozen=True, slots=True)
class NodeSpec:
    name: str  # unique in the cluster: the node id
    role: str
    tp: int = 1  # ranks, one process each: one GPU each on cuda, CPU ranks on cpu
    gpus: tuple[int, ...] = ()  # on cuda, exactly tp of the machine's ids; on cpu, none
    port: int = 0  # 0: a free one
    threads: int = 0  # torch threads per rank; 0: torch's default (on a CPU host, share the cores out)


@dataclass(frozen=True, slots=True)
class MachineSpec:
    name: str
    host: str = "0.0.0.0"
    advertise_host: str = ""  # the address others dial; "": this machine's (what its host name resolves to)
    gpus: tuple[int, ...] = ()
    router: RouterSpec | None = None
    nodes: tuple[NodeSpec, ...] = ()
    # The most nodes this machine may run: `baton planner --max-nodes` adds nodes up to it (and, on cuda, up to
    # its free GPUs). 0: on cuda its GPUs are the bound; on cpu it runs the nodes it lists and no more.
    max_nodes: int = 0


@dataclass(frozen=True, slots=True)
class Placement:
    cluster: str
    machines: tuple[MachineSpec, ...]
    etcd: tuple[str, ...] = ()
    model: ModelSpec = field(default_factory=ModelSpec)
    options: NodeOptions = field(default_factory=NodeOptions)

    def machine(self, name: str) -> MachineSpec | None:
        return next((m for m in self.machines if m.name == name), None)

    def nodes(self) -> dict[str, tuple[MachineSpec, NodeSpec]]:
        """Every node by name, with its machine."""
        return {n.name: (m, n) for m in self.machines for n in m.nodes}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self, dict_factory=lambda items: {k: _plain(v) for k, v in items})

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Placement:
        try:
            obj = json.loads(data)
        except ValueError as e:
            raise PlacementError("", f"not valid JSON: {e}") from None
        return parse(obj)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def load(path: str | Path) -> Placement:
    """Reads and validates a YAML (or JSON) spec file."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise PlacementError(str(path), e.strerror or str(e)) from None
    try:
        obj = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PlacementError(str(path), f"not valid YAML: {e}") from None
    return parse(obj)


# -- reading -------------------------------------------------------------------------------------------
class _Entry:
    """One mapping of the spec, read field by field; `done()` refuses the fields nobody took."""

    def __init__(self, obj: Any, where: str) -> None:
        if not isinstance(obj, dict):
            raise PlacementError(where, f"{'' if where else 'the spec '}must be a mapping, got {_show(obj)}")
        self.obj, self.where, self.taken = obj, where, set()

    def error(self, name: str, message: str) -> PlacementError:
        return PlacementError(self.where, f"{name}: {message}")

    def get(self, name: str, default: Any = None, required: bool = False) -> Any:
        self.taken.add(name)
        value = self.obj.get(name)
        if value is None:
            if required:
                raise self.error(name, "is required")
            return default
        return value

    def string(self, name: str, default: str = "", required: bool = False, choices: tuple[str, ...] = ()) -> str:
        value = self.get(name, default, required)
        if not isinstance(value, str):
            raise self.error(name, f"must be a string, got {_show(value)}")
        if choices and value not in choices:
            raise self.error(name, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def name(self, key: str = "name") -> str:
        value = self.string(key, required=True)
        if not _NAME.fullmatch(value):
            raise self.error(key, f"{value!r}: use letters, digits, '_', '.' and '-' (63 at most, first a letter "
                                  "or digit)")
        return value

    def integer(self, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
        value = self.get(name, default)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f">= {low}"
            raise self.error(name, f"must be an integer {bound}, got {_show(value)}")
        return value

    def number(self, name: str, default: float, low: float) -> float:
        value = self.get(name, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value < float("inf"):
            raise self.error(name, f"must be a number >= {low}, got {_show(value)}")
        return float(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.get(name, default)
        if not isinstance(value, bool):
            raise self.error(name, f"must be true or false, got {_show(value)}")
        return value

    def items(self, name: str, required: bool = False) -> list[Any]:
        value = self.get(name, [], required)
        if not isinstance(value, list):
            raise self.error(name, f"must be a list, got {_show(value)}")
        return value

    def gpu_ids(self, name: str, allow_count: bool) -> tuple[int, ...]:
        value = self.get(name, [])
        if allow_count and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return tuple(range(value))
        what = "a GPU count or a list of GPU ids" if allow_count else "a list of GPU ids"
        if not isinstance(value, list) or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0
                                                  for g in value):
            raise self.error(name, f"must be {what} (integers >= 0), got {_show(value)}")
        if len(set(value)) != len(value):
            raise self.error(name, f"lists a GPU twice: {value}")
        return tuple(value)

    def done(self) -> None:
        unknown = sorted(str(k) for k in self.obj if k not in self.taken)
        if unknown:
            raise PlacementError(self.where, f"unknown field{'s' if len(unknown) > 1 else ''} "
                                             f"{', '.join(map(repr, unknown))}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse(obj: Any) -> Placement:
    """A placement from its YAML/JSON form (dicts and lists), every check of `check` included."""
    top = _Entry(obj, "")
    cluster = top.name("cluster")
    etcd = top.get("etcd", [])
    etcd = [etcd] if isinstance(etcd, str) else etcd
    if not isinstance(etcd, list) or not all(isinstance(u, str) and _is_etcd_url(u) for u in etcd):
        raise top.error("etcd", f"must be http://host:port or a list of them, got {_show(etcd)}")
    model = _model(top.get("model", {}))
    options = _options(top.get("options", {}))
    machines = tuple(_machine(m, f"machines[{i}]") for i, m in enumerate(top.items("machines", required=True)))
    top.done()
    placement = Placement(cluster=cluster, machines=machines, etcd=tuple(etcd), model=model, options=options)
    check(placement)
    return placement


def _is_etcd_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        return parts.scheme == "http" and bool(parts.hostname) and bool(parts.port)
    except ValueError:  # a port that is not a number
        return False


def _model(obj: Any) -> ModelSpec:
    e = _Entry(obj, "model")
    dtype = e.string("dtype", choices=DTYPES) if e.get("dtype") is not None else None
    spec = ModelSpec(path=e.string("path"), dtype=dtype, device=e.string("device", "cpu", choices=DEVICES),
                     kernels=e.string("kernels", "auto", choices=KERNELS))
    e.done()
    return spec


def _options(obj: Any) -> NodeOptions:
    e = _Entry(obj, "options")
    options = NodeOptions(num_kv_blocks=e.integer("num_kv_blocks", None, 1),
                          max_num_seqs=e.integer("max_num_seqs", None, 1),
                          kv_path=e.string("kv_path", "auto", choices=KV_PATHS),
                          drain_timeout=e.number("drain_timeout", 30.0, 0.0),
                          enable_prefix_caching=e.boolean("enable_prefix_caching", True),
                          auth=e.boolean("auth", False), tls=e.boolean("tls", False),
                          mtls=e.boolean("mtls", False),
                          role_change=e.string("role_change", "in_place", choices=ROLE_CHANGES))
    e.done()
    return options


def _machine(obj: Any, where: str) -> MachineSpec:
    e = _Entry(obj, where)
    name = e.name()
    e.where = f"{where} ({name})"
    router = None
    if (r := e.get("router")) is not None:
        r = _Entry(r, f"{e.where}.router")
        router = RouterSpec(port=r.integer("port", 50051, 1, 65535), host=r.string("host"),
                            http_port=r.integer("http_port", 0, 0, 65535),
                            routing=r.string("routing", "kv", choices=ROUTING))
        r.done()
    spec = MachineSpec(name=name, host=e.string("host", "0.0.0.0"), advertise_host=e.string("advertise_host"),
                       gpus=e.gpu_ids("gpus", allow_count=True), router=router,
                       nodes=tuple(_node(n, f"{where}.nodes[{i}]") for i, n in enumerate(e.items("nodes"))),
                       max_nodes=e.integer("max_nodes", 0, 0))
    if not spec.host:
        raise e.error("host", "must not be empty (0.0.0.0: every interface)")
    if spec.max_nodes and len(spec.nodes) > spec.max_nodes:
        raise e.error("max_nodes", f"{spec.max_nodes}, but the machine lists {len(spec.nodes)} nodes")
    e.done()
    return spec


def _node(obj: Any, where: str) -> NodeSpec:
    e = _Entry(obj, where)
    name = e.name()
    e.where = f"{where} ({name})"
    spec = NodeSpec(name=name, role=e.string("role", required=True, choices=ROLES), tp=e.integer("tp", 1, 1),
                    gpus=e.gpu_ids("gpus", allow_count=False), port=e.integer("port", 0, 0, 65535),
                    threads=e.integer("threads", 0, 0))
    e.done()
    return spec


# -- checking the whole ----------------------------------------------------------------------------------
def check(p: Placement) -> None:
    """What no single entry shows: names used twice, GPUs shared or missing, ports taken twice, roles that
    cannot serve. (`check_model` adds what the model's shape allows.)"""
    owners: dict[str, str] = {}
    machines: set[str] = set()
    for i, m in enumerate(p.machines):
        where = f"machines[{i}] ({m.name})"
        if m.name in machines:
            raise PlacementError(where, f"name: machine {m.name!r} is listed twice")
        machines.add(m.name)
        gpu_owner: dict[int, str] = {}
        port_owner: dict[int, str] = {}
        if m.router is not None:
            port_owner[m.router.port] = "the router"
        for j, n in enumerate(m.nodes):
            where = f"machines[{i}].nodes[{j}] ({n.name})"
            if n.name == ROUTER:
                raise PlacementError(where, f"name: {ROUTER!r} is the machine's router process")
            if n.name in owners:
                raise PlacementError(where, f"name: node {n.name!r} is already on machine {owners[n.name]}")
            owners[n.name] = m.name
            if p.model.device == "cpu" and n.gpus:
                raise PlacementError(where, "gpus: model.device is cpu: nodes take no GPUs (tp is the number of "
                                            "CPU ranks)")
            if p.model.device == "cuda" and len(n.gpus) != n.tp:
                raise PlacementError(where, f"gpus: tp {n.tp} needs {n.tp} GPU id(s), one per rank; got "
                                            f"{len(n.gpus)}: {list(n.gpus)}")
            for g in n.gpus:
                if g not in m.gpus:
                    raise PlacementError(where, f"gpu {g}: machine {m.name} has "
                                                f"{'GPUs ' + str(list(m.gpus)) if m.gpus else 'no GPUs'}")
                if g in gpu_owner:
                    raise PlacementError(where, f"gpu {g} is already used by {gpu_owner[g]}")
                gpu_owner[g] = n.name
            if n.port and n.port in port_owner:
                raise PlacementError(where, f"port {n.port} is already used by {port_owner[n.port]} on machine "
                                            f"{m.name}")
            if n.port:
                port_owner[n.port] = n.name
    roles = {n.role for _, n in p.nodes().values()}
    if not roles:
        raise PlacementError("machines", "no node: a cluster needs a prefill and a decode node, or a colocated one")
    if ("prefill" in roles) != ("decode" in roles):
        has, lacks = ("prefill", "decode") if "prefill" in roles else ("decode", "prefill")
        raise PlacementError("machines", f"{has} nodes but no {lacks} node: they serve requests together")
    if not any(m.router for m in p.machines):
        raise PlacementError("machines", "no router: give one machine a `router:` entry")


def check_model(p: Placement) -> list[str]:
    """Checks every node's TP degree against the model's shape, read from its config.json where this runs.
    Returns warnings (the model is not here, so nothing was checked); raises PlacementError naming the node."""
    from baton.engine import ConfigError
    from baton.engine.config import ModelConfig
    from baton.engine.checkpoint import resolve_model_path
    from baton.engine.parallel import check_degree

    try:
        folder = resolve_model_path(p.model.path)
    except ConfigError as e:
        return [f"model.path: {e.reason}: the nodes' tp degrees were not checked against the model"]
    try:
        cfg = ModelConfig.from_folder(folder)
    except ConfigError as e:
        raise PlacementError("model.path", str(e)) from None
    for i, m in enumerate(p.machines):
        for j, n in enumerate(m.nodes):
            try:
                check_degree(cfg, n.tp)
            except ConfigError as e:
                raise PlacementError(f"machines[{i}].nodes[{j}] ({n.name})", f"tp: {e.reason}") from None
    return []
