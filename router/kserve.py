"""The KServe v2 gRPC front (`inference.GRPCInferenceService`, as Triton serves it) on the router's gRPC port.

A request is an LLM request in the manner of Triton's LLM backends: the prompt in the BYTES input
"text_input"; settings ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "stream",
and the others the OpenAI front takes) as inputs, as request parameters, or as a JSON object in the BYTES
input "sampling_parameters". They become a baton.v1 `GenerateRequest` and go through the router's admission
and serving, as every front's calls do. The reply's BYTES output "text_output" holds the generated text (the
prompt excluded): all of it from ModelInfer; from ModelStreamInfer, with "stream" set, one response per chunk
of new text, else one response; the last response of a request carries the parameter
"triton_final_response" = true (and "finish_reason"). A stream's errors are answered in its `error_message`
and the stream goes on, as Triton does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import grpc

from baton.engine import InvalidRequest
from baton.v1 import baton_pb2 as pb
from baton.v1 import kserve_pb2 as ks
from baton.v1 import kserve_pb2_grpc

from .fields import FINISH_REASONS as _FINISH
from .fields import sampling
from .admission import UnknownModel
from .models import ServedModel
from .auth import credential_from_metadata
from .server import Refused, RouterServicer, Stalled

# Raw little-endian element formats of the fixed-size datatypes (BYTES elements are length-prefixed).
_RAW = {"BOOL": "?", "INT8": "b", "INT16": "h", "INT32": "i", "INT64": "q", "UINT8": "B", "UINT16": "H",
        "UINT32": "I", "UINT64": "Q", "FP32": "f", "FP64": "d"}
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents", "BYTES": "bytes_contents"}
# What the model's metadata lists (every setting is optional; shapes of one element, "stop" of any number).
_INPUTS = [("text_input", "BYTES", [1]), ("stream", "BOOL", [1]), ("max_tokens", "INT32", [1]),
           ("temperature", "FP32", [1]), ("top_p", "FP32", [1]), ("top_k", "INT32", [1]), ("seed", "UINT64", [1]),
           ("stop", "BYTES", [-1]), ("ignore_eos", "BOOL", [1]), ("sampling_parameters", "BYTES", [1])]
_OUTPUTS = [("text_output", "BYTES", [-1])]
_TEXT_INPUTS = {"text_input", "prompt", "text"}


def _baton_version() -> str:
    try:
        return version("baton-llm")
    except PackageNotFoundError:
        return "0"


def _elements(tensor, raw: bytes | None) -> list[Any]:
    """A tensor's elements, from its raw contents or its typed contents field; InvalidRequest otherwise."""
    kind = tensor.datatype
    if kind not in _CONTENTS:
        raise InvalidRequest(tensor.name, f"datatype {kind!r} is not served")
    if raw is None:
        values = list(getattr(tensor.contents, _CONTENTS[kind]))
        return [v.decode("utf-8", "strict") if kind == "BYTES" else v for v in values]
    if kind == "BYTES":
        out, at = [], 0
        while at < len(raw):
            if at + 4 > len(raw):
                raise InvalidRequest(tensor.name, "truncated BYTES contents")
            (n,) = struct.unpack_from("<I", raw, at)
            if at + 4 + n > len(raw):
                raise InvalidRequest(tensor.name, "truncated BYTES contents")
            out.append(raw[at + 4:at + 4 + n].decode("utf-8", "strict"))
            at += 4 + n
        return out
    size = struct.calcsize(_RAW[kind])
    if len(raw) % size:
        raise InvalidRequest(tensor.name, f"{len(raw)} raw bytes are not whole {kind} elements")
    return [v[0] for v in struct.iter_unpack("<" + _RAW[kind], raw)]


