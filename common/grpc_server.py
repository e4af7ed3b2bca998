"""A grpc.aio server with what every Baton server carries: health checking, reflection, and INVALID_ARGUMENT
for request bytes that cannot be parsed."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from baton.common import logs
from baton.common.members import MemberGate
from baton.v1 import baton_pb2, node_pb2


class _Undecodable:
    """Stands for a request message whose bytes did not parse; `details` says which message."""

    __slots__ = ("details",)

    def __init__(self, details: str) -> None:
        self.details = details


def _lenient(deserialize: Callable[[bytes], object]) -> Callable[[bytes], object]:
    """`deserialize` that returns an `_Undecodable` instead of raising. grpc.aio answers an exception raised
    while deserializing with UNKNOWN ("Unexpected DecodeError"), and nothing the deserializer can raise
    changes that code: the refusal has to happen later, in the handler, where `context.abort` is at hand."""
    message = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)  # set on Message.FromString
    name = message.full_name if message is not None else "the method's request message"

    def parse(data: bytes) -> object:
        try:
            return deserialize(data)
        except Exception as e:  # DecodeError: random or truncated bytes, or a string that is not UTF-8
            return _Undecodable(f"request: cannot be parsed as {name}: {e}")

    return parse


async def _refuse(request: object, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, _Undecodable):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)


async def _refusing_iterator(requests: AsyncIterator, context: grpc.aio.ServicerContext) -> AsyncIterator:
    """A client stream's messages, ending the call with INVALID_ARGUMENT at the first that did not parse.
    (A handler that reads with `context.read()` instead of its iterator would see the `_Undecodable`; no
    Baton service, health or reflection does.)"""
    async for request in requests:
        await _refuse(request, context)
        yield request


def _with_check(behaviour: Callable, check: Callable[[object, object], Awaitable[object]]) -> Callable | None:
    """`behaviour` called with `await check(request, context)` in place of its request. grpc.aio runs a
    handler according to its kind (async generator, coroutine function, or a plain function in a thread), so
    the wrapper must be of the same kind; None for plain functions, which Baton does not serve."""
    if inspect.isasyncgenfunction(behaviour):
        async def streamed(request, context):
            async with contextlib.aclosing(behaviour(await check(request, context), context)) as responses:
                async for response in responses:  # aclosing: a cancelled call runs its `finally` at once
                    yield response
        return streamed
    if inspect.iscoroutinefunction(behaviour):
        async def awaited(request, context):
            return await behaviour(await check(request, context), context)
        return awaited
    return None


async def _check_unary(request, context):
    await _refuse(request, context)
    return request


async def _check_stream(requests, context):
    return _refusing_iterator(requests, context)


# (request streaming, response streaming) -> the handler's behaviour attribute and its factory.
_KINDS = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Answers request bytes that do not parse as the method's message with INVALID_ARGUMENT, on every
    service of the server (health and reflection included): the handler's deserializer never raises, and its
    behaviour refuses what did not parse before any servicer code runs."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler  # unknown method (UNIMPLEMENTED), or one that takes raw bytes
        attribute, factory = _KINDS[(handler.request_streaming, handler.response_streaming)]
        check = _check_stream if handler.request_streaming else _check_unary
        behaviour = _with_check(getattr(handler, attribute), check)
        if behaviour is None:
            return handler
        return factory(behaviour, request_deserializer=_lenient(handler.request_deserializer),
                       response_serializer=handler.response_serializer)


class Server:
    """Wraps `grpc.aio.server`: add services, bind, start; `set_serving` flips every service's health."""

    def __init__(self, services: Sequence[tuple[Callable, object, str]], member_token: str | None = None) -> None:
        """services: (add_XServicer_to_server, servicer, full service name). With `member_token`, those services
        answer only calls that carry it (members.MemberGate: a node's internal services); health and
        reflection stay open."""
        interceptors: list[grpc.aio.ServerInterceptor] = [MalformedRequestInterceptor()]
        if member_token:
            interceptors.insert(0, MemberGate(member_token, [name for _, _, name in services]))
        self.grpc = grpc.aio.server(options=[("grpc.so_reuseport", 0)], interceptors=interceptors)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        names = [name for _, _, name in services]
        for add, servicer, _ in services:
            add(servicer, self.grpc)
        reflection.enable_server_reflection(names + [health.SERVICE_NAME, reflection.SERVICE_NAME], self.grpc)
        self.names = names
        self.port = 0

    def bind(self, host: str, port: int, tls=None) -> str:
        """Listens on (host, port), with TLS when `tls` (common.tls.TlsFiles) is given."""
        self.port = self.grpc.add_secure_port(f"{host}:{port}", tls.server_credentials()) if tls is not None \
            else self.grpc.add_insecure_port(f"{host}:{port}")
        if not self.port:
            raise OSError(f"cannot listen on {host}:{port}")
        return f"{host}:{self.port}"

    async def start(self) -> None:
        await self.grpc.start()

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in [""] + self.names:
            await self.health.set(name, status)

    async def set_service_serving(self, name: str, serving: bool) -> None:
        """One service's health (a node's internal service while it has, or has not, that role)."""
        await self.health.set(name, health_pb2.HealthCheckResponse.SERVING if serving
                              else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace: float) -> None:
        await self.set_serving(False)
        await self.grpc.stop(grace)


BATON_SERVICE = baton_pb2.DESCRIPTOR.services_by_name["Baton"].full_name
DECODE_SERVICE = node_pb2.DESCRIPTOR.services_by_name["DecodeNode"].full_name
PREFILL_SERVICE = node_pb2.DESCRIPTOR.services_by_name["PrefillNode"].full_name
KV_EVENTS_SERVICE = node_pb2.DESCRIPTOR.services_by_name["KVEvents"].full_name


# Every server process ends within this many seconds of SIGTERM, whatever else is already down (etcd, a peer):
# what its clean-up has not finished by then is cut short, so that no operator or parent waits on it.
SHUTDOWN_GRACE_S = 10.0


def run_until_signalled(name: str, serve: Callable[[asyncio.Event], Awaitable[None]],
                        grace: float = SHUTDOWN_GRACE_S, log_format: str = "text") -> None:
    """A server process's entry point: uvloop, logs tagged with `name` (text or JSON lines, `logs.configure`),
    and SIGTERM/SIGINT set the event that `serve` waits on, so it can leave the membership and stop cleanly. From the first signal on, a
    watchdog thread ends the process after `grace` seconds even if the event loop is stuck; a second signal
    ends it at once."""
    import uvloop

    logs.configure(name, log_format)
    log = logging.getLogger(name)

    def hard_exit(why: str) -> None:
        log.error("%s: exiting now", why)
        logging.shutdown()
        os._exit(1)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stop.is_set():
                hard_exit("second stop signal")
            stop.set()
            watchdog = threading.Timer(grace, hard_exit, args=(f"clean-up still running after {grace:.0f} s",))
            watchdog.daemon = True
            watchdog.start()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        await serve(stop)

    uvloop.run(main())
