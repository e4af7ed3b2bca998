"""A node's ranks in its KV transfers: rank 0 (the process that speaks gRPC) fans each transfer's routes out
over every rank of its node, itself included, through one interface.

    NodeRanks.call(rank, command) ──rank 0──▶ RankWork.run on a transfer thread, in this process
                                  └─rank r──▶ RankLink ══pipe══▶ RankAgent (rank r) ──▶ its RankWork.run

A command is a typed message (`OpenRoute`, `EndRoutes`, `ReceiveRoute`, `SendRoute`, `Abandon`,
`DropGeneration`), pickled
over the pipes; its answer is the command's result, or TransferCancelled (the sender's cancel header: the lane
is in step), or KVTransferError, whichever rank ran it. `RankWork` is one rank's side of every transfer: its
pair channels, its route senders (its engine's KV sink), its receives. Answers come back numbered, so the
answers of two routes (two ranks, or two requests) are never taken for one another.

A receive on a rank, by request id (`RankWork`; `Abandon` is how rank 0 tells it that the caller left):

    (none) ──ReceiveRoute admitted──▶ RECEIVING ──Abandon──▶ ABANDONED ──its last route ends──▶ (none)
                                          └──────────────its last route ends─────────────────▶ (none)

An ABANDONED receive still waiting for its peer to join the pair group gives up at once. A receive is admitted
(counted) when its command is handed over, before it runs: an Abandon that follows always finds it. An
Abandon for a request that receives nothing here is forgotten.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .channel import KVTransferError, PairChannels, TransferCancelled, TransferThreads
from .routes import Route, RouteSenders, receive_route, send_route
from .sender import Staging, staging_bytes
from .shared import encode, share

# -- the commands -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenRoute:
    """Prefill rank: open (or reuse) the route's lane and register its sender. Answer: None."""

    route: Route
    timeout: float


@dataclass(frozen=True, slots=True)
class EndRoutes:
    """Prefill rank: end the request's routes (what they owe goes) and wait for their sends. Answer: bytes."""

    request_id: str
    timeout: float


@dataclass(frozen=True, slots=True)
class ReceiveRoute:
    """Decode rank: receive the route into the reserved blocks, or (`drain_only`) take it in and drop it.
    Answer: bytes."""

    route: Route
    timeout: float
    drain_only: bool = False


@dataclass(frozen=True, slots=True)
class SendRoute:
    """Decode rank: send a pulled route (`Route.pull`) from the cached blocks `src_blocks`. Answer: bytes."""

    route: Route
    src_blocks: tuple[int, ...]
    timeout: float


@dataclass(frozen=True, slots=True)
class Abandon:
    """Decode rank: the request's caller left; its receives still waiting for their peer give up. Answer: None."""

    request_id: str


@dataclass(frozen=True, slots=True)
class DropGeneration:
    """Any rank: forget the groups of `generation` (and older) with the peer node's ranks. Answer: None."""

    peer: str
    generation: int


Command = OpenRoute | EndRoutes | ReceiveRoute | SendRoute | Abandon | DropGeneration


class Answer(enum.StrEnum):
    """How a rank's answer on its pipe went: (number, Answer, the result or the error's text)."""

    OK = "ok"
    CANCELLED = "cancelled"
    FAILED = "failed"


# -- one rank -----------------------------------------------------------------------------------------------


