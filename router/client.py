"""A small client for a Baton router (the public `baton.v1.Baton` service), sync and asyncio.

    from baton.router.client import AsyncBatonClient, BatonClient, Delta

    with BatonClient("localhost:50051", timeout=60) as client:
        for item in client.generate("Once upon a time", max_tokens=32, temperature=0):
            if isinstance(item, Delta):
                print(item.text, end="", flush=True)
            else:  # the last item is one Finished
                print(f"\\n[{item.finish_reason}, {item.completion_tokens} tokens]")
        done = client.complete("The dog", max_tokens=8)  # done.text, .token_ids, .finished.finish_reason

    async with AsyncBatonClient("localhost:50051") as client, \\
            contextlib.aclosing(client.generate([1, 2, 3], seed=7)) as stream:
        async for item in stream:
            ...  # leaving the block early (or cancelling the task) cancels the gRPC call

Unset options take the server's defaults. Failures raise BatonError subclasses named after the gRPC status.

Several routers: `BatonClient("host1:50051,host2:50051")` (or a list) sends to the first until a stream fails
UNAVAILABLE (its router died, or could not be reached), then resumes that stream on the next one: it sends the
request again with the tokens it already has (`GenerateRequest.resume`), and the stream goes on from the next
index, the same tokens an undisturbed run gives. So that any router can resume it, every request goes out
with a request id and, when sampled, a seed (drawn here when not given). A stream whose Finish came is whole:
its router failing before the call's status is not an error. Both clients drive one `_Stream` (the state of a
stream across routers: what to send next, what came back, whether to go on); their generate() loops only
make the calls, one blocking, one awaited.
"""

import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Self, TypedDict, Unpack

import grpc

from baton.common.tls import client_credentials
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc


class BatonError(Exception):
    """A failed call: `code` is the grpc.StatusCode, `details` the server's message."""
    status: grpc.StatusCode | None = None  # the code a subclass stands for

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class InvalidArgument(BatonError):
    """A request field out of range; `field` names it (the server's details read "<field>: <message>")."""
    status = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        m = re.match(r"\s*([\w.\[\]]+)\s*:", details)
        self.field = m.group(1) if m else ""


class NotFound(BatonError): status = grpc.StatusCode.NOT_FOUND                    # e.g. an unknown model
class ResourceExhausted(BatonError): status = grpc.StatusCode.RESOURCE_EXHAUSTED  # no room for the request
class Unavailable(BatonError): status = grpc.StatusCode.UNAVAILABLE              # router or nodes down
class DeadlineExceeded(BatonError): status = grpc.StatusCode.DEADLINE_EXCEEDED
class Cancelled(BatonError): status = grpc.StatusCode.CANCELLED
class Unauthenticated(BatonError): status = grpc.StatusCode.UNAUTHENTICATED      # no key, or not a valid one
class PermissionDenied(BatonError): status = grpc.StatusCode.PERMISSION_DENIED   # the key may not do that


_ERRORS: dict[grpc.StatusCode, type[BatonError]] = {c.status: c for c in BatonError.__subclasses__()}


@contextmanager
def _errors(call: Any = None) -> Iterator[None]:
    """Raises gRPC failures as BatonErrors; cancels `call` on the way out (a no-op once it has ended)."""
    try:
        yield
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
        raise _ERRORS.get(code, BatonError)(code, details) from e
    finally:
        if call is not None:
            call.cancel()


@dataclass(slots=True, frozen=True)
class Delta:
    """New tokens of one request; `index` is the position of token_ids[0] among the generated tokens."""
    request_id: str
    index: int
    token_ids: list[int]
    text: str
    logprobs: list[float]  # one per token when requested with logprobs=True, else empty


@dataclass(slots=True, frozen=True)
class Finished:
    """The end of a request. finish_reason: "length", "stop", "eos" or "cancelled"."""
    request_id: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float
    e2e_ms: float
    prefill_node: str
    decode_node: str


@dataclass(slots=True, frozen=True)
class Completion:
    """What complete() returns: the whole generated text and tokens, and how the request ended."""
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finished: Finished


class GenerateOptions(TypedDict, total=False):
    """generate()'s keyword options, default in brackets; SamplingParams in baton.proto gives the ranges."""
    max_tokens: int | None       # [None: the server's, 16]
    temperature: float | None    # [None: 1.0]; 0 is greedy
    top_p: float | None          # [None: 1.0]
    top_k: int                   # [0: off]
    seed: int | None             # [None: random]
    stop: str | Sequence[str]    # [()]
    stop_token_ids: Sequence[int]  # [()]
    ignore_eos: bool             # [False]
    include_stop_str_in_output: bool  # [False]
    presence_penalty: float      # [0.0]
    frequency_penalty: float     # [0.0]
    repetition_penalty: float    # [1.0]
    min_p: float                 # [0.0: off]
    min_tokens: int              # [0]
    logprobs: bool               # [False]
    request_id: str              # [""]: the router makes one
    model: str                   # [""]: the cluster's model