def _parameter(p: ks.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def request_fields(request: ks.ModelInferRequest) -> tuple[str, dict[str, Any]]:
    """The prompt and the settings (by OpenAI's names) of a KServe LLM request. Raises InvalidRequest."""
    raws = list(request.raw_input_contents)
    if raws and len(raws) != len(request.inputs):
        raise InvalidRequest("raw_input_contents", f"{len(raws)} entries for {len(request.inputs)} inputs")
    settings: dict[str, Any] = {k: _parameter(v) for k, v in request.parameters.items()}
    prompt = None
    for i, tensor in enumerate(request.inputs):
        try:
            values = _elements(tensor, raws[i] if raws else None)
        except UnicodeDecodeError:
            raise InvalidRequest(tensor.name, "BYTES elements must be UTF-8 text") from None
        if tensor.name in _TEXT_INPUTS:
            if len(values) != 1:
                raise InvalidRequest(tensor.name, f"one prompt per request, got {len(values)}")
            prompt = values[0]
        elif tensor.name == "sampling_parameters":
            try:
                extra = json.loads(values[0]) if len(values) == 1 else None
            except ValueError:
                extra = None
            if not isinstance(extra, dict):
                raise InvalidRequest("sampling_parameters", "must be one JSON object")
            settings.update(extra)
        elif tensor.name == "stop":
            settings["stop"] = values
        else:
            if len(values) != 1:
                raise InvalidRequest(tensor.name, f"one value expected, got {len(values)}")
            value = values[0]
            settings[tensor.name] = float(value) if tensor.datatype in ("FP32", "FP64") else value
    if prompt is None:
        raise InvalidRequest("text_input", "missing (a BYTES input holding the prompt)")
    # Triton's clients send numbers as the integer types they have: the OpenAI translation wants ints and
    # floats, and bools for the flags.
    for flag in ("stream", "ignore_eos", "include_stop_str_in_output"):
        if flag in settings and isinstance(settings[flag], int):
            settings[flag] = bool(settings[flag])
    return prompt, settings


def _text_response(request: ks.ModelInferRequest, text: str, final: bool | None,
                   finish: str | None = None) -> ks.ModelInferResponse:
    data = text.encode()
    response = ks.ModelInferResponse(model_name=request.model_name, model_version=request.model_version or "1",
                                      id=request.id, raw_output_contents=[struct.pack("<I", len(data)) + data])
    response.outputs.add(name="text_output", datatype="BYTES", shape=[1])
    if final is not None:
        response.parameters["triton_final_response"].bool_param = final
    if finish is not None:
        response.parameters["finish_reason"].string_param = finish
    return response


_STREAM_BUFFER = 64  # responses of a ModelStreamInfer call waiting for its client


class KServeServicer(kserve_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, router: RouterServicer) -> None:
        self.router = router

    async def ServerLive(self, request, context):
        return ks.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return ks.ServerReadyResponse(ready=self.router.picker.ready())

    async def ServerMetadata(self, request, context):
        return ks.ServerMetadataResponse(name="baton", version=_baton_version(), extensions=[])

    async def ModelReady(self, request, context):
        model = await self._known(request.name, context)
        return ks.ModelReadyResponse(ready=self.router.picker.ready(model.name))

    async def ModelMetadata(self, request, context):
        model = await self._known(request.name, context)
        meta = ks.ModelMetadataResponse(name=model.name, versions=["1"], platform="baton")
        for name, kind, shape in _INPUTS:
            meta.inputs.add(name=name, datatype=kind, shape=shape)
        for name, kind, shape in _OUTPUTS:
            meta.outputs.add(name=name, datatype=kind, shape=shape)
        return meta

    async def _known(self, name: str, context) -> ServedModel:
        """The model `name`, if the caller's key (with `--auth`) may use it; else the call is aborted."""
        try:
            key = self.router.authenticate(credential_from_metadata(context.invocation_metadata()))
            model = self.router.models.resolve(name)
            self.router.authorize(key, model.name)
            return model
        except Refused as e:
            await context.abort(e.code, e.message)
        except UnknownModel as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except InvalidRequest as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    def _generate_request(self, request: ks.ModelInferRequest) -> tuple[pb.GenerateRequest, bool]:
        """Raises InvalidRequest naming the field, or Refused (unknown model)."""
        prompt, settings = request_fields(request)
        stream = bool(settings.get("stream", False))
        params = sampling(settings)
        return pb.GenerateRequest(request_id=request.id, model=request.model_name, text=prompt,
                                  sampling=params), stream

    async def _responses(self, request: ks.ModelInferRequest, context, stream_text: bool):
        """The request's responses: (text, final, finish) tuples. Raises Refused."""
        start = time.perf_counter()
        # Before the request is read: a caller without a key learns nothing.
        key = self.router.authenticate(credential_from_metadata(context.invocation_metadata()), "kserve")
        try:
            req, stream = self._generate_request(request)
        except InvalidRequest as e:
            self.router.metrics.requests.labels("", "kserve", "INVALID_ARGUMENT").inc()
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e), e.field) from None
        admitted, mode = await self.router.admit(req, context, "kserve", key, context.peer())
        texts: list[str] = []
        held: str | None = None  # the last chunk's text, sent once it is known whether it is the last
        generation = self.router.serve(admitted, mode, context, "kserve", start)
        async with contextlib.aclosing(generation):
            async for message in generation:
                if message.HasField("chunk"):
                    if not (stream and stream_text):
                        texts.append(message.chunk.text)
                        continue
                    if not message.chunk.text:
                        continue
                    if held is not None:
                        yield held, False, None
                    held = message.chunk.text
                else:
                    finish = _FINISH.get(message.finish.reason, "stop")
                    if stream and stream_text:
                        yield held or "", True, finish
                    else:
                        yield "".join(texts), True, finish

    async def ModelInfer(self, request, context):
        try:
            async with contextlib.aclosing(self._responses(request, context, stream_text=False)) as responses:
                async for text, _, finish in responses:
                    return _text_response(request, text, None, finish)
        except Refused as e:
            await context.abort(e.code, e.message)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the request ended without a result")

    async def ModelStreamInfer(self, request_iterator, context):
        """Each request of the stream runs as it comes, concurrently with the others; their responses are
        interleaved as they are produced. The call ending (the client cancels or leaves) cancels them all, and
        so does a client that reads nothing for the stall timeout: the responses wait in a bounded queue, so the
        requests wait with them rather than piling up here."""
        out: asyncio.Queue = asyncio.Queue(maxsize=_STREAM_BUFFER)
        tasks: set[asyncio.Task] = set()
        done = object()

        async def one(request: ks.ModelInferRequest) -> None:
            try:
                async with contextlib.aclosing(self._responses(request, context, stream_text=True)) as responses:
                    async for text, final, finish in responses:
                        await out.put(ks.ModelStreamInferResponse(
                            infer_response=_text_response(request, text, final, finish)))
            except Refused as e:
                await out.put(ks.ModelStreamInferResponse(
                    error_message=e.message, infer_response=ks.ModelInferResponse(
                        model_name=request.model_name, model_version=request.model_version, id=request.id)))

        async def read() -> None:
            async for request in request_iterator:
                task = asyncio.ensure_future(one(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*list(tasks), return_exceptions=True)
            await out.put(done)

        reader = asyncio.ensure_future(read())
        try:
            while (item := await out.get()) is not done:
                await self.router.deliver(context.write(item), "kserve")
            await reader
        except Stalled as e:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(reader, *tasks, return_exceptions=True)
