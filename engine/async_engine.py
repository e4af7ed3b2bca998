"""Runs an `LLMEngine` on its own thread for an asyncio server.

The model never runs on the event loop: the engine thread executes the commands that callers submit (add,
abort, reserve, ...) between steps, runs steps while there is work, and hands each step's outputs back to the
loop with `call_soon_threadsafe`. Everything that touches the engine's state runs on that one thread, so
the block manager and the scheduler need no locks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from .block_manager import CacheChanges
from .engine import KVSink, KVSpec, LLMEngine, Load, StepShape
from .requests import Reserved
from .errors import InvalidRequest
from .request import RequestOutput, Resumed, SamplingParams

log = logging.getLogger(__name__)


class EngineFailed(RuntimeError):
    """The engine step raised: every request that was running on it fails with this."""


class AsyncEngine:
    """The node services' only way into the engine: requests (`generate`), and for disaggregation `reserve`,
    `adopt`, `release` and a KV sink. Each runs on the engine thread between steps, in submission order."""

    def __init__(self, engine: LLMEngine | None, loop: asyncio.AbstractEventLoop,
                 build: Callable[[], LLMEngine] | None = None) -> None:
        """Runs `engine`, or the one `build` makes on the engine thread (`start`)."""
        self.engine = engine  # type: ignore[assignment] - set by the thread before `started` settles
        self._build = build
        self.started: asyncio.Future[None] = loop.create_future()
        if engine is not None:
            self.started.set_result(None)
        self._loop = loop
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[RequestOutput | EngineFailed]] = {}
        self._stopping = False
        self._on_kv: Callable[[CacheChanges], None] | None = None  # `watch_kv`
        self._kv_seq = 0  # batches of prefix-cache changes handed to it (engine thread)
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    @classmethod
    async def start(cls, build: Callable[[], LLMEngine], loop: asyncio.AbstractEventLoop) -> AsyncEngine:
        """An engine built by `build` on the thread that will run it, so that this thread's OpenMP team is the
        process's only one (engine/omp.py); raises what `build` raised."""
        engine = cls(None, loop, build)
        await engine.started
        return engine

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Runs `fn(*args)` on the engine thread between steps; returns its result or raises its error."""
        future = self._loop.create_future()

        def command() -> None:
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the caller, whatever it is
                self._loop.call_soon_threadsafe(_settle, future, None, e)
            else:
                self._loop.call_soon_threadsafe(_settle, future, result, None)

        self._commands.put(command)
        return await future

    def open_stream(self, request_id: str) -> asyncio.Queue[RequestOutput | EngineFailed]:
        """Outputs of `request_id` will be put here (open it before the request is added)."""
        stream: asyncio.Queue[RequestOutput | EngineFailed] = asyncio.Queue()
        self._streams[request_id] = stream
        return stream

    def open_streams(self, request_ids: Sequence[str]) -> asyncio.Queue[RequestOutput | EngineFailed]:
        """One queue for the outputs of several requests (the choices of one prompt): read it with
        `outputs_of`, which follows them all through one wait per output."""
        stream: asyncio.Queue[RequestOutput | EngineFailed] = asyncio.Queue()
        for request_id in request_ids:
            self._streams[request_id] = stream
        return stream

    async def outputs_of(self, request_ids: Sequence[str], stream: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        """Yields the outputs of `request_ids` (one queue: `open_streams`) until each has finished; aborts those
        left in the engine if the caller stops early."""
        left = set(request_ids)
        try:
            while left:
                for out in _coalesced(await stream.get(), stream):
                    if isinstance(out, EngineFailed):
                        raise out
                    if out.request_id not in left:
                        continue
                    if out.finished:
                        left.discard(out.request_id)
                    yield out
        finally:
            for request_id in request_ids:
                self.close_stream(request_id)
            for request_id in left:
                await asyncio.shield(self.release(request_id))

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    async def outputs(self, request_id: str, stream: asyncio.Queue, until_first: bool = False
                      ) -> AsyncIterator[RequestOutput]:
        """Yields a request's outputs until it finishes; aborts it in the engine if the caller stops early.
        Outputs that queued up while the caller was busy come as one (`_coalesced`), except with
        `until_first` (only the first is wanted)."""
        finished = False
        try:
            while True:
                out = await stream.get()
                for out in [out] if until_first else _coalesced(out, stream):
                    if isinstance(out, EngineFailed):
                        finished = True
                        raise out
                    finished = out.finished or until_first
                    yield out
                    if finished:
                        return
        finally:
            self.close_stream(request_id)
            if not finished:
                await asyncio.shield(self.release(request_id))

    async def generate(
        self, request_id: str, prompt: str | Sequence[int], params: SamplingParams, prefill_only: bool = False,
        resumed: Resumed | None = None,
    ) -> AsyncIterator[RequestOutput]:
        stream = self.open_stream(request_id)
        await self._add([request_id], request_id, prompt, params, prefill_only, resumed)
        async for out in self.outputs(request_id, stream, until_first=prefill_only):
            yield out

    async def generate_choices(self, request_ids: Sequence[str], prompt: Sequence[int],
                               params: Sequence[SamplingParams]) -> AsyncIterator[RequestOutput]:
        """Several choices of one prompt (OpenAI's n), their outputs in one stream, the prompt computed once:
        request_ids[0] is added as any request; once its first output says the prompt is computed, each other
        choice forks from its K/V (`fork`), or computes the prompt itself if choice 0 is gone by then (it ended
        with its first token). Aborts every choice left if the caller stops early."""
        stream = self.open_streams(request_ids)
        await self._add(request_ids, request_ids[0], list(prompt), params[0])
        forked = False
        async for out in self.outputs_of(request_ids, stream):
            if not forked:
                forked = True
                for child, child_params in zip(request_ids[1:], params[1:]):
                    try:
                        await self.fork(request_ids[0], child, prompt, child_params)
                    except InvalidRequest:  # choice 0 ended with its first token: its blocks went with it
                        await self.call(self.engine.add_request, child, list(prompt), child_params, False, None)
            yield out

    async def _add(self, streams: Sequence[str], request_id: str, prompt: str | Sequence[int],
                   params: SamplingParams, prefill_only: bool = False, resumed: Resumed | None = None) -> None:
        """Adds a request whose outputs go to the streams opened for `streams`; if that fails, closes them."""
        try:
            await self.call(self.engine.add_request, request_id, prompt, params, prefill_only, resumed)
        except BaseException as e:
            for stream_id in streams:
                self.close_stream(stream_id)
            if isinstance(e, asyncio.CancelledError):  # the add still runs (it is queued): the release undoes it
                await asyncio.shield(self.release(request_id))
            raise

    # -- disaggregation -------------------------------------------------------------------------------

    async def reserve(self, request_id: str, prompt_len: int, max_tokens: int,
                      token_ids: Sequence[int] | None = None) -> Reserved:
        return await self.call(self.engine.reserve, request_id, prompt_len, max_tokens, token_ids)

    async def hold_prefix(self, request_id: str, token_ids: Sequence[int], num_blocks: int) -> Reserved:
        """`LLMEngine.hold_prefix`, on the engine thread."""
        return await self.call(self.engine.hold_prefix, request_id, token_ids, num_blocks)

    async def commit_held(self, request_id: str, token_ids: Sequence[int]) -> None:
        await self.call(self.engine.commit_held, request_id, token_ids)

    async def adopt(self, request_id: str, prompt: Sequence[int], first_token: int, first_logprob: float,
                    params: SamplingParams, resumed: Resumed | None = None) -> RequestOutput:
        """Continues a sequence prefilled elsewhere; open its stream first (`open_stream`). Returns the first
        token's output (finished if that token ended the request: its stream then gets nothing)."""
        return await self.call(self.engine.adopt, request_id, prompt, first_token, first_logprob, params, resumed)

    async def compute_rest(self, request_id: str, prompt: Sequence[int], params: SamplingParams,
                           resumed: Resumed | None = None) -> None:
        """A reservation continued by computing the rest of its prompt here (`LLMEngine.compute_rest`); open its
        stream first: every output, the first token's included, comes through it."""
        await self.call(self.engine.compute_rest, request_id, prompt, params, resumed)

    async def fork(self, parent_id: str, child_id: str, prompt: Sequence[int], params: SamplingParams,
                   resumed: Resumed | None = None) -> int:
        """A new request sharing the prompt K/V `parent_id` holds (`LLMEngine.fork`); returns the prompt tokens
        it shares. Open its stream first (`open_stream`)."""
        return await self.call(self.engine.fork, parent_id, child_id, prompt, params, resumed)

    async def release(self, request_id: str) -> int:
        """Frees whatever the engine holds for the request (`LLMEngine.release`); returns the blocks freed.
        A sequence it aborts ends its open stream with a `cancelled` output, so its reader never hangs."""
        freed, out = await self.call(self.engine.release, request_id)
        if out is not None:
            self._dispatch([out])
        return freed

    def set_kv_sink(self, sink: KVSink | None) -> None:
        """Before any request: the sink is called on the engine thread."""
        self.engine.set_kv_sink(sink)

    def watch_kv(self, on_changes: Callable[[CacheChanges], None]) -> None:
        """Before any request: `on_changes(changes)` is called on the event loop with each batch of the prefix
        cache's changes (names stored and removed), in order, numbered 1, 2, ... (`kv_snapshot` says where
        a snapshot stands among them). Nothing is called with prefix caching off."""
        if self.engine.blocks.caching:
            self._on_kv = on_changes
            self.engine.blocks.record_changes()

    async def kv_snapshot(self) -> CacheChanges:
        """Every named block now, as of the last batch handed to `watch_kv`'s callback (its seq)."""
        def snapshot() -> CacheChanges:
            self._hand_over_kv()  # what changed before it goes out first, numbered before it
            return CacheChanges(self._kv_seq, self.engine.blocks.named(), [], snapshot=True)

        return await self.call(snapshot)

    @property
    def kv_identity(self) -> tuple[bytes, int]:
        """(the model's seed, the block size): what block names are made of (b"" with prefix caching off)."""
        return self.engine.blocks.seed or b"", self.engine.blocks.block_size

    def set_step_observer(self, observer: Callable[[StepShape], None] | None) -> None:
        """Before any request: `observer` is called on the engine thread with each step's shape."""
        self.engine.set_step_observer(observer)

    @property
    def kv_spec(self) -> KVSpec:
        return self.engine.kv_spec

    @property
    def kv_pools(self) -> list:
        return self.engine.kv_pools

    @property
    def transfer_tokens(self) -> int:
        return self.engine.transfer_tokens

    @property
    def kv_storage(self) -> tuple:
        return self.engine.kv_storage

    def rank_pools(self) -> list[bytes]:
        return self.engine.rank_pools()

    def rank_links(self) -> list:
        return self.engine.rank_links()

    def rank_pids(self) -> list[int]:
        return self.engine.rank_pids()

    @property
    def model_config(self):
        return self.engine.model_config

    def blocks_for(self, num_tokens: int) -> int:
        return self.engine.blocks_for(num_tokens)

    async def load(self) -> Load:
        """`LLMEngine.load`, read on the engine thread."""
        return await self.call(self.engine.load)

    async def prefix_cache(self) -> dict[str, int]:
        """`LLMEngine.prefix_cache`, read on the engine thread."""
        return await self.call(self.engine.prefix_cache)

    async def close(self) -> None:
        self._stopping = True
        self._commands.put(lambda: None)
        await asyncio.to_thread(self._thread.join)

    # -- the engine thread --------------------------------------------------------------------------

    def _run(self) -> None:
        if self._build is not None:
            try:
                self.engine = self._build()
            except BaseException as e:  # noqa: BLE001 - the caller of `start` raises it
                self._loop.call_soon_threadsafe(_settle, self.started, None, e)
                return
            self._loop.call_soon_threadsafe(_settle, self.started, None, None)
        while not self._stopping:
            busy = self.engine.has_unfinished()
            try:
                command = self._commands.get_nowait() if busy else self._commands.get()
                command()
                while True:  # everything submitted so far, before the next step
                    self._commands.get_nowait()()
            except queue.Empty:
                pass
            self._hand_over_kv()
            if self.engine.has_unfinished():
                self._step()
                self._hand_over_kv()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # a bug must fail its requests, not kill the node
            log.exception("engine step failed")
            failed = EngineFailed(f"engine step failed: {e}")
            self.engine.abort_all()  # engine-thread state: `_streams` belongs to the event loop
            self._loop.call_soon_threadsafe(self._fail_all, failed)
            return
        if outputs:
            self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _hand_over_kv(self) -> None:
        """The prefix cache's changes since the last call, as the next batch (engine thread)."""
        if self._on_kv is None:
            return
        stored, removed = self.engine.blocks.take_changes()
        if stored or removed:
            self._kv_seq += 1
            self._loop.call_soon_threadsafe(self._on_kv, CacheChanges(self._kv_seq, stored, removed))

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put_nowait(out)

    def _fail_all(self, error: EngineFailed) -> None:
        for stream in self._streams.values():
            stream.put_nowait(error)


def _coalesced(first: RequestOutput | EngineFailed, stream: asyncio.Queue) -> list[RequestOutput | EngineFailed]:
    """`first` and whatever else is queued now, each request's outputs merged into one, in order (an engine
    failure ends the list). A reader that fell behind the engine (its event loop busy with other streams)
    then sends one message for the tokens that are ready instead of one per step: fewer messages to write,
    relay and read, and no token waits longer than it did."""
    if stream.empty() or isinstance(first, EngineFailed):
        return [first]
    merged: dict[str, RequestOutput] = {first.request_id: first}
    while not stream.empty():
        item = stream.get_nowait()
        if isinstance(item, EngineFailed):
            return [*merged.values(), item]
        a = merged.get(item.request_id)
        merged[item.request_id] = item if a is None else RequestOutput(
            a.request_id, a.first_index, a.token_ids + item.token_ids, a.logprobs + item.logprobs,
            a.text + item.text, item.finish_reason, a.top_logprobs + item.top_logprobs)
    return list(merged.values())


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
