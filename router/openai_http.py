"""The OpenAI-compatible HTTP front, served by aiohttp on the router's event loop beside its gRPC server.

Each call becomes baton.v1 `GenerateRequest`s (one per prompt and choice) and goes through the router's own
admission and serving (`RouterServicer.admit` / `serve_choices`: a prompt's n choices share its prefill): nothing about a request is decided here that the
gRPC front decides differently. What is here is the translation, both ways: OpenAI's fields to baton.v1's,
and the node responses to OpenAI's objects and server-sent events. A client that disconnects cancels its
handler (aiohttp's handler cancellation), which cancels its requests on every node.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
from aiohttp import web

from baton.common.keys import KeyRecord
from baton.engine import InvalidRequest
from baton.engine.request import MAX_TOP_LOGPROBS
from baton.v1 import baton_pb2 as pb

from .admission import check_text_size
from .fields import FINISH_REASONS as _FINISH
from .fields import INT32_MAX, get, integer, sampling
from .admission import UnknownModel
from .auth import bearer
from .chat import parse_messages
from .models import ServedModel
from .server import NoDeadline, Refused, RouterServicer, Stalled

log = logging.getLogger(__name__)

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 429: "rate_limit_error"}
# OpenAI parameters that change the output and that Baton does not serve: refused, never ignored. Other
# unknown fields are ignored, as OpenAI-compatible servers do.
_UNSERVED = {"echo": False, "suffix": None, "best_of": None, "logit_bias": None, "tools": None,
             "response_format": None, "functions": None}


class HttpError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after  # seconds: sent as a Retry-After header (429, 503)


def _refused(e: Refused, rename: dict[str, str] | None = None) -> HttpError:
    status = _HTTP_STATUS.get(e.code, 500)
    param = (rename or {}).get(e.field, e.field) if e.field else None
    message = e.message
    if param and e.field and param != e.field and message.startswith(f"{e.field}:"):
        message = f"{param}:{message[len(e.field) + 1:]}"
    return HttpError(status, message, param, "model_not_found" if status == 404 else None, e.retry_after)


def _error_body(e: HttpError) -> dict:
    return {"error": {"message": e.message, "type": _ERROR_TYPE.get(e.status, "server_error"), "param": e.param,
                      "code": e.code}}


def _check_unserved(body: dict) -> None:
    for name, default in _UNSERVED.items():
        if body.get(name, default) not in (default, None, [], {}):
            raise InvalidRequest(name, "is not served by Baton")


def _prompts(body: dict) -> list[pb.GenerateRequest]:
    """`prompt`: a string, a list of strings, token ids, or a list of token-id lists."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [pb.GenerateRequest(text=prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [pb.GenerateRequest(text=p) for p in prompt]
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [_token_prompt(prompt)]
        if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
               for p in prompt):
            return [_token_prompt(p) for p in prompt]
    raise InvalidRequest("prompt", "must be a non-empty string, list of strings, list of token ids, or list of "
                                   "token-id lists")


def _token_prompt(ids: list[int]) -> pb.GenerateRequest:
    if any(not 0 <= t <= INT32_MAX for t in ids):
        raise InvalidRequest("prompt", "token ids must be non-negative 32-bit integers")
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids))


@dataclass(slots=True)
class _Call:
    """One OpenAI call as the router serves it: its requests (prompt-major, then choice), their field names."""

    id: str
    model: str
    served: ServedModel
    created: int
    chat: bool
    requests: list[pb.GenerateRequest]
    n: int
    logprobs: bool
    stream: bool
    include_usage: bool
    rename: dict[str, str]  # baton.v1 field -> the OpenAI field a client set


# ---- the front -----------------------------------------------------------------------------------------------

