"""One node process: an engine, its gRPC service, and its registration in etcd.

Roles: `prefill` (PrefillNode service), `decode` (DecodeNode service, hosts the KV rendezvous store) and
`colocated` (DecodeNode service, whose Generate runs prompt and decode on this engine). Each also serves its
Prometheus metrics over HTTP (`metrics`), at the address it publishes in etcd beside its gRPC one.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from dataclasses import dataclass, field

import aetcd
import torch

from baton.cluster.roles import RoleSlot, follow_role
from baton.common.grpc_server import (DECODE_SERVICE, KV_EVENTS_SERVICE, PREFILL_SERVICE, SHUTDOWN_GRACE_S, Server,
                                      run_until_signalled)
from baton.common.keys import read_secret
from baton.common.kv_events import KVEventPublisher, KVEventsServicer
from baton.common.loops import every, retrying
from baton.common.members import member_token
from baton.common.tls import MemberTls
from baton.common.membership import NodeInfo, NodeRegistration, advertised_host
from baton.common.metrics import MetricsServer
from baton.engine import EngineConfig, LLMEngine
from baton.engine.checkpoint import resolve_model_path, served_name
from baton.engine.shm import remove_stale_shm
from baton.engine.async_engine import AsyncEngine
from baton.engine.omp import serial_torch
from baton.kvtransfer.channel import KVStoreHost, join_address
from baton.kvtransfer.ranks import serve_rank
from baton.decode.server import DecodeServicer
from baton.prefill.pull import DEFAULT_PULL_MIN_TOKENS
from baton.prefill.server import PrefillServicer
from baton.v1 import node_pb2_grpc

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "colocated")
START_RETRY_S = 60.0  # how long start-up keeps trying to reach etcd
# A router that picked this node just before it left etcd reaches it within this: a drain ends no sooner, so
# that such a request is served rather than refused by a server that has stopped.
DRAIN_SETTLE_S = 0.5
DRAIN_POLL_S = 0.05


@dataclass(slots=True)
class NodeConfig:
    role: str
    etcd: str  # http://host:port
    cluster: str = "default"
    node_id: str = ""  # "" -> role + a random suffix
    host: str = "127.0.0.1"
    port: int = 0  # 0 -> any free port
    metrics_port: int = 0  # Prometheus metrics (GET /metrics) on `host`; 0 -> any free port (published in etcd)
    advertise_host: str = ""  # the name others dial; "" -> `host`, or this machine's address if that is a wildcard
    ttl: float = 3.0  # membership lease: a dead node disappears within this
    threads: int = 0  # torch threads; 0 -> torch's default
    load_report_seconds: float = 0.2
    transfer_timeout: float = 30.0  # a KV transfer (or its channel set-up) that takes longer fails
    # "auto": a decode node offers its KV storage to prefill nodes on its device when that is a GPU, and a
    # prefill node writes into any storage offered on its own device; "shared": a CPU decode node offers its
    # storage too (in /dev/shm); "pair": always the pair channel (gloo or NCCL).
    kv_path: str = "auto"
    # A prefill node reads back the cached blocks of a prompt that the decode node holds and it lacks, instead of
    # computing them, when at least this many tokens would come back (prefill/pull.py); 0: never.
    kv_pull_min_tokens: int = DEFAULT_PULL_MIN_TOKENS
    # On SIGTERM the node leaves etcd, then serves what it holds (running, waiting, reserved) for up to this
    # long before its server stops.
    drain_timeout: float = 30.0
    # The names requests give its model: the first is its name ("" -> the folder's, see served_name), the
    # others aliases. Every node of a model registers the same.
    served_model_names: tuple[str, ...] = ()
    log_format: str = "text"  # or "json": one JSON object per line
    # The cluster's secret: its internal services then answer members only, and it calls others as one
    # (common/members.py). "": an open cluster.
    cluster_secret_file: str = ""
    # Mutual TLS between members (common/tls.py): this node's certificate and key, and the cluster's CA.
    mtls_cert: str = ""
    mtls_key: str = ""
    mtls_ca: str = ""
    # Follow the cluster's placement (`baton launch` starts its nodes so): the node changes role in place when
    # the placement gives it another.
    follow_placement: bool = False
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role: must be one of {ROLES}, got {self.role!r}")
        if not self.node_id:
            self.node_id = f"{self.role}-{uuid.uuid4().hex[:8]}"
        if self.role == "prefill" and self.engine.enable_chunked_prefill:
            raise ValueError("enable_chunked_prefill: a prefill node sends whole prompts; turn it off")
        if not self.advertise_host:
            self.advertise_host = advertised_host(self.host)
        if not 0 <= self.drain_timeout < float("inf"):
            raise ValueError(f"drain_timeout: must be a number of seconds >= 0, got {self.drain_timeout!r}")
        if not (isinstance(self.metrics_port, int) and 0 <= self.metrics_port <= 65535):
            raise ValueError(f"metrics_port: must be a port number (0: any free port), got {self.metrics_port!r}")
        if len({bool(self.mtls_cert), bool(self.mtls_key), bool(self.mtls_ca)}) > 1:
            raise ValueError("mtls_cert: give --mtls-cert, --mtls-key and --mtls-ca together, or none")
        if self.kv_path not in KV_PATHS:
            raise ValueError(f"kv_path: must be one of {KV_PATHS}, got {self.kv_path!r}")
        if not (isinstance(self.kv_pull_min_tokens, int) and self.kv_pull_min_tokens >= 0):
            raise ValueError(f"kv_pull_min_tokens: must be >= 0 (0: never pull), got {self.kv_pull_min_tokens!r}")
        if self.kv_path == "shared" and (self.role != "prefill" or self.follow_placement):
            self.engine.share_kv_cache = True  # a node that may become a decode node shares its cache from the start


KV_PATHS = ("auto", "pair", "shared")


async def serve(cfg: NodeConfig, stop: asyncio.Event) -> None:
    """Runs the node until `stop` is set; leaves etcd, the port and every thread clean behind it. With
    `follow_placement`, it changes role in place whenever the placement gives it another (`Roles.change`)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    serial_torch()  # the engine's thread runs the process's only OpenMP team (engine/omp.py)
    loop = asyncio.get_running_loop()
    if cfg.engine.share_kv_cache:
        remove_stale_shm()  # what killed nodes on this host left in /dev/shm
    token = member_token(read_secret(cfg.cluster_secret_file)) if cfg.cluster_secret_file else None
    # A tensor-parallel node's other ranks each move their own KV heads (kvtransfer/ranks.py).
    # The other ranks' rendezvous keys are named with the member token too (kvtransfer/channel.py, pair_prefix).
    rank_kv = functools.partial(serve_rank, secret=token or "")
    async_engine = await AsyncEngine.start(lambda: LLMEngine(cfg.engine, rank_kv=rank_kv), loop)
    engine = async_engine.engine
    roles = Roles(cfg, async_engine, token)
    # Every node's prefix cache, as it changes, to the routers that route by it (whatever its role).
    kv_events = KVEventPublisher(cfg.node_id, async_engine)
    server = Server([(node_pb2_grpc.add_PrefillNodeServicer_to_server, roles.slots["prefill"], PREFILL_SERVICE),
                     (node_pb2_grpc.add_DecodeNodeServicer_to_server, roles.slots["decode"], DECODE_SERVICE),
                     (node_pb2_grpc.add_KVEventsServicer_to_server, KVEventsServicer(kv_events),
                      KV_EVENTS_SERVICE)], member_token=token)
    tasks: list[asyncio.Task] = []
    metrics = None
    try:
        port = server.bind(cfg.host, cfg.port, roles.mtls).rpartition(":")[2]  # members only, with mutual TLS
        roles.address = join_address(cfg.advertise_host, port)
        servicer = roles.open(cfg.role)
        # Bound before gRPC serves: a metrics port in use stops the node before it takes a request.
        metrics = await MetricsServer.start(servicer.metrics, servicer.stats, cfg.host, cfg.metrics_port)
        roles.metrics = metrics
        await server.start()
        await server.set_serving(True)
        await roles.health(server)
        await roles.register()
        if cfg.engine.tensor_parallel_size > 1:
            async def watch_ranks() -> None:
                # A dead rank leaves the engine unable to step: the whole node goes, at once.
                if not engine.ranks_alive() and not stop.is_set():
                    log.error("%s: a tensor-parallel rank died; stopping the node", cfg.node_id)
                    stop.set()

            tasks.append(asyncio.create_task(every(0.2, watch_ranks, "rank watch")))
        if cfg.follow_placement:
            follow = functools.partial(follow_role, cfg.etcd, cfg.cluster, cfg.node_id, roles.want, START_RETRY_S)
            tasks.append(asyncio.create_task(every(1.0, follow, "following the placement",
                                                   transient=(aetcd.ClientError,))))
        log.info("%s serving on %s", cfg.node_id, roles.address)
        try:
            while await roles.next_change(stop):
                await roles.change(server)
        finally:
            deadline = await roles.leave(stopping=stop.is_set())
            kv_events.close()  # the routers' subscriptions end: the node leaves their indexes
            # New calls are refused from here on; calls still open (a prefill's last acknowledgement, a
            # stream's last message) get what is left of the drain time, and at least the 2 s they always had.
            await server.stop(grace=max(2.0, deadline - loop.time()))
    finally:
        for task in tasks:
            task.cancel()
        if metrics is not None:  # before the engine goes: a scrape reads it
            await metrics.close()
        await roles.close()
        await async_engine.close()
        await asyncio.to_thread(engine.close)  # a tensor-parallel engine's other ranks


