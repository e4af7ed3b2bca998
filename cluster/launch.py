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
from baton.cluster.loops import retrying
from baton.cluster.membership import MembershipWatcher

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
    log_dir: str = ""
    start_timeout: float = 180.0

    def __post_init__(self) -> None:
        for name in ("prefill", "decode", "colocated"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0")
        if not (self.prefill and self.decode) and not self.colocated:
            raise ValueError("need at least one prefill and one decode node, or a colocated node")
        if bool(self.prefill) != bool(self.decode):
            raise ValueError("prefill and decode nodes come together (use --colocated for single nodes)")


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
        count = spec.prefill + spec.decode + spec.colocated
        threads = spec.threads or max(1, (os.cpu_count() or 1) // count)
        common = ["--etcd", self.etcd_url, "--cluster", self.cluster, "--host", spec.host, "--threads", str(threads)]
        if spec.model:
            common += ["--model", spec.model]
        cores = sorted(os.sched_getaffinity(0))
        for role, n in (("prefill", spec.prefill), ("decode", spec.decode), ("colocated", spec.colocated)):
            for i in range(n):
                node_id = f"{role}-{i}"
                core = cores[len(self.nodes) % len(cores)] if spec.pin else None
                chunked = ["--enable-chunked-prefill"] if spec.chunked_prefill and role != "prefill" else []
                args = ["node", "--role", role, "--node-id", node_id, *common, *chunked, *spec.node_args,
                        *spec.role_args.get(role, [])]
                self.nodes[node_id] = self._spawn(node_id, args, threads, core)
        port = spec.port or free_port(spec.host)
        router_args = ["router", "--etcd", self.etcd_url, "--cluster", self.cluster, "--host", spec.host,
                       "--port", str(port)] + (["--model", spec.model] if spec.model else []) + spec.router_args
        self.router = self._spawn("router", router_args, 1)
        asyncio.run(self._wait_registered())
        self.address = f"{spec.host}:{port}"
        self._wait_router_serving()
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

    def _wait_router_serving(self) -> None:
        deadline = time.monotonic() + self.spec.start_timeout
        with grpc.insecure_channel(self.address) as channel:
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
            print(f"baton: router listening on {cluster.address} (cluster {cluster.cluster}, "
                  f"etcd {cluster.etcd_url}, logs in {cluster.log_dir})", flush=True)
            stop.wait()
        except KeyboardInterrupt:  # a signal during start-up
            return 130
    finally:
        cluster.stop()
    return 0