def _request(prompt: str | Sequence[int], options: GenerateOptions) -> pb.GenerateRequest:
    sampling = dict(options)
    request_id, model = sampling.pop("request_id", ""), sampling.pop("model", "")
    if isinstance(sampling.get("stop"), str):  # one stop string, not its characters
        sampling["stop"] = [sampling["stop"]]
    req = pb.GenerateRequest(request_id=request_id, model=model, sampling=pb.SamplingParams(**sampling))
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


def _resumable(req: pb.GenerateRequest) -> pb.GenerateRequest:
    """`req` with what another router needs to resume it: an id, and a seed unless it is greedy."""
    if not req.request_id:
        req.request_id = uuid.uuid4().hex
    greedy = req.sampling.HasField("temperature") and req.sampling.temperature == 0
    if not greedy and not req.sampling.HasField("seed"):
        req.sampling.seed = random.getrandbits(63)
    return req


class _Stream:
    """One generate() call across routers: what it sends, what came back, and whether it goes on.

    States: calling (a call to `client`'s current router is open) → resuming (it failed UNAVAILABLE before its
    Finish: the next call goes to the next router, with what came back as `req.resume`) → calling ...; and
    done (the Finish came and the call ended, or its router died just after the Finish), or raised (any other
    failure, or no resume left). The sync and the async generate() are thin loops over it: `stub` for each
    call, `take` for each response, `failed` or `ended` when the call is over.
    """

    def __init__(self, client: "_Client", req: pb.GenerateRequest, timeout: float | None) -> None:
        self.client = client
        self.req = req
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.resumes_left = client.resumes
        self.finished = False  # the Finish came
        self.done = False

    def stub(self) -> baton_pb2_grpc.BatonStub | None:
        """The router to call next, None once the stream is done."""
        return None if self.done else self.client._stub

    def timeout(self) -> float | None:
        """What is left of the whole stream's deadline, for the next call."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def take(self, resp: pb.GenerateResponse) -> Delta | Finished:
        """A response as the caller sees it; its tokens and text join what a resumed call says it has."""
        item = _item(resp)
        if isinstance(item, Delta):
            self.req.resume.token_ids.extend(item.token_ids)
            self.req.resume.text_chars += len(item.text)
        else:
            self.finished = True
        return item

    def ended(self) -> None:
        """The call ended with an OK status: the stream is done, if its Finish came."""
        if not self.finished:
            raise BatonError(grpc.StatusCode.INTERNAL, "the Generate stream ended without a Finish")
        self.done = True

    def failed(self, stub: baton_pb2_grpc.BatonStub, error: BatonError) -> None:
        """The call through `stub` failed with `error`: raises it, unless the stream is whole or goes on."""
        if error.code != grpc.StatusCode.UNAVAILABLE:
            raise error
        if self.finished:  # its router went away after the Finish, before the status: nothing is missing
            self.done = True
        elif self.resumes_left:
            self.resumes_left -= 1
            self.client._fail_over(stub)
        else:
            raise error


_REASONS = {value: name.removeprefix("FINISH_REASON_").lower() for name, value in pb.FinishReason.items()}


def _item(resp: pb.GenerateResponse) -> Delta | Finished:
    if (kind := resp.WhichOneof("kind")) == "chunk":
        c = resp.chunk
        return Delta(resp.request_id, c.index, list(c.token_ids), c.text, list(c.logprobs))
    if kind == "finish":
        u, reason = resp.finish.usage, _REASONS.get(resp.finish.reason, "unspecified")
        return Finished(resp.request_id, reason, u.prompt_tokens, u.completion_tokens, u.ttft_ms, u.e2e_ms,
                        u.prefill_node, u.decode_node)
    raise BatonError(grpc.StatusCode.INTERNAL, "a GenerateResponse with neither chunk nor finish")


def _completion(items: list[Delta | Finished]) -> Completion:
    deltas = [d for d in items if isinstance(d, Delta)]
    return Completion("".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids],
                      [p for d in deltas for p in d.logprobs], finished=items[-1])  # type: ignore[arg-type]


class _Client:
    _open: Any  # the channel factory

    def __init__(self, target: str | Sequence[str], *, timeout: float | None = None,
                 resumes: int | None = None, api_key: str | None = None, tls: bool | str = False) -> None:
        """`target`: a router's host:port, or several (a list, or comma-separated). `resumes`: how many times one
        stream may move to another router [None: once per other router; 0: never]. `api_key`: sent with every
        call (`Authorization: Bearer`), for routers started with `--auth`. `tls`: for routers started with
        `--tls-cert`: True trusts the system's roots, a path the issuers in that PEM file."""
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        targets = [t.strip() for t in target.split(",")] if isinstance(target, str) else list(target)
        if not targets or not all(targets):
            raise ValueError(f"target: one or more host:port, got {target!r}")
        self.timeout = timeout
        self.resumes = len(targets) - 1 if resumes is None else resumes
        self._channels = [self._open(t, client_credentials(tls)) if tls else self._open(t) for t in targets]
        self._stubs = [baton_pb2_grpc.BatonStub(c) for c in self._channels]
        self._current = 0  # the router calls go to, until one fails

    @property
    def _stub(self) -> baton_pb2_grpc.BatonStub:
        return self._stubs[self._current]

    def _fail_over(self, failed: baton_pb2_grpc.BatonStub) -> None:
        if self._stub is failed:  # other streams may have moved on already
            self._current = (self._current + 1) % len(self._stubs)

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