class OpenAIFront:
    def __init__(self, router: RouterServicer,
                 sd_targets: Callable[[], Awaitable[list[dict]]] | None = None) -> None:
        self.router = router
        self.created = int(time.time())
        self.sd_targets = sd_targets

    def app(self, openai: bool = True) -> web.Application:
        """The whole front, or (`openai=False`) only what operators use: /health, /metrics and /sd."""
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_get("/health", self.health)
        if openai:
            app.router.add_get("/v1/models", self.models)
            app.router.add_post("/v1/completions", self.completions)
            app.router.add_post("/v1/chat/completions", self.chat_completions)
            app.router.add_post("/tokenize", self.tokenize)
            app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/metrics", self.metrics)
        if self.sd_targets is not None:
            app.router.add_get("/sd", self.service_discovery)
        return app

    # -- small endpoints --

    async def health(self, request: web.Request) -> web.Response:
        ready = self.router.picker.ready()
        return web.Response(status=200 if ready else 503, text="" if ready else "no live node of a needed role")

    async def models(self, request: web.Request) -> web.Response:
        try:
            key = self.router.authenticate(bearer(request.headers.get("Authorization")))
        except Refused as e:
            error = _refused(e)
            return web.json_response(_error_body(error), status=error.status)
        aliases = self.router.models.aliases()
        return web.json_response({"object": "list", "data": [
            {"id": m.name, "object": "model", "created": self.created, "owned_by": "baton",
             "max_model_len": m.card.max_model_len, "root": m.name, "parent": None,
             "aliases": sorted(aliases.get(m.name, ()))} for m in self.router.live_models(key)]})

    async def metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.router.metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def service_discovery(self, request: web.Request) -> web.Response:
        return web.json_response(await self.sd_targets())

    async def tokenize(self, request: web.Request) -> web.Response:
        return await self._guarded(request, self._tokenize)

    async def detokenize(self, request: web.Request) -> web.Response:
        return await self._guarded(request, self._detokenize)

    async def _tokenize(self, request: web.Request, body: dict) -> web.Response:
        model = self._model(body, request["key"])
        special = get(body, "add_special_tokens", (bool,), "a boolean")
        if "messages" in body:
            text = self._render(body, model, bool(get(body, "add_generation_prompt", (bool,), "a boolean") or False))
            ids = self._encode("messages", text, bool(special), model)  # a template writes its special tokens
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise InvalidRequest("prompt", "must be a string (or send messages)")
            ids = self._encode("prompt", prompt, True if special is None else special, model)
        return web.json_response({"count": len(ids), "max_model_len": model.card.max_model_len,
                                  "tokens": ids, "token_strs": None})

    async def _detokenize(self, request: web.Request, body: dict) -> web.Response:
        model = self._model(body, request["key"])
        tokens = body.get("tokens")
        vocab = model.card.vocab_size
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and
                                                   0 <= t < vocab for t in tokens):
            raise InvalidRequest("tokens", f"must be a list of token ids in [0, {vocab})")
        return web.json_response({"prompt": model.tokenizer.decode(tokens)})

    # -- generation --

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._guarded(request, lambda r, body: self._generate(r, self._completion_call(r, body)))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._guarded(request, lambda r, body: self._generate(r, self._chat_call(r, body)))

    async def _guarded(self, request: web.Request, handle) -> web.StreamResponse:
        """Runs a handler on the request's JSON body, once the caller's key (with `--auth`) is checked: every
        refusal becomes OpenAI's error object."""
        try:
            request["key"] = self.router.authenticate(bearer(request.headers.get("Authorization")))
            try:
                body = await request.json(loads=json.loads)
            except (ValueError, UnicodeDecodeError) as e:
                raise HttpError(400, f"the body is not valid JSON: {e}") from None
            if not isinstance(body, dict):
                raise HttpError(400, "the body must be a JSON object")
            return await handle(request, body)
        except InvalidRequest as e:
            error = HttpError(400, str(e), e.field)
        except Refused as e:
            error = _refused(e)
        except HttpError as e:
            error = e
        headers = {"Retry-After": str(max(1, round(error.retry_after)))} if error.retry_after is not None else None
        return web.json_response(_error_body(error), status=error.status, headers=headers)

    def _model(self, body: dict, key: KeyRecord | None) -> ServedModel:
        """The model the body names, if the caller's key may use it."""
        name = body.get("model")
        if name is not None and not isinstance(name, str):
            raise InvalidRequest("model", "must be a string")
        try:
            model = self.router.models.resolve(name or "")
        except UnknownModel as e:
            raise HttpError(404, str(e), "model", "model_not_found") from None
        self.router.authorize(key, model.name)
        return model

    @staticmethod
    def _encode(field: str, text: str, special: bool, model: ServedModel) -> list[int]:
        check_text_size(field, text, model.card)
        return model.tokenizer.encode(text, special)

    @staticmethod
    def _render(body: dict, model: ServedModel, add_generation_prompt: bool = True) -> str:
        if model.template is None:
            raise InvalidRequest("messages", f"model {model.name!r} has no chat template (none in its checkpoint; "
                                             "give one with --chat-template)")
        return model.template.render(parse_messages(body.get("messages")), add_generation_prompt)

    def _common(self, request: web.Request, body: dict) -> tuple[str, ServedModel, int, bool, bool]:
        _check_unserved(body)
        model = self._model(body, request["key"])
        n = integer(body, "n", 1, 128) or 1
        stream = bool(get(body, "stream", (bool,), "a boolean"))
        options = get(body, "stream_options", (dict,), "an object") or {}
        include_usage = bool(get(options, "include_usage", (bool,), "a boolean"))
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        request["request_id"] = rid  # echoed in the response's x-request-id header
        return rid, model, n, stream, include_usage

    def _completion_call(self, request: web.Request, body: dict) -> _Call:
        rid, model, n, stream, include_usage = self._common(request, body)
        logprobs = integer(body, "logprobs", 0, MAX_TOP_LOGPROBS)  # the legacy API's: how many alternatives
        params = sampling(body)
        params.logprobs = logprobs is not None
        params.top_logprobs = logprobs or 0
        requests = _prompts(body)
        return self._call(f"cmpl-{rid}", model, False, requests, params, n, stream, include_usage, {})

    def _chat_call(self, request: web.Request, body: dict) -> _Call:
        rid, model, n, stream, include_usage = self._common(request, body)
        logprobs = bool(get(body, "logprobs", (bool,), "a boolean"))
        top = integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
        if top and not logprobs:
            raise InvalidRequest("top_logprobs", "needs logprobs set to true")
        field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        params = sampling(body, field)
        params.logprobs = logprobs
        params.top_logprobs = top
        text = self._render(body, model)
        ids = self._encode("messages", text, False, model)  # the template wrote the special tokens it wants
        if not params.HasField("max_tokens"):  # as vLLM: the rest of the context
            params.max_tokens = max(1, model.card.max_model_len - len(ids))
        return self._call(f"chatcmpl-{rid}", model, True, [pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids))],
                          params, n, stream, include_usage, {"prompt": "messages", "max_tokens": field})

    def _call(self, call_id: str, model: ServedModel, chat: bool, prompts: list[pb.GenerateRequest],
              params: pb.SamplingParams, n: int, stream: bool, include_usage: bool, rename: dict) -> _Call:
        requests = []
        for p, prompt in enumerate(prompts):
            for j in range(n):
                req = pb.GenerateRequest(request_id=f"{call_id}-{p * n + j}" if len(prompts) * n > 1 else call_id,
                                         model=model.name, sampling=params)
                req.MergeFrom(prompt)
                if j and params.HasField("seed"):  # reproducible choices that differ from one another
                    req.sampling.seed = (params.seed + j) % 2**63
                requests.append(req)
        return _Call(call_id, model.name, model, int(time.time()), chat, requests, n, params.logprobs, stream,
                     include_usage, rename)

    async def _generate(self, request: web.Request, call: _Call) -> web.StreamResponse:
        start = time.perf_counter()
        deadline = NoDeadline()
        admitted = []
        try:
            for req in call.requests:  # every prompt is checked before anything is answered
                try:
                    admitted.append(await self.router.admit(req, deadline, "openai", request["key"],
                                                            request.remote or ""))
                except Refused as e:
                    raise _refused(e, call.rename) from None
            # Each prompt's n choices share its prefill (requests are prompt-major, then choice).
            streams = [stream for p in range(0, len(admitted), call.n)
                       for stream in self.router.serve_choices(admitted[p:p + call.n], deadline, "openai", start)]
            if call.stream:
                return await self._stream(request, call, streams)
            return await self._whole(request, call, streams)
        finally:  # what a stream that never began (another was refused, the client left) holds against its key
            for req, _ in admitted:
                self.router.release(req)

    async def _whole(self, request: web.Request, call: _Call, streams: list) -> web.Response:
        choices: list[dict] = []
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        tasks = [asyncio.ensure_future(_collect(s)) for s in streams]
        try:
            results = await asyncio.gather(*tasks)
        except Refused as e:
            raise _refused(e, call.rename) from None
        finally:  # one choice failed, or the client left: the others stop too
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for index, (texts, logprobs, tokens, tops, finish) in enumerate(results):
            text = "".join(texts)
            usage["completion_tokens"] += finish.usage.completion_tokens
            if index % call.n == 0:
                usage["prompt_tokens"] += finish.usage.prompt_tokens
            reason = _FINISH.get(finish.reason)
            if call.chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                "logprobs": self._chat_logprobs(call, tokens, logprobs, tops) if call.logprobs else None,
                                "finish_reason": reason})
            else:
                choices.append({"index": index, "text": text, "finish_reason": reason,
                                "logprobs": self._completion_logprobs(call, tokens, logprobs, tops)
                                if call.logprobs else None})
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return web.json_response({"id": call.id, "object": "chat.completion" if call.chat else "text_completion",
                                  "created": call.created, "model": call.model, "choices": choices, "usage": usage},
                                 headers={"x-request-id": request["request_id"]})

    async def _stream(self, request: web.Request, call: _Call, streams: list) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "x-request-id": request["request_id"]})
        await response.prepare(request)

        async def write(data: bytes) -> None:  # Stalled if the client has read nothing for the stall timeout
            await self.router.deliver(response.write(data), "openai")

        try:
            await self._events(call, streams, write)
        except Stalled:  # the streams are closed (their requests cancelled); the connection goes with them
            if request.transport is not None:
                request.transport.abort()
            return response
        await response.write_eof()
        return response

    async def _events(self, call: _Call, streams: list, write) -> None:
        """The server-sent events of a streamed call, through `write`."""
        kind = "chat.completion.chunk" if call.chat else "text_completion"
        head = f'{{"id":{json.dumps(call.id)},"object":"{kind}","created":{call.created},' \
               f'"model":{json.dumps(call.model)},"choices":['
        usage = {"prompt_tokens": 0, "completion_tokens": 0}

        def event(choice: dict) -> bytes:
            return b"data: " + (head + json.dumps(choice, separators=(",", ":")) + "]}\n\n").encode()

        try:
            if call.chat:
                for index in range(len(streams)):  # the role comes first, as OpenAI sends it
                    await write(event({"index": index, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}))
            # Closed however this ends (a write that stalls): the streams' requests are cancelled at once.
            async with contextlib.aclosing(_merged(streams)) as merged:
                async for index, message in merged:
                    if message.HasField("chunk"):
                        chunk = message.chunk
                        if not chunk.text and not call.logprobs:
                            continue
                        logprobs = None
                        if call.logprobs:
                            logprobs = (self._chat_logprobs if call.chat else self._completion_logprobs)(
                                call, list(chunk.token_ids), list(chunk.logprobs), list(chunk.top_logprobs))
                        if call.chat:
                            choice = {"index": index, "delta": {"content": chunk.text}, "logprobs": logprobs,
                                      "finish_reason": None}
                        else:
                            choice = {"index": index, "text": chunk.text, "logprobs": logprobs, "finish_reason": None}
                        await write(event(choice))
                    else:
                        finish = message.finish
                        usage["completion_tokens"] += finish.usage.completion_tokens
                        if index % call.n == 0:
                            usage["prompt_tokens"] += finish.usage.prompt_tokens
                        choice = {"index": index, "logprobs": None, "finish_reason": _FINISH.get(finish.reason)}
                        choice.update({"delta": {}} if call.chat else {"text": ""})
                        await write(event(choice))
            if call.include_usage:
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                await write(b"data: " + json.dumps({"id": call.id, "object": kind, "created": call.created,
                                                    "model": call.model, "choices": [],
                                                    "usage": usage}).encode() + b"\n\n")
        except Refused as e:  # after the stream began: an error event, as vLLM sends it
            await write(b"data: " + json.dumps(_error_body(_refused(e, call.rename))).encode() + b"\n\n")
        await write(b"data: [DONE]\n\n")

    @staticmethod
    def _token_text(call: _Call, token: int) -> str:
        return call.served.tokenizer.decode([token], skip_special_tokens=False)

    def _completion_logprobs(self, call: _Call, tokens: list[int], logprobs: list[float], tops: list) -> dict:
        top = [{self._token_text(call, t): lp for t, lp in zip(x.token_ids, x.logprobs)} for x in tops] or None
        return {"tokens": [self._token_text(call, t) for t in tokens], "token_logprobs": logprobs,
                "top_logprobs": top, "text_offset": None}

    def _chat_logprobs(self, call: _Call, tokens: list[int], logprobs: list[float], tops: list) -> dict:
        content = []
        for i, (t, lp) in enumerate(zip(tokens, logprobs)):
            text = self._token_text(call, t)
            alternatives = []
            for a, alp in (zip(tops[i].token_ids, tops[i].logprobs) if i < len(tops) else ()):
                a_text = self._token_text(call, a)
                alternatives.append({"token": a_text, "logprob": alp, "bytes": list(a_text.encode())})
            content.append({"token": text, "logprob": lp, "bytes": list(text.encode()), "top_logprobs": alternatives})
        return {"content": content}


