"""The router process: watches membership in etcd and serves the public API until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import aetcd

from baton.common.grpc_server import BATON_SERVICE, Server, run_until_signalled
from baton.common.keys import read_secret
from baton.common.members import member_token
from baton.common.loops import every, retrying
from baton.common.tls import MemberTls, TlsFiles
from baton.common.membership import (MembershipWatcher, NodeRegistration, RouterInfo, close_quietly, etcd_client,
                                     published_address, read_routers)
from baton.engine.checkpoint import resolve_model_path, served_name
from baton.v1 import baton_pb2_grpc, kserve_pb2, kserve_pb2_grpc

from .attempt import DEFAULT_MAX_LOCAL_PREFILL_TOKENS, AttemptSettings
from .auth import KeyStore
from .flow import FlowSettings
from .kserve import KServeServicer
from .models import Models, load_model
from .kv_index import KVIndex
from .ledger import LedgerStore
from .limits import Limiter
from .metrics import RouterMetrics
from .picker import Picker
from .routing import POLICIES, routing
from .moderation import Filters, HttpModeration
from .rules import RuleStore
from .server import RouterServicer

log = logging.getLogger(__name__)

KSERVE_SERVICE = kserve_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


@dataclass(slots=True)
class RouterConfig:
    etcd: str
    model: str = ""  # checkpoint folder (tokenizer and config only: the router loads no weights)
    cluster: str = "default"
    host: str = "127.0.0.1"
    port: int = 0
    lease_ms: int = 30_000  # how long a decode node keeps blocks reserved for a prefill that never comes
    max_prompt_bytes: int = 0  # longest prompt text admitted (UTF-8 bytes); 0: derived from tokenizer and context
    max_migrations: int = 3  # times a stream may resume on other nodes after a node failed under it (0: never)
    inactivity_timeout: float = 10.0  # seconds without a token from a decode node before its stream is moved
    node_wait: float = 5.0  # seconds a request waits for a live node of a role that has none, before UNAVAILABLE
    http_port: int = 0  # the OpenAI-compatible HTTP front's port (0: no HTTP front)
    metrics_port: int = 0  # without an HTTP front, /metrics and /sd on this port (0: a free one); else on its port
    router_id: str = ""  # its record's name in etcd; "" -> router-<its published gRPC address>
    # The name clients and scrapers dial, published in its record; "": --host, or this machine's address when
    # --host is a wildcard (as a node's).
    advertise_host: str = ""
    chat_template: str = ""  # a Jinja chat template file, in place of the checkpoint's
    served_model_name: str = ""  # the given model's name (its nodes register the same); "" -> served_name
    log_format: str = "text"  # or "json": one JSON object per line
    routing: str = "kv"  # how nodes are chosen: "kv" (where the prefix lives), "least-loaded" or "round-robin"
    max_local_prefill_tokens: int = DEFAULT_MAX_LOCAL_PREFILL_TOKENS  # see AttemptSettings
    auth: bool = False  # every public call needs an API key (auth.py)
    # The cluster's secret: the keys' HMACs are made with it, and the nodes of a closed cluster answer calls
    # made with it (common/members.py). "": an open cluster.
    cluster_secret_file: str = ""
    limits_fail_open: bool = False  # etcd out of reach when a key's budget is needed: admit (else UNAVAILABLE)
    flow: FlowSettings = field(default_factory=FlowSettings)  # the queue before the nodes (flow.py)
    flag_addresses: int = 20  # a key used from more client addresses in 10 minutes is flagged (usage.py)
    stall_timeout: float = 30.0  # seconds a client may read nothing before its stream is cancelled
    tls_cert: str = ""  # with tls_key: the public fronts (gRPC and OpenAI HTTP) answer TLS only
    tls_key: str = ""
    moderation_url: str = ""  # an external moderation service for prompts (moderation.py); "": none
    moderation_fail_open: bool = False  # it cannot answer: admit the prompt unscreened (else UNAVAILABLE)
    moderation_timeout: float = 2.0
    # Mutual TLS to the nodes (common/tls.py): this router's member certificate and key, and the cluster's CA.
    mtls_cert: str = ""
    mtls_key: str = ""
    mtls_ca: str = ""

    def __post_init__(self) -> None:
        if self.max_migrations < 0:
            raise ValueError(f"max_migrations: must be >= 0, got {self.max_migrations}")
        if not self.inactivity_timeout > 0:
            raise ValueError(f"stream_inactivity_timeout: must be > 0 seconds, got {self.inactivity_timeout}")
        if not self.node_wait >= 0:
            raise ValueError(f"node_wait: must be >= 0 seconds, got {self.node_wait}")
        if self.max_local_prefill_tokens < 0:
            raise ValueError(f"max_local_prefill_tokens: must be >= 0, got {self.max_local_prefill_tokens}")
        if len({bool(self.mtls_cert), bool(self.mtls_key), bool(self.mtls_ca)}) > 1:
            raise ValueError("mtls_cert: give --mtls-cert, --mtls-key and --mtls-ca together, or none")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert: give both --tls-cert and --tls-key, or neither")
        if not self.moderation_timeout > 0:
            raise ValueError(f"moderation_timeout: must be > 0 seconds, got {self.moderation_timeout}")
        if not self.stall_timeout > 0:
            raise ValueError(f"stall_timeout: must be > 0 seconds, got {self.stall_timeout}")
        if self.routing not in POLICIES:
            raise ValueError(f"routing: must be one of {', '.join(POLICIES)}, got {self.routing!r}")
        if self.auth and not self.cluster_secret_file:
            raise ValueError("cluster_secret_file: --auth needs the cluster's secret (--cluster-secret-file)")


async def scrape_targets(membership: MembershipWatcher, etcd: aetcd.Client, cluster: str) -> list[dict]:
    """Every live node's and router's metrics target, in Prometheus' HTTP service-discovery format."""
    targets = [{"targets": [n.metrics_address], "labels": {"cluster": cluster, "role": n.role, "node": n.node_id}}
               for n in membership.nodes() if n.metrics_address]
    try:
        routers = await read_routers(etcd, cluster)
    except aetcd.ClientError as e:  # etcd down: the nodes the watch still knows are listed
        log.warning("service discovery: the routers cannot be read from etcd: %s", e)
        routers = []
    return targets + [{"targets": [r.metrics_address], "labels": {"cluster": cluster, "role": "router",
                                                                   "node": r.router_id}}
                      for r in routers if r.metrics_address]