class BatonClient(_Client):
    """Blocking client over a grpc channel; use it in a `with` block or close() it. `timeout` is every call's
    deadline in seconds (None: none), unless the call passes its own."""
    _open = staticmethod(lambda target, credentials=None: grpc.secure_channel(target, credentials)
                         if credentials is not None else grpc.insecure_channel(target))

    def generate(self, prompt: str | Sequence[int], *, timeout: float | None = None,
                 **options: Unpack[GenerateOptions]) -> Iterator[Delta | Finished]:
        """Yields a Delta per chunk as the stream arrives, then one Finished. The prompt is a text or token
        ids. Closing the generator early (e.g. breaking out of a for loop over it) cancels the call. A stream
        whose router fails goes on through another one, if the client has several."""
        stream = _Stream(self, _resumable(_request(prompt, options)), self._deadline(timeout))
        while (stub := stream.stub()) is not None:
            call = stub.Generate(stream.req, timeout=stream.timeout(), metadata=self._metadata)
            try:
                with _errors(call):  # left early (closed, cancelled, failed): the call is cancelled
                    for resp in call:  # to the end of the stream (its status), not just to the Finish
                        yield stream.take(resp)
            except BatonError as e:
                stream.failed(stub, e)
            else:
                stream.ended()

    def complete(self, prompt: str | Sequence[int], *, timeout: float | None = None,
                 **options: Unpack[GenerateOptions]) -> Completion:
        return _completion(list(self.generate(prompt, timeout=timeout, **options)))

    def list_models(self, *, timeout: float | None = None) -> list[pb.ModelInfo]:
        """The served models, as baton.v1 ModelInfo messages (id, architecture, max_model_len, ...)."""
        with _errors():
            return list(self._stub.ListModels(pb.ListModelsRequest(), timeout=self._deadline(timeout),
                                         metadata=self._metadata).models)

    def tokenize(self, text: str, add_special_tokens: bool = True, *, model: str = "",
                 timeout: float | None = None) -> list[int]:
        req = pb.TokenizeRequest(model=model, text=text, add_special_tokens=add_special_tokens)
        with _errors():
            return list(self._stub.Tokenize(req, timeout=self._deadline(timeout), metadata=self._metadata).token_ids)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncBatonClient(_Client):
    """asyncio client over a grpc.aio channel: BatonClient's calls, awaited; `async with` it."""
    _open = staticmethod(lambda target, credentials=None: grpc.aio.secure_channel(target, credentials)
                         if credentials is not None else grpc.aio.insecure_channel(target))

    async def generate(self, prompt: str | Sequence[int], *, timeout: float | None = None,
                       **options: Unpack[GenerateOptions]) -> AsyncIterator[Delta | Finished]:
        """Async generator of Deltas, then one Finished. Cancelling the consuming task, or closing the
        generator early (aclose(), contextlib.aclosing), cancels the gRPC call. A stream whose router fails
        goes on through another one, if the client has several."""
        stream = _Stream(self, _resumable(_request(prompt, options)), self._deadline(timeout))
        while (stub := stream.stub()) is not None:
            call = stub.Generate(stream.req, timeout=stream.timeout(), metadata=self._metadata)
            try:
                with _errors(call):
                    async for resp in call:
                        yield stream.take(resp)
            except BatonError as e:
                stream.failed(stub, e)
            else:
                stream.ended()

    async def complete(self, prompt: str | Sequence[int], *, timeout: float | None = None,
                       **options: Unpack[GenerateOptions]) -> Completion:
        return _completion([item async for item in self.generate(prompt, timeout=timeout, **options)])

    async def list_models(self, *, timeout: float | None = None) -> list[pb.ModelInfo]:
        with _errors():
            resp = await self._stub.ListModels(pb.ListModelsRequest(), timeout=self._deadline(timeout),
                                         metadata=self._metadata)
        return list(resp.models)

    async def tokenize(self, text: str, add_special_tokens: bool = True, *, model: str = "",
                       timeout: float | None = None) -> list[int]:
        req = pb.TokenizeRequest(model=model, text=text, add_special_tokens=add_special_tokens)
        with _errors():
            resp = await self._stub.Tokenize(req, timeout=self._deadline(timeout), metadata=self._metadata)
        return list(resp.token_ids)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
