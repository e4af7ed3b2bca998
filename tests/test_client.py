"""baton.router.client against a real in-process grpc.aio server running a scripted fake Baton servicer.

This tests the client's side of the wire (request building, stream mapping, errors, cancellation), so
the servicer follows a script keyed on the request instead of running a model.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import defaultdict

import grpc
import pytest

from baton.cluster.etcd_server import free_port
from baton.router.client import (AsyncBatonClient, BatonClient, BatonError, Cancelled, Completion,
                                  DeadlineExceeded, Delta, Finished, InvalidArgument, NotFound,
                                  PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable)
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc

WAIT = 10  # seconds: an upper bound for events that should happen at once, never a pause
LONG = 6 * WAIT  # the deadline of calls that only the client's cancel may end within WAIT


class FakeBaton(baton_pb2_grpc.BatonServicer):
    """Generates n = max_tokens (default 5) tokens 100, 101, ... in chunks of 2, then a Finish.

    The request id scripts the rest: "hang..." sends one chunk and waits until cancelled, "nofinish" ends the
    stream without a Finish, "abort:<CODE>" fails with that status, "reason:<NAME>" finishes with that reason,
    "diesafterfinish" fails UNAVAILABLE after its Finish (its router died before the call's status went out),
    "dies..." fails UNAVAILABLE after its first chunk unless it resumes (`resume` says what the client has:
    the stream goes on from the next index).
    """

    def __init__(self) -> None:
        self.requests: dict[str, pb.GenerateRequest] = {}
        self.calls: defaultdict[str, list[pb.GenerateRequest]] = defaultdict(list)
        self.started: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.cancelled: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)

    async def Generate(self, request, context):
        rid = request.request_id or "generated-id"
        self.requests[rid] = request
        self.calls[rid].append(request)
        s = request.sampling
        if request.model not in ("", "tiny"):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model: unknown model {request.model!r}")
        if s.HasField("max_tokens") and s.max_tokens <= 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens: must be a positive integer")
        if rid.startswith("abort:"):
            await context.abort(grpc.StatusCode[rid.removeprefix("abort:")], "scripted failure")
        if rid.startswith("hang"):
            yield pb.GenerateResponse(request_id=rid, chunk=pb.TokenChunk(index=0, token_ids=[7], text="x"))
            self.started[rid].set()
            try:
                await asyncio.Event().wait()  # until the client goes away
            except asyncio.CancelledError:  # grpc.aio cancels the handler's task when the call ends
                self.cancelled[rid].set()
                raise
        n = s.max_tokens if s.HasField("max_tokens") else 5
        ids = list(range(100, 100 + n))
        for i in range(len(request.resume.token_ids), n, 2):
            part = ids[i:i + 2]
            chunk = pb.TokenChunk(index=i, token_ids=part, text="".join(f"<{t}>" for t in part),
                                  logprobs=[-0.5] * len(part) if s.logprobs else [])
            yield pb.GenerateResponse(request_id=rid, chunk=chunk)
            if rid.startswith("dies") and rid != "diesafterfinish" and not request.HasField("resume"):
                await context.abort(grpc.StatusCode.UNAVAILABLE, "Stream removed (Socket closed)")
        if rid == "nofinish":
            return
        reason = pb.FinishReason.Value(f"FINISH_REASON_{rid.removeprefix('reason:')}") \
            if rid.startswith("reason:") else pb.FINISH_REASON_LENGTH
        prompt_tokens = len(request.text) if request.HasField("text") else len(request.token_ids.ids)
        usage = pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=n, ttft_ms=1.5, e2e_ms=9.25,
                         prefill_node="prefill-0", decode_node="decode-1")
        yield pb.GenerateResponse(request_id=rid, finish=pb.Finish(reason=reason, usage=usage))
        if rid == "diesafterfinish":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "Stream removed (Socket closed)")

    async def ListModels(self, request, context):
        model = pb.ModelInfo(id="tiny", architecture="LlamaForCausalLM", max_model_len=512, vocab_size=512,
                             dtype="float32")
        return pb.ListModelsResponse(models=[model])

    async def Tokenize(self, request, context):
        if request.model not in ("", "tiny"):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model: unknown model {request.model!r}")
        return pb.TokenizeResponse(token_ids=([1] if request.add_special_tokens else [])
                                   + [ord(c) for c in request.text])


@contextlib.asynccontextmanager
async def serving(servicer: FakeBaton):
    server = grpc.aio.server()
    baton_pb2_grpc.add_BatonServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def run_async(test):
    """Runs an async test body against a fresh server: test(client, servicer)."""
    async def main():
        servicer = FakeBaton()
        async with serving(servicer) as target, AsyncBatonClient(target, timeout=WAIT) as client:
            await test(client, servicer)
    asyncio.run(main())


# ---- asyncio client ----

def test_async_generate_streams_deltas_then_finished():
    async def test(client, servicer):
        items = [item async for item in client.generate("hello", max_tokens=5, temperature=0.0, top_k=3,
                                                         seed=7, stop=["\n"], request_id="r1", model="tiny")]
        assert [type(i) for i in items] == [Delta, Delta, Delta, Finished]
        assert items[0] == Delta("r1", 0, [100, 101], "<100><101>", [])
        assert [d.index for d in items[:3]] == [0, 2, 4] and items[2].token_ids == [104]
        assert items[-1] == Finished("r1", "length", 5, 5, 1.5, 9.25, "prefill-0", "decode-1")
        sent = servicer.requests["r1"]
        assert sent.text == "hello" and sent.model == "tiny"
        s = sent.sampling
        assert (s.max_tokens, s.temperature, s.top_k, s.seed, list(s.stop)) == (5, 0.0, 3, 7, ["\n"])
        assert s.HasField("temperature") and not s.HasField("top_p")  # 0.0 is sent; None is left unset
    run_async(test)


def test_async_complete_with_token_ids_and_logprobs():
    async def test(client, servicer):
        done = await client.complete([5, 6, 7], max_tokens=3, logprobs=True, request_id="r2")
        assert isinstance(done, Completion)
        assert done.text == "<100><101><102>" and done.token_ids == [100, 101, 102]
        assert done.logprobs == [-0.5] * 3
        assert done.finished.finish_reason == "length" and done.finished.prompt_tokens == 3
        assert list(servicer.requests["r2"].token_ids.ids) == [5, 6, 7]
        s = servicer.requests["r2"].sampling
        # Sampled (the server's default temperature) with no seed given: the client draws one, so that another
        # router could resume the stream with the same tokens.
        assert not s.HasField("temperature") and s.HasField("seed") and s.logprobs
    run_async(test)


def test_async_typed_errors():
    async def test(client, servicer):
        with pytest.raises(InvalidArgument) as err:
            async for _ in client.generate("hello", max_tokens=0):
                pass
        assert err.value.field == "max_tokens" and err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details == "max_tokens: must be a positive integer"
        with pytest.raises(NotFound) as err:
            await client.complete("hello", model="nope")
        assert err.value.code == grpc.StatusCode.NOT_FOUND and "nope" in err.value.details
        with pytest.raises(NotFound):
            await client.tokenize("hi", model="nope")
        with pytest.raises(ResourceExhausted):
            await client.complete("hello", request_id="abort:RESOURCE_EXHAUSTED")
    run_async(test)


def test_cancelling_the_async_generator_cancels_the_server_call():
    async def test(client, servicer):
        stream = client.generate("hello", request_id="hang", timeout=LONG)
        assert (await anext(stream)).token_ids == [7]
        await asyncio.wait_for(servicer.started["hang"].wait(), WAIT)
        assert not servicer.cancelled["hang"].is_set()
        await stream.aclose()
        await asyncio.wait_for(servicer.cancelled["hang"].wait(), WAIT)
    run_async(test)


def test_cancelling_the_consuming_task_cancels_the_server_call():
    async def test(client, servicer):
        async def consume():
            async for _ in client.generate("hello", request_id="hang", timeout=LONG):
                pass
        task = asyncio.create_task(consume())
        await asyncio.wait_for(servicer.started["hang"].wait(), WAIT)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(servicer.cancelled["hang"].wait(), WAIT)
    run_async(test)


def test_async_list_models_tokenize_and_deadline():
    async def test(client, servicer):
        [model] = await client.list_models()
        assert (model.id, model.max_model_len, model.dtype) == ("tiny", 512, "float32")
        assert await client.tokenize("ab") == [1, 97, 98]
        assert await client.tokenize("ab", add_special_tokens=False) == [97, 98]
        with pytest.raises(DeadlineExceeded):
            async for _ in client.generate("hello", request_id="hang", timeout=0.2):
                pass
        await asyncio.wait_for(servicer.cancelled["hang"].wait(), WAIT)
    run_async(test)


def test_async_unavailable():
    async def main():
        async with AsyncBatonClient(f"127.0.0.1:{free_port()}", timeout=WAIT) as client:
            with pytest.raises(Unavailable):
                await client.list_models()
    asyncio.run(main())


# ---- sync client, against the same aio server run on its own event loop in a thread ----

@pytest.fixture(scope="module")
def server():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    servicer, stack = FakeBaton(), contextlib.AsyncExitStack()
    try:
        start = stack.enter_async_context(serving(servicer))
        target = asyncio.run_coroutine_threadsafe(start, loop).result(WAIT)
        yield target, servicer, loop
    finally:
        asyncio.run_coroutine_threadsafe(stack.aclose(), loop).result(WAIT)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT)
        loop.close()


def wait_on(loop, event_factory):
    """Waits (from the test's thread) for an asyncio.Event that lives on the server's loop."""
    async def wait():
        await asyncio.wait_for(event_factory().wait(), WAIT)
    asyncio.run_coroutine_threadsafe(wait(), loop).result(WAIT + 1)


def test_sync_generate_and_complete(server):
    target, servicer, _ = server
    with BatonClient(target, timeout=WAIT) as client:
        items = list(client.generate("hey", max_tokens=3, top_p=0.9, stop="END", request_id="s1"))
        assert items == [Delta("s1", 0, [100, 101], "<100><101>", []), Delta("s1", 2, [102], "<102>", []),
                         Finished("s1", "length", 3, 3, 1.5, 9.25, "prefill-0", "decode-1")]
        sent = servicer.requests["s1"].sampling
        assert sent.top_p == pytest.approx(0.9) and list(sent.stop) == ["END"]  # one string, not 3 letters
        done = client.complete([1, 2], max_tokens=4)
        # No id given: the client makes one (another router resuming the stream needs it), echoed back.
        assert done.token_ids == [100, 101, 102, 103] and len(done.finished.request_id) == 32
        assert [m.id for m in client.list_models()] == ["tiny"]
        assert client.tokenize("a") == [1, 97]


@pytest.mark.parametrize("reason", ["length", "stop", "eos", "cancelled"])
def test_sync_finish_reasons(server, reason):
    with BatonClient(server[0], timeout=WAIT) as client:
        assert client.complete("x", request_id=f"reason:{reason.upper()}").finished.finish_reason == reason


@pytest.mark.parametrize("code, error", [
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument), (grpc.StatusCode.NOT_FOUND, NotFound),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted), (grpc.StatusCode.UNAVAILABLE, Unavailable),
    (grpc.StatusCode.CANCELLED, Cancelled), (grpc.StatusCode.INTERNAL, BatonError),
    (grpc.StatusCode.PERMISSION_DENIED, PermissionDenied), (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
    (grpc.StatusCode.DATA_LOSS, BatonError),
])
def test_sync_status_codes_map_to_typed_errors(server, code, error):
    with BatonClient(server[0], timeout=WAIT) as client, pytest.raises(BatonError) as err:
        client.complete("x", request_id=f"abort:{code.name}")
    assert type(err.value) is error
    assert err.value.code == code and err.value.details == "scripted failure"
    assert isinstance(err.value.__cause__, grpc.RpcError)


def test_sync_invalid_argument_names_the_field(server):
    with BatonClient(server[0], timeout=WAIT) as client, pytest.raises(InvalidArgument) as err:
        list(client.generate("x", max_tokens=-1))
    assert err.value.field == "max_tokens"
    assert str(err.value) == "INVALID_ARGUMENT: max_tokens: must be a positive integer"


def test_a_stream_whose_router_dies_after_its_finish_is_whole(server):
    """The router killed between a stream's Finish and the call's status: the client has the whole stream, and
    returns it (it raised UNAVAILABLE, with no router left to resume on: the two-router test failed so once)."""
    with BatonClient(server[0], timeout=WAIT) as client:
        done = client.complete("x", request_id="diesafterfinish")
    assert done.token_ids == [100, 101, 102, 103, 104] and done.finished.finish_reason == "length"

    async def body(client, servicer):
        done = await client.complete("x", request_id="diesafterfinish")
        assert done.token_ids == [100, 101, 102, 103, 104] and done.finished.completion_tokens == 5

    run_async(body)


def test_a_stream_whose_router_dies_resumes_on_the_next_from_what_it_has(server):
    """Two routers (the same fake twice): the first dies after 2 tokens; the stream goes on through the other
    with those tokens and their text as `resume`, and the caller sees each token once. With no resume left
    (`resumes=0`) the failure is raised."""
    target, servicer, _ = server
    with BatonClient([target, target], timeout=WAIT) as client:
        items = list(client.generate("x", request_id="dies-sync", temperature=0.5))
    assert [t for d in items if isinstance(d, Delta) for t in d.token_ids] == [100, 101, 102, 103, 104]
    assert [d.index for d in items if isinstance(d, Delta)] == [0, 2, 4] and isinstance(items[-1], Finished)
    first, again = servicer.calls["dies-sync"]
    assert not first.HasField("resume") and again.resume == pb.Resume(token_ids=[100, 101], text_chars=10)
    assert again.sampling.seed == first.sampling.seed and first.sampling.HasField("seed")  # drawn once, kept
    with BatonClient([target, target], timeout=WAIT, resumes=0) as client, pytest.raises(Unavailable):
        list(client.generate("x", request_id="dies-never"))

    async def body(client, servicer):
        done = await client.complete("x", request_id="dies-async", max_tokens=6)
        assert done.token_ids == list(range(100, 106)) and done.finished.completion_tokens == 6
        assert servicer.calls["dies-async"][1].resume.token_ids == [100, 101]

    async def main():
        servicer = FakeBaton()
        async with serving(servicer) as one, AsyncBatonClient([one, one], timeout=WAIT) as client:
            await body(client, servicer)
    asyncio.run(main())


def test_sync_stream_without_finish_is_an_error(server):
    with BatonClient(server[0], timeout=WAIT) as client, pytest.raises(BatonError, match="without a Finish"):
        list(client.generate("x", request_id="nofinish"))


def test_sync_closing_the_generator_cancels_the_server_call(server):
    target, servicer, loop = server
    with BatonClient(target, timeout=WAIT) as client:
        stream = client.generate("x", request_id="hang-sync-close", timeout=LONG)
        assert next(stream).token_ids == [7]
        wait_on(loop, lambda: servicer.started["hang-sync-close"])
        stream.close()
        wait_on(loop, lambda: servicer.cancelled["hang-sync-close"])
        for item in client.generate("x", request_id="hang-sync-break", timeout=LONG):
            break  # leaving a for loop drops the generator, which CPython closes at once
        wait_on(loop, lambda: servicer.cancelled["hang-sync-break"])


def test_sync_deadline(server):
    target, servicer, loop = server
    with BatonClient(target) as client, pytest.raises(DeadlineExceeded):
        list(client.generate("x", request_id="hang-sync-deadline", timeout=0.2))
    wait_on(loop, lambda: servicer.cancelled["hang-sync-deadline"])