async def follow_readiness(server: Server, picker: Picker) -> None:
    """Health says SERVING only while the router has a live node of every role it needs (a prefill and a
    decode node, or a colocated one), NOT_SERVING otherwise: what a readiness probe or a client that waits
    for SERVING before sending expects. Re-checked on every membership change."""
    membership = picker.membership
    serving = None
    while True:
        version = membership.version
        ready = picker.ready()
        if ready != serving:
            await server.set_serving(ready)
            log.info("health: %s", "SERVING" if ready else "NOT_SERVING (no live node of a needed role)")
            serving = ready
        with contextlib.suppress(TimeoutError):
            await membership.wait_for(lambda: membership.version != version, 5.0)


async def serve(cfg: RouterConfig, stop: asyncio.Event, on_ready=None) -> None:
    folder = resolve_model_path(cfg.model)
    membership = await retrying(lambda: MembershipWatcher.start(cfg.etcd, cfg.cluster), (aetcd.ClientError,), 60.0,
                                "watching the membership")
    # With the cluster's secret the router calls the nodes as a member (common/members.py).
    secret = read_secret(cfg.cluster_secret_file) if cfg.cluster_secret_file else None
    token = member_token(secret) if secret is not None else None
    credentials = MemberTls(cfg.mtls_cert, cfg.mtls_key, cfg.mtls_ca).channel_credentials() if cfg.mtls_cert else None
    # KV-aware routing reads the nodes' prefix caches from their KV events (kv_index.py).
    index = KVIndex(membership, lambda node_id, cause: metrics.kv_resyncs.labels(cause).inc(), token,
                    credentials) if cfg.routing == "kv" else None
    metrics = RouterMetrics(membership.nodes, index.sizes if index is not None else dict)
    if index is not None:
        index.start()
    picker = Picker(membership, routing=routing(cfg.routing, index))
    # The model it is given is loaded now (its nodes register the same name); the others as nodes show them.
    given = load_model(folder, cfg.served_model_name or served_name(folder), cfg.max_prompt_bytes,
                       cfg.chat_template)
    models = Models(membership, [given])
    settings = AttemptSettings(cfg.lease_ms, cfg.max_migrations, cfg.inactivity_timeout, cfg.node_wait,
                               cfg.max_local_prefill_tokens, token, credentials)
    keys = None
    if cfg.auth:  # the keys as etcd holds them, followed live (a revocation counts at once)
        keys = await retrying(lambda: KeyStore.start(cfg.etcd, cfg.cluster, secret), (aetcd.ClientError,), 60.0,
                              "reading the API keys")
    # Content rules apply with or without keys (global ones), followed live.
    rules = await retrying(lambda: RuleStore.start(cfg.etcd, cfg.cluster), (aetcd.ClientError,), 60.0,
                           "reading the content rules")
    moderation = HttpModeration(cfg.moderation_url, fail_open=cfg.moderation_fail_open,
                                timeout=cfg.moderation_timeout) if cfg.moderation_url else None
    filters = Filters([rules, moderation]) if moderation is not None else rules
    servicer = RouterServicer(models, picker, settings, metrics, keys, cfg.flow, filters, cfg.flag_addresses,
                              cfg.stall_timeout)
    server = Server([(baton_pb2_grpc.add_BatonServicer_to_server, servicer, BATON_SERVICE),
                     (kserve_pb2_grpc.add_GRPCInferenceServiceServicer_to_server, KServeServicer(servicer),
                      KSERVE_SERVICE)])
    readiness = http = registration = publishing = None
    following = asyncio.create_task(every(1.0, models.follow, "models"))
    placing = asyncio.create_task(every(1.0, lambda: servicer.flow.follow(membership), "queue"))
    etcd = etcd_client(cfg.etcd, timeout=2.0)  # service discovery's reads of the routers
    try:
        tls = TlsFiles(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else None
        address = server.bind(cfg.host, cfg.port, tls)
        public = published_address(address, cfg.advertise_host)
        router_id = cfg.router_id or f"router-{public}"
        if keys is not None:  # the keys' limits, shared with the other routers through etcd (limits.py)
            servicer.limiter = Limiter(LedgerStore(cfg.etcd, cfg.cluster, router_id),
                                       fail_open=cfg.limits_fail_open, on_refusal=metrics.key_refused)
            servicer.limiter.start()
        # Bound before gRPC serves: a port in use stops the router before it takes requests. Without the
        # OpenAI front, the same server with only /health, /metrics and /sd serves the metrics.
        http_address = ""
        try:
            from .openai_http import OpenAIFront, start_http  # aiohttp and jinja2 (a GPU image may lack them)
        except ImportError as e:
            if cfg.http_port:
                raise
            log.warning("no metrics endpoint: %s", e)
        else:
            front = OpenAIFront(servicer, lambda: scrape_targets(membership, etcd, cfg.cluster))
            # With TLS, HTTPS too (the OpenAI front, and /metrics with it: scrapers need the issuer then).
            http, http_address = await start_http(front, cfg.host, cfg.http_port or cfg.metrics_port,
                                                  openai=bool(cfg.http_port),
                                                  ssl_context=tls.ssl_context() if tls and cfg.http_port else None)
            if cfg.http_port:
                log.info("OpenAI-compatible HTTP on http://%s", http_address)
            else:
                log.info("metrics on http://%s/metrics", http_address)
        await server.set_serving(False)  # before the port opens: nothing may see SERVING without nodes
        await server.start()
        readiness = asyncio.create_task(every(1.0, lambda: follow_readiness(server, picker), "readiness"))
        http_public = published_address(http_address, cfg.advertise_host) if http_address else ""
        info = RouterInfo(router_id, public, http_public if cfg.http_port else "", http_public)
        registration = await retrying(lambda: NodeRegistration.register(cfg.etcd, cfg.cluster, info),
                                      (aetcd.ClientError,), 60.0, "registering the router")
        if keys is not None:  # the client addresses each key was used from, for `baton keys usage`
            publishing = asyncio.create_task(every(5.0, lambda: servicer.usage.publish(etcd, cfg.cluster, router_id),
                                                   "key usage", transient=(aetcd.ClientError,)))
        log.info("router listening on %s", address)
        if on_ready is not None:
            on_ready(address)
        await stop.wait()
        readiness.cancel()
        await server.stop(grace=2.0)
    finally:
        following.cancel()
        placing.cancel()
        if publishing is not None:
            publishing.cancel()
        if readiness is not None:
            readiness.cancel()
        if registration is not None:
            await registration.close()  # gone from etcd at once
        await close_quietly(etcd)
        if http is not None:
            await http.cleanup()
        await servicer.close()
        if servicer.limiter is not None:
            await servicer.limiter.close()  # its slices back to the pool at once
        if index is not None:
            await index.close()
        if keys is not None:
            await keys.close()
        await rules.close()
        if moderation is not None:
            await moderation.close()
        await membership.close()


def run(cfg: RouterConfig) -> None:
    """Process entry point: serves until SIGTERM or SIGINT."""
    run_until_signalled("router", lambda stop: serve(cfg, stop), log_format=cfg.log_format)
