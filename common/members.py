"""A cluster closed to outsiders: the nodes' internal services (PrefillNode, DecodeNode, KVEvents) answer only
callers that prove they hold the cluster's secret.

Each internal call carries `x-baton-member: <token>`, the token being HMAC-SHA256(secret, a fixed label): the
secret itself never travels, and a key's digest cannot be made from the token. A node given the secret
(`--cluster-secret-file`) refuses any other call to those services UNAUTHENTICATED (`MemberGate`); health and
reflection stay open for probes. Without TLS the token can be read off the wire and replayed, as a password
could: it keeps out whoever reaches a port, not whoever can watch the network.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

import grpc

MEMBER_METADATA = "x-baton-member"
_LABEL = b"baton internal calls v1"


def member_token(secret: bytes) -> str:
    return hmac.new(secret, _LABEL, hashlib.sha256).hexdigest()


def node_channel(address: str, options=(), credentials: grpc.ChannelCredentials | None = None) -> grpc.aio.Channel:
    """A channel to a node: over mutual TLS with `credentials` (common/tls.py, MemberTls), else plaintext."""
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, options=options)
    return grpc.aio.insecure_channel(address, options=options)


def member_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The metadata an internal call carries (None: none, for an open cluster)."""
    return ((MEMBER_METADATA, token),) if token else None


class _Bound:
    """A stub's method with the member metadata bound: `call(request, timeout=...)` as the method itself."""

    __slots__ = ("_method", "_metadata")

    def __init__(self, method, metadata) -> None:
        self._method, self._metadata = method, metadata

    def __call__(self, *args, **kwargs):
        return self._method(*args, metadata=self._metadata, **kwargs)


class MemberStub:
    """A generated stub whose every call carries the member token (`MemberStub(DecodeNodeStub(ch), token)`);
    with no token, the stub's calls as they are."""

    def __init__(self, stub, token: str | None) -> None:
        self._stub = stub
        self._metadata = member_metadata(token)

    def __getattr__(self, name: str):
        method = getattr(self._stub, name)
        if self._metadata is None:
            return method
        bound = _Bound(method, self._metadata)
        setattr(self, name, bound)  # once per method name
        return bound


async def _refuse_unary(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "not a member of this cluster (no valid cluster token)")


async def _refuse_stream(request, context):
    await _refuse_unary(request, context)
    yield  # never reached: makes this an async generator, as a streaming handler must be


_REFUSALS = {
    (False, False): grpc.unary_unary_rpc_method_handler(_refuse_unary),
    (False, True): grpc.unary_stream_rpc_method_handler(_refuse_stream),
    (True, False): grpc.stream_unary_rpc_method_handler(_refuse_unary),
    (True, True): grpc.stream_stream_rpc_method_handler(_refuse_stream),
}


class MemberGate(grpc.aio.ServerInterceptor):
    """Refuses calls to `services` (full names) that do not carry the member token."""

    def __init__(self, token: str, services: Iterable[str]) -> None:
        self._token = token.encode()
        self._prefixes = tuple(f"/{name}/" for name in services)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._prefixes):
            return handler
        for key, value in handler_call_details.invocation_metadata or ():
            if key == MEMBER_METADATA:
                given = value.encode() if isinstance(value, str) else value
                if hmac.compare_digest(given, self._token):
                    return handler
                break
        return _REFUSALS[(handler.request_streaming, handler.response_streaming)]
