"""The router process: watches membership in etcd and serves the public API until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from baton.cluster.grpc_server import BATON_SERVICE, Server, run_until_signalled
from baton.cluster.membership import MembershipWatcher
from baton.engine.config import ModelConfig
from baton.engine.loader import DEFAULT_MODEL, resolve_model_path
from baton.engine.tokenizer import Tokenizer
from baton.v1 import baton_pb2_grpc

from .admission import ModelCard
from .picker import Picker
from .server import RouterServicer

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RouterConfig:
    etcd: str
    model: str = ""  # checkpoint folder (tokenizer and config only: the router loads no weights)
    cluster: str = "default"
    host: str = "127.0.0.1"
    port: int = 0
    lease_ms: int = 30_000  # how long a decode node keeps blocks reserved for a prefill that never comes


def model_card(folder, name: str | None = None) -> ModelCard:
    cfg = ModelConfig.from_folder(folder)
    model_id = name or ("stories260K" if folder == DEFAULT_MODEL else folder.name)
    return ModelCard(model_id, cfg.architecture, cfg.max_model_len, cfg.vocab_size, cfg.dtype)


async def serve(cfg: RouterConfig, stop: asyncio.Event, on_ready=None) -> None:
    folder = resolve_model_path(cfg.model)
    membership = await MembershipWatcher.start(cfg.etcd, cfg.cluster)
    servicer = RouterServicer(model_card(folder), Tokenizer.from_folder(folder), Picker(membership), cfg.lease_ms)
    server = Server([(baton_pb2_grpc.add_BatonServicer_to_server, servicer, BATON_SERVICE)])
    try:
        address = server.bind(cfg.host, cfg.port)
        await server.start()
        await server.set_serving(True)
        log.info("router serving on %s", address)
        if on_ready is not None:
            on_ready(address)
        await stop.wait()
        await server.stop(grace=2.0)
    finally:
        await servicer.close()
        await membership.close()


def run(cfg: RouterConfig) -> None:
    """Process entry point: serves until SIGTERM or SIGINT."""
    run_until_signalled("router", lambda stop: serve(cfg, stop))