class RankWork:
    """One rank's side of its node's KV transfers. `channels`: rank 0's own (its service's); a worker rank
    makes its own on the first command, which names the rank (`Route.me`). Thread-safe: each command runs
    on a thread of its own (a receive waits for its sender, an open for its peer).

    It is its engine's KV sink too (`engine.KVSink`: the step posts its routes' layers), through its route
    senders once it has any."""

    def __init__(self, pools: Sequence[torch.Tensor], device: torch.device | str,
                 channels: PairChannels | None = None, staging: Staging | None = None, secret: str = "") -> None:
        self.pools = pools
        self.device = torch.device(device)
        self._secret = secret  # the cluster's member token, for the channels this rank makes (`pair_prefix`)
        self._channels = channels
        self._staging = staging
        self.senders: RouteSenders | None = None if channels is None else RouteSenders(channels, pools, staging)
        self._lock = threading.Lock()  # making the channels, the two records below
        self._receiving: Counter[str] = Counter()  # request id -> its routes receiving here
        self._abandoned: set[str] = set()  # those of them whose caller left

    def admit(self, command: Command) -> None:
        """Counts a receive in as its command is handed over (before `run`): an Abandon then finds it."""
        if isinstance(command, ReceiveRoute):
            with self._lock:
                self._receiving[command.route.request_id] += 1

    def run(self, command: Command):
        """Runs an admitted command (blocking): its answer, TransferCancelled or KVTransferError."""
        try:
            return self._execute(command)
        except (TransferCancelled, KVTransferError):
            raise
        except Exception as e:  # noqa: BLE001 - every failure is a failed transfer to rank 0
            raise KVTransferError(f"{type(e).__name__}: {e}") from e

    def _execute(self, command: Command):
        match command:
            case OpenRoute(route, timeout):
                self._for(route.me)
                return self.senders.open(route, timeout)
            case EndRoutes(request_id, timeout):
                return self.senders.end(request_id, timeout) if self.senders is not None else 0
            case ReceiveRoute(route, timeout, drain_only):
                rid = route.request_id
                try:
                    return receive_route(self._for(route.me), route, self.pools, timeout, drain_only,
                                         lambda: rid in self._abandoned)
                finally:
                    with self._lock:
                        self._receiving[rid] -= 1
                        if not self._receiving[rid]:
                            del self._receiving[rid]
                            self._abandoned.discard(rid)
            case SendRoute(route, src_blocks, timeout):
                return send_route(self._for(route.me), route, src_blocks, self.pools, timeout)
            case Abandon(request_id):
                with self._lock:
                    if request_id in self._receiving:  # else nothing waits: nothing to remember
                        self._abandoned.add(request_id)
                return None
            case DropGeneration(peer, generation):
                if self._channels is not None:
                    self._channels.drop(peer, generation)
                return None
        raise TypeError(f"not a rank command: {command!r}")

    def _for(self, me: str) -> PairChannels:
        with self._lock:
            if self._channels is None:
                self._channels = PairChannels(me, self.device, secret=self._secret)
                self.senders = RouteSenders(self._channels, self.pools, self._staging)
            return self._channels

    # The KV sink (engine thread, inside a step): nothing to post before a route was opened here.
    def step_started(self, prompts: list[tuple[str, list[int]]], pool: torch.Tensor) -> None:
        if self.senders is not None:
            self.senders.step_started(prompts, pool)

    def layer_done(self, layer: int, pool: torch.Tensor, prompts: list[tuple[str, list[int]]]) -> None:
        if self.senders is not None:
            self.senders.layer_done(layer, pool, prompts)


def serve_rank(kv, secret: str = "") -> tuple[RankWork, bytes]:
    """A worker rank's part in its node's KV transfers, started in the rank's own process by its engine
    (`engine.LLMEngine(rank_kv=serve_rank)`). `kv`: the rank's end of its pipe to rank 0, its KV pools, their
    storage, its /dev/shm file and its device (`engine.tp_runtime.WorkerKV`). Returns the rank's KV sink and its
    storage described for mapping by a process on the same device (b"" if it cannot be). `secret`: the cluster's
    member token (`functools.partial(serve_rank, secret=...)`), which names the rendezvous keys."""
    description = b""
    if kv.shm_path or kv.device.type == "cuda":  # a pool another process on this device can map
        description = encode(share(kv.storage, kv.shm_path))
    work = RankWork(kv.pools, kv.device, staging=Staging(staging_bytes(kv.pools, kv.transfer_tokens)), secret=secret)
    RankAgent(kv.conn, work, thread_setup=kv.thread_setup)
    return work, description


# -- the pipes ----------------------------------------------------------------------------------------------


