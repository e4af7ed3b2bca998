"""`baton up`: a local cluster — etcd (unless given), the nodes and the router, each its own process.

Children run in their own session (a terminal's Ctrl-C reaches only `baton up`, which then stops them in
order: router, nodes, etcd) and get SIGTERM from the kernel if `baton up` itself dies, even by SIGKILL: the
nodes and the router ask for it themselves (`--parent-pid`), etcd runs under a supervisor that does
(`orphans`). No Python runs between fork and exec here (this process has threads).
"""

from __future__ import annotations

import _thread
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aetcd
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from baton.cluster.etcd_server import EtcdServer, free_port
from baton.cluster.placement import ROUTER
from baton.common.loops import retrying
from baton.common.membership import MembershipWatcher
from baton.v1 import baton_pb2, baton_pb2_grpc

@dataclass(frozen=True, slots=True)
class ModelPool:
    """One model's nodes in a cluster of several (`baton up --config`): its checkpoint, the names requests
    give it (the first is its name), and its nodes with their tensor-parallel degrees."""

    model: str = ""  # checkpoint folder; "" -> the bundled stories260K
    names: tuple[str, ...] = ()  # () -> the folder's name
    prefill: int = 0
    decode: int = 0
    colocated: int = 0
    prefill_tp: int = 1
    decode_tp: int = 1
    tp: int = 1  # the colocated nodes'


_POOL_KEYS = {"model", "name", "aliases", "prefill", "decode", "colocated", "prefill_tp", "decode_tp", "tp"}


def load_pools(path: str | Path) -> list[ModelPool]:
    """The models of a `baton up --config` file (YAML): a list under `models`, each with its checkpoint
    (`model`), its `name` and `aliases`, and its nodes (`prefill`, `decode`, `colocated`, `prefill_tp`,
    `decode_tp`, `tp`). Raises FieldError naming the entry and key."""
    import yaml

    from baton.engine import FieldError

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise FieldError("config", f"cannot read {path}: {e}") from None
    entries = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise FieldError("config", f"{path}: needs a non-empty list under 'models'")
    pools, seen = [], set()
    for i, e in enumerate(entries):
        where = f"models[{i}]"
        if not isinstance(e, dict):
            raise FieldError(where, "must be a mapping")
        if unknown := set(e) - _POOL_KEYS:
            raise FieldError(where, f"unknown keys {sorted(unknown)} (known: {sorted(_POOL_KEYS)})")
        counts = {}
        for key, low in (("prefill", 0), ("decode", 0), ("colocated", 0), ("prefill_tp", 1), ("decode_tp", 1),
                         ("tp", 1)):
            value = e.get(key, low)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise FieldError(f"{where}.{key}", f"must be an integer >= {low}, got {value!r}")
            counts[key] = value
        if not (counts["prefill"] and counts["decode"]) and not counts["colocated"]:
            raise FieldError(where, "needs prefill and decode nodes, or colocated nodes")
        if bool(counts["prefill"]) != bool(counts["decode"]):
            raise FieldError(where, "prefill and decode nodes come together")
        model, name, aliases = e.get("model", ""), e.get("name", ""), e.get("aliases", [])
        if not isinstance(model, str):
            raise FieldError(f"{where}.model", "must be a checkpoint folder")
        if not isinstance(name, str) or not isinstance(aliases, list) or \
                not all(isinstance(a, str) and a for a in aliases):
            raise FieldError(f"{where}.name", "name must be a string and aliases a list of strings")
        if aliases and not name:
            raise FieldError(f"{where}.aliases", "give the model a name too")
        key = name or model
        if key in seen:
            raise FieldError(where, f"model {key!r} is listed twice")
        seen.add(key)
        pools.append(ModelPool(model=model, names=tuple([name, *aliases]) if name else (), **counts))
    return pools


