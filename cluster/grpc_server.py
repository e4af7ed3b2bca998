"""A grpc.aio server with what every Baton server carries: health checking and reflection."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from baton.v1 import baton_pb2, node_pb2


class Server:
    """Wraps `grpc.aio.server`: add services, bind, start; `set_serving` flips every service's health."""

    def __init__(self, services: Sequence[tuple[Callable, object, str]]) -> None:
        # services: (add_XServicer_to_server, servicer, full service name)
        self.grpc = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        names = [name for _, _, name in services]
        for add, servicer, _ in services:
            add(servicer, self.grpc)
        reflection.enable_server_reflection(names + [health.SERVICE_NAME, reflection.SERVICE_NAME], self.grpc)
        self.names = names
        self.port = 0

    def bind(self, host: str, port: int) -> str:
        self.port = self.grpc.add_insecure_port(f"{host}:{port}")
        if not self.port:
            raise OSError(f"cannot listen on {host}:{port}")
        return f"{host}:{self.port}"

    async def start(self) -> None:
        await self.grpc.start()

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in [""] + self.names:
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        await self.set_serving(False)
        await self.grpc.stop(grace)


BATON_SERVICE = baton_pb2.DESCRIPTOR.services_by_name["Baton"].full_name
DECODE_SERVICE = node_pb2.DESCRIPTOR.services_by_name["DecodeNode"].full_name
PREFILL_SERVICE = node_pb2.DESCRIPTOR.services_by_name["PrefillNode"].full_name


def run_until_signalled(name: str, serve: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """A server process's entry point: uvloop, logs tagged with `name`, and SIGTERM/SIGINT set the event
    that `serve` waits on, so it can leave the membership and stop cleanly."""
    import uvloop

    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(stop)

    uvloop.run(main())