class RankAgent:
    """A worker rank's end of its pipe to rank 0: runs each command on a thread of its own (`RankWork`) and
    answers it under its number."""

    def __init__(self, conn, work: RankWork, max_threads: int = 256,
                 thread_setup: Callable[[], object] | None = None) -> None:
        """`thread_setup` runs first on each thread (the engine's `omp.serial_torch`: the rank's OpenMP team
        stays its model's)."""
        self.conn = conn
        self.work = work
        self._lock = threading.Lock()  # the pipe's writes
        self._threads = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="kv-rank",
                                           initializer=thread_setup)
        threading.Thread(target=self._serve, name="kv-agent", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                number, command = self.conn.recv()
            except (EOFError, OSError):
                return  # rank 0 is gone: this process ends with it
            self.work.admit(command)  # in the order they came: an Abandon finds the receive sent before it
            self._threads.submit(self._answer, number, command)

    def _answer(self, number: int, command: Command) -> None:
        try:
            answer = (Answer.OK, self.work.run(command))
        except TransferCancelled as e:
            answer = (Answer.CANCELLED, str(e))
        except KVTransferError as e:
            answer = (Answer.FAILED, str(e))
        with self._lock:
            try:
                self.conn.send((number, *answer))
            except (OSError, ValueError):
                pass  # rank 0 is gone


class RankLink:
    """Rank 0's ends of the pipes to ranks 1, 2, ...: `call(rank, command)` is an asyncio future of the answer
    (KVTransferError for a failure, TransferCancelled for a cancelled route). A rank whose pipe closes (it
    died) fails every call waiting on it, and every later one."""

    def __init__(self, conns: Sequence) -> None:
        self._conns = list(conns)
        self._numbers = itertools.count()
        self._waiting: dict[int, tuple[int, Future]] = {}
        self._dead: set[int] = set()
        self._lock = threading.Lock()
        for rank, conn in enumerate(self._conns, start=1):
            threading.Thread(target=self._answers, args=(rank, conn), name=f"kv-link-{rank}", daemon=True).start()

    @property
    def size(self) -> int:
        return len(self._conns) + 1

    def call(self, rank: int, command: Command) -> asyncio.Future:
        future: Future = Future()
        with self._lock:
            number = next(self._numbers)
            if rank in self._dead:
                future.set_exception(KVTransferError(f"rank {rank} is gone"))
            else:
                self._waiting[number] = (rank, future)
                try:
                    self._conns[rank - 1].send((number, command))
                except (OSError, ValueError) as e:
                    del self._waiting[number]
                    future.set_exception(KVTransferError(f"rank {rank} is gone: {e}"))
        return asyncio.wrap_future(future)

    def _answers(self, rank: int, conn) -> None:
        while True:
            try:
                number, status, value = conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                _, future = self._waiting.pop(number, (None, None))
            if future is None:
                continue
            if status == Answer.OK:
                future.set_result(value)
            elif status == Answer.CANCELLED:
                future.set_exception(TransferCancelled(value))
            else:
                future.set_exception(KVTransferError(f"rank {rank}: {value}"))
        with self._lock:
            self._dead.add(rank)
            orphans = [n for n, (r, _) in self._waiting.items() if r == rank]
            futures = [self._waiting.pop(n)[1] for n in orphans]
        for future in futures:
            future.set_exception(KVTransferError(f"rank {rank} is gone"))


# -- rank 0's fan-out ---------------------------------------------------------------------------------------


class NodeRanks:
    """Rank 0's handle on every rank of its node: `call(rank, command)` runs a command on any of them with
    the same answers (here, on a transfer thread, for rank 0; through its pipe for the others), so no caller
    branches on rank 0. `local`: rank 0's own `RankWork`; `conns`: its pipes to ranks 1, 2, ..."""

    def __init__(self, local: RankWork, threads: TransferThreads, conns: Sequence = ()) -> None:
        self.local = local
        self._threads = threads
        self._link = RankLink(conns) if conns else None
        self.size = 1 + len(conns)

    @property
    def others(self) -> range:
        return range(1, self.size)

    def call(self, rank: int, command: Command) -> asyncio.Future:
        if rank == 0:
            self.local.admit(command)
            return self._threads.run(self.local.run, command)
        if self._link is None:
            raise ValueError(f"rank: this node has one rank, got {rank}")
        return self._link.call(rank, command)