@dataclass(slots=True)
class ClusterSpec:
    model: str = ""
    prefill: int = 1
    decode: int = 1
    colocated: int = 0
    port: int = 0  # the router's; 0 -> a free one
    etcd: str = ""  # "" -> start a private etcd server
    cluster: str = ""  # "" -> a fresh name, so clusters sharing an etcd never meet
    host: str = "127.0.0.1"
    threads: int = 0  # torch threads per node; 0 -> the cores shared out between the nodes
    pin: bool = False  # pin node i to core i % cores (equal, isolated resources for comparisons)
    chunked_prefill: bool = False  # in decode and colocated nodes (a prefill node sends whole prompts)
    node_args: list[str] = field(default_factory=list)  # extra `baton node` options (engine settings)
    role_args: dict[str, list[str]] = field(default_factory=dict)  # more options for one role's nodes
    router_args: list[str] = field(default_factory=list)  # extra `baton router` options
    http_port: int = 0  # the router's OpenAI-compatible HTTP front (0: none)
    tls_trust: str = ""  # the router serves TLS (router_args has its certificate): a PEM of the issuers to trust
    log_dir: str = ""
    start_timeout: float = 180.0
    # More models, each with its own nodes (`baton up --config`); their node ids start with the model's name.
    # The model above (model, prefill, decode, colocated, role_args) is the first; the router is given it.
    more_models: list[ModelPool] = field(default_factory=list)

    def node_count(self) -> int:
        return self.prefill + self.decode + self.colocated + sum(p.prefill + p.decode + p.colocated
                                                                 for p in self.more_models)

    def __post_init__(self) -> None:
        for name in ("prefill", "decode", "colocated"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0")
        if not (self.prefill and self.decode) and not self.colocated:
            raise ValueError("need at least one prefill and one decode node, or a colocated node")
        if bool(self.prefill) != bool(self.decode):
            raise ValueError("prefill and decode nodes come together (use --colocated for single nodes)")


def up_commands(spec: ClusterSpec, etcd_url: str, cluster: str, port: int, threads: int) -> dict[str, list[str]]:
    """What `baton up` runs for `spec`: each node's `baton` arguments by node id, then the router's (under
    ROUTER). Pure, so that what else starts these processes (the Kubernetes manifests in examples/kubernetes)
    can be held to the same commands (tests/test_kubernetes.py)."""
    common = ["--etcd", etcd_url, "--cluster", cluster, "--host", spec.host, "--threads", str(threads)]
    pools = [("", spec.model, (spec.prefill, spec.decode, spec.colocated), spec.role_args, [])]
    for p in spec.more_models:
        names = ["--served-model-name", *p.names] if p.names else []
        prefix = (p.names[0] if p.names else Path(p.model).name if p.model else "stories260K") + "-"
        pools.append((prefix, p.model, (p.prefill, p.decode, p.colocated),
                      {"prefill": ["--tp", str(p.prefill_tp)], "decode": ["--tp", str(p.decode_tp)],
                       "colocated": ["--tp", str(p.tp)]}, names))
    out = {}
    for prefix, model, counts, role_args, names in pools:
        for role, n in zip(("prefill", "decode", "colocated"), counts):
            for i in range(n):
                node_id = f"{prefix}{role}-{i}"
                chunked = ["--enable-chunked-prefill"] if spec.chunked_prefill and role != "prefill" else []
                out[node_id] = ["node", "--role", role, "--node-id", node_id, *common,
                                *(["--model", model] if model else []), *chunked, *spec.node_args,
                                *role_args.get(role, []), *names]
    out[ROUTER] = ["router", "--etcd", etcd_url, "--cluster", cluster, "--host", spec.host, "--port", str(port),
                   "--http-port", str(spec.http_port)] + (["--model", spec.model] if spec.model else []) + \
        spec.router_args
    return out


class LocalCluster:
    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.cluster = spec.cluster or f"local-{uuid.uuid4().hex[:8]}"
        self.log_dir = Path(spec.log_dir or tempfile.mkdtemp(prefix="baton-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.etcd: EtcdServer | None = None
        self.etcd_url = spec.etcd
        self.nodes: dict[str, subprocess.Popen] = {}
        self.router: subprocess.Popen | None = None
        self.address = ""

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, name: str, args: list[str], threads: int, core: int | None = None) -> subprocess.Popen:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
        log = open(self.log_dir / f"{name}.log", "wb")
        # The child unblocks SIGINT/SIGTERM (blocked here, see run_up), pins itself and ties its life to ours.
        cmd = [sys.executable, "-m", "baton.cluster.cli", *args, "--parent-pid", str(os.getpid())]
        if core is not None:
            cmd += ["--cpus", str(core)]
        with log:
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)

    def start(self) -> str:
        spec = self.spec
        if not self.etcd_url:
            self.etcd = EtcdServer().start()
            self.etcd_url = self.etcd.url
        threads = spec.threads or max(1, (os.cpu_count() or 1) // spec.node_count())
        cores = sorted(os.sched_getaffinity(0))
        port = spec.port or free_port(spec.host)
        commands = up_commands(spec, self.etcd_url, self.cluster, port, threads)
        router_args = commands.pop(ROUTER)
        for node_id, args in commands.items():
            core = cores[len(self.nodes) % len(cores)] if spec.pin else None
            self.nodes[node_id] = self._spawn(node_id, args, threads, core)
        self.router = self._spawn(ROUTER, router_args, 1)
        asyncio.run(self._wait_registered())
        self.address = f"{spec.host}:{port}"
        self._wait_router_serving()
        if spec.more_models:
            asyncio.run(self._wait_models_served())
        return self.address

    def _check_alive(self) -> None:
        for name, proc in [*self.nodes.items(), ("router", self.router)]:
            if proc.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with status {proc.returncode} while starting:\n{tail}")

    async def _wait_registered(self) -> None:
        deadline = time.monotonic() + self.spec.start_timeout
        # etcd was just started, on a machine that the starting nodes keep busy: a first connection can time out.
        watcher = await retrying(lambda: MembershipWatcher.start(self.etcd_url, self.cluster), (aetcd.ClientError,),
                                 self.spec.start_timeout, "watching the membership")
        try:
            expected = set(self.nodes)
            while True:
                self._check_alive()
                try:
                    await watcher.wait_for(lambda: expected <= {n.node_id for n in watcher.nodes()}, 0.5)
                    return
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"nodes not registered after {self.spec.start_timeout} s") from None
        finally:
            await watcher.close()

    def _channel(self, aio: bool = False):
        """A channel to the router this cluster started (over TLS when it serves TLS)."""
        if self.spec.tls_trust:
            credentials = grpc.ssl_channel_credentials(Path(self.spec.tls_trust).read_bytes())
            return (grpc.aio.secure_channel if aio else grpc.secure_channel)(self.address, credentials)
        return (grpc.aio.insecure_channel if aio else grpc.insecure_channel)(self.address)

    def _wait_router_serving(self) -> None:
        deadline = time.monotonic() + self.spec.start_timeout
        with self._channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                self._check_alive()
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0, wait_for_ready=True)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"router not serving after {self.spec.start_timeout} s")

    async def _wait_models_served(self) -> None:
        """Until the router lists every model its nodes registered (it loads each as it first sees it)."""
        deadline = time.monotonic() + self.spec.start_timeout
        watcher = await MembershipWatcher.start(self.etcd_url, self.cluster)
        try:
            async with self._channel(aio=True) as channel:
                stub = baton_pb2_grpc.BatonStub(channel)
                while True:
                    registered = {n.model for n in watcher.nodes()}
                    listed = await stub.ListModels(baton_pb2.ListModelsRequest(), timeout=10)
                    if registered <= {m.id for m in listed.models}:
                        return
                    self._check_alive()
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the router does not serve {sorted(registered)} after "
                                           f"{self.spec.start_timeout} s")
                    await asyncio.sleep(0.1)
        finally:
            await watcher.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Router first (no new requests), then the nodes, then etcd; SIGKILL whatever outlives `timeout`."""
        for group in ([self.router] if self.router else [], list(self.nodes.values())):
            for proc in group:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in group:
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.etcd is not None:
            self.etcd.stop()
            self.etcd = None


def run_up(spec: ClusterSpec) -> int:
    """Starts the cluster, prints the router address, and serves until SIGINT or SIGTERM.

    SIGINT/SIGTERM are blocked before any thread exists (so every thread inherits the mask) and taken by one
    thread with `sigwait`: no handler runs inside half-done work, and a second signal cannot interrupt the
    clean-up. A signal during start-up interrupts it (`interrupt_main`); after it, it ends the wait.
    """
    stops = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    stop = threading.Event()
    lock = threading.Lock()
    starting = True

    def take_signals() -> None:
        while True:
            signal.sigwait(stops)
            with lock:
                stop.set()
                if starting:
                    _thread.interrupt_main()

    threading.Thread(target=take_signals, name="signals", daemon=True).start()
    cluster = LocalCluster(spec)
    try:
        try:
            cluster.start()
            with lock:
                starting = False
            if spec.http_port:  # first: what reads these lines has both once it sees the router's
                scheme = "https" if spec.tls_trust else "http"
                print(f"baton: OpenAI-compatible HTTP on {scheme}://{spec.host}:{spec.http_port}/v1", flush=True)
            print(f"baton: router listening on {cluster.address} (cluster {cluster.cluster}, "
                  f"etcd {cluster.etcd_url}, logs in {cluster.log_dir})", flush=True)
            stop.wait()
        except KeyboardInterrupt:  # a signal during start-up
            return 130
    finally:
        cluster.stop()
    return 0