async def _collect(stream) -> tuple[list[str], list[float], list[int], list, pb.Finish]:
    texts, logprobs, tokens, tops, finish = [], [], [], [], None
    async with contextlib.aclosing(stream):
        async for message in stream:
            if message.HasField("chunk"):
                texts.append(message.chunk.text)
                tokens.extend(message.chunk.token_ids)
                logprobs.extend(message.chunk.logprobs)
                tops.extend(message.chunk.top_logprobs)
            else:
                finish = message.finish
    return texts, logprobs, tokens, tops, finish


async def _merged(streams: list) -> AsyncIterator[tuple[int, pb.GenerateResponse]]:
    """The messages of several streams as they come, each with its stream's index. One stream (the common
    case) is relayed directly; the others through a queue filled by one task each, all cancelled (and so
    their requests on the nodes) when the consumer stops."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]):
            async for message in streams[0]:
                yield 0, message
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for message in stream:
                    queue.put_nowait((index, message))
        except Refused as e:
            queue.put_nowait((index, e))
        queue.put_nowait((index, done))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            index, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, Refused):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def start_http(front: OpenAIFront, host: str, port: int, openai: bool = True,
                     ssl_context=None) -> tuple[web.AppRunner, str]:
    """Serves the front on (host, port) on the running loop; port 0 takes a free one. Returns the runner (to
    `cleanup()`) and the address it listens on. A port in use raises OSError here, before anything serves.
    `openai=False`: only /health, /metrics and /sd (a router without the OpenAI front still has metrics).
    `ssl_context`: HTTPS only."""
    sock = socket.create_server((host, port))
    runner = web.AppRunner(front.app(openai), handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock, ssl_context=ssl_context).start()
    bound_host, bound_port = sock.getsockname()[:2]
    return runner, f"{bound_host}:{bound_port}"