class Roles:
    """The role a node has now, and what it holds for it: its servicer (and, as a decode or colocated node, its
    KV rendezvous store), its registration in etcd and the task that reports its load there. One owner for
    that state; `serve` owns what outlives a role (the engine, the gRPC and metrics servers, KV events)."""

    def __init__(self, cfg: NodeConfig, engine: AsyncEngine, token: str | None) -> None:
        self.cfg = cfg
        self.engine = engine
        self.token = token
        self.mtls = MemberTls(cfg.mtls_cert, cfg.mtls_key, cfg.mtls_ca) if cfg.mtls_cert else None
        folder = resolve_model_path(cfg.engine.model)
        self.model_path = str(folder.resolve())
        self.model_name = cfg.served_model_names[0] if cfg.served_model_names else served_name(folder)
        self.slots = {"prefill": RoleSlot(node_pb2_grpc.PrefillNodeServicer, PrefillServicer, PREFILL_SERVICE),
                      "decode": RoleSlot(node_pb2_grpc.DecodeNodeServicer, DecodeServicer, DECODE_SERVICE)}
        self.address = ""  # this node's gRPC address, once bound
        self.metrics: MetricsServer | None = None
        self.role = ""
        self.servicer = None
        self.store: KVStoreHost | None = None
        self.registration: NodeRegistration | None = None
        self.reporting: asyncio.Task | None = None  # the load report to etcd, while registered
        self.housekeeping: asyncio.Task | None = None  # a decode role's lease expiry: it runs through the drain
        self.wanted = cfg.role
        self._changed = asyncio.Event()

    def _slot(self, role: str) -> RoleSlot:
        return self.slots["prefill" if role == "prefill" else "decode"]

    def open(self, role: str):
        """Builds the servicer of `role` and puts it behind its slot (not registered yet)."""
        cfg = self.cfg
        if role == "prefill":
            servicer = PrefillServicer(cfg.node_id, self.engine, cfg.transfer_timeout, kv_path=cfg.kv_path,
                                       pull_min_tokens=cfg.kv_pull_min_tokens, model=self.model_name,
                                       member_token=self.token,
                                       member_credentials=self.mtls.channel_credentials() if self.mtls else None)
        else:
            # A store of its own for each time the node takes a decode role: prefill nodes see a new store
            # address and open new pair channels, as after a restart (prefill/peers.py).
            self.store = KVStoreHost(cfg.host, advertise_host=cfg.advertise_host)
            servicer = DecodeServicer(cfg.node_id, role, self.engine, self.store, cfg.transfer_timeout,
                                      publish_share=cfg.kv_path != "pair", model=self.model_name,
                                      rendezvous_secret=self.token or "")
            servicer.advertise(self.address)
            self.housekeeping = asyncio.create_task(every(0.1, servicer.housekeeping, "lease expiry"))
        self.role, self.servicer = role, servicer
        self._slot(role).fill(servicer)
        if self.metrics is not None:
            self.metrics.metrics, self.metrics.read_state = servicer.metrics, servicer.stats
        return servicer

    async def health(self, server: Server) -> None:
        """Each internal service reports SERVING only while the node has its role."""
        for slot in self.slots.values():
            await server.set_service_serving(slot.name, slot.servicer is not None)

    async def register(self) -> None:
        cfg, role = self.cfg, self.role
        stats = await self.servicer.stats()
        info = NodeInfo(
            node_id=cfg.node_id, role=role, model=self.model_name, aliases=list(cfg.served_model_names[1:]),
            model_path=self.model_path, address=self.address,
            capacity=stats.total_blocks, free_blocks=stats.free_blocks, running=0, waiting=0,
            metrics_address=join_address(cfg.advertise_host, self.metrics.port),
            tensor_parallel_size=cfg.engine.tensor_parallel_size,
            kv_pull_min_tokens=cfg.kv_pull_min_tokens if role == "prefill" else 0,
            max_num_seqs=cfg.engine.max_num_seqs,
        )
        self.registration = await retrying(
            lambda: NodeRegistration.register(cfg.etcd, cfg.cluster, info, ttl=cfg.ttl), (aetcd.ClientError,),
            START_RETRY_S, "registering in etcd")
        reporter = LoadReporter(self.servicer, self.registration)
        self.reporting = asyncio.create_task(every(cfg.load_report_seconds, reporter.report, "load report",
                                                   transient=(aetcd.ClientError,)))

    def want(self, role: str) -> None:
        """The role the placement gives this node now (follow_role)."""
        if role != self.wanted:
            self.wanted = role
            self._changed.set()

    async def next_change(self, stop: asyncio.Event) -> bool:
        """Waits for a role to change to, or for `stop`: says whether a change came first."""
        while not stop.is_set():
            if self.wanted != self.role:
                if self.wanted == "prefill" and self.cfg.engine.enable_chunked_prefill:
                    log.error("%s: cannot become a prefill node: it runs with chunked prefill", self.cfg.node_id)
                else:
                    return True
            self._changed.clear()
            stopping = asyncio.ensure_future(stop.wait())
            changed = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait({stopping, changed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
                changed.cancel()
        return False

    async def change(self, server: Server) -> None:
        """Changes role in place: leaves the membership, finishes or hands over what the old role holds (as on
        SIGTERM), closes its servicer once its calls end, then serves and registers in the new role. The
        weights, the KV cache (and its prefix cache) and the servers stay."""
        old, new, start = self.role, self.wanted, time.monotonic()
        log.info("%s: changing role %s -> %s", self.cfg.node_id, old, new)
        deadline = await self.leave(stopping=True)
        await self._slot(old).empty(max(2.0, deadline - asyncio.get_running_loop().time()))
        await self._close_role()
        self.open(new)
        await self.health(server)
        await self.register()
        log.info("%s: changed role %s -> %s in %.2f s", self.cfg.node_id, old, new, time.monotonic() - start)

    async def leave(self, stopping: bool) -> float:
        """Leaves the membership (routers stop sending at once); when `stopping`, serves what the role holds
        until the drain timeout, then hands the streams still running over. Returns the drain's deadline."""
        loop = asyncio.get_running_loop()
        if self.reporting is not None:  # before the registration it reports to goes
            self.reporting.cancel()
            self.reporting = None
        if self.registration is not None:
            await self.registration.close()
            self.registration = None
        deadline = loop.time() + self.cfg.drain_timeout
        servicer = self.servicer
        if servicer is None:
            return deadline
        if stopping and not await drain(servicer, self.cfg.node_id, deadline) and hasattr(servicer, "hand_over"):
            servicer.hand_over()  # the streams still here go on elsewhere (the router moves them)
        if hasattr(servicer, "close_streams"):
            servicer.close_streams()  # routers' Streams calls end with their last stream
        return deadline

    async def _close_role(self) -> None:
        if self.housekeeping is not None:
            self.housekeeping.cancel()
            self.housekeeping = None
        if self.servicer is not None:
            await self.servicer.close()
            self.servicer = None
        if self.store is not None:
            self.store.close()
            self.store = None

    async def close(self) -> None:
        if self.reporting is not None:
            self.reporting.cancel()
        await self._close_role()


async def drain(servicer, node_id: str, deadline: float) -> bool:
    """Waits until the servicer holds no work (running, waiting or reserved) or the loop's clock reaches
    `deadline`; says whether it emptied. Called once the node has left etcd, so no new work is routed here."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    s = await servicer.stats()
    log.info("%s: left the membership; draining %d running, %d waiting, %d reserved (at most %.1f s)", node_id,
             s.running, s.waiting, s.reserved, max(0.0, deadline - start))
    while True:
        busy = s.running + s.waiting + s.reserved
        if not busy and loop.time() >= min(start + DRAIN_SETTLE_S, deadline):
            log.info("%s: drained in %.1f s", node_id, loop.time() - start)
            return True
        if loop.time() >= deadline:
            log.warning("%s: drain timed out with %d running, %d waiting, %d reserved", node_id, s.running,
                        s.waiting, s.reserved)
            return False
        await asyncio.sleep(DRAIN_POLL_S)  # polling the servicer's counts: it signals no change
        s = await servicer.stats()


class LoadReporter:
    """Re-publishes the node's load when it changes, so that the router picks the least loaded node. A report
    that fails (etcd unreachable, ...) is retried on the next pass; the keep-alive publishes the figures too."""

    def __init__(self, servicer, registration: NodeRegistration) -> None:
        self.servicer = servicer
        self.registration = registration
        self.last: tuple[int, int, int, int] | None = None

    async def report(self) -> None:
        s = await self.servicer.stats()
        load = (s.free_blocks, s.running, s.waiting + s.reserved, s.queued_tokens)
        if load != self.last:
            await self.registration.update_load(free_blocks=load[0], running=load[1], waiting=load[2],
                                                queued_tokens=load[3])
            self.last = load


def run(cfg: NodeConfig) -> None:
    """Process entry point: serves until SIGTERM or SIGINT, then drains. The process ends within the drain
    timeout plus the usual shutdown grace of its first stop signal; a second one ends it at once."""
    run_until_signalled(cfg.node_id, lambda stop: serve(cfg, stop), grace=cfg.drain_timeout + SHUTDOWN_GRACE_S,
                        log_format=cfg.log_format)
