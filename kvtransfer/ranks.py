"""KV transfers between nodes of any tensor-parallel degrees: rank to rank, never through one process.

A transfer from a prefill node of degree p to a decode node of degree d is split into routes
(`engine.parallel.kv_routes`): prefill rank s sends KV heads [a, b) to decode rank r. A route is a transfer of
its own (the `sender` / `receiver` protocol; a head range is packed into one contiguous buffer per layer) on
the pair channel between those two processes, each named by its rank (`rank_name`). Every route of a transfer
travels on the node pair's generation and lane, so the lanes' rule (one transfer at a time, a lane given back
only once the decode node has answered) holds for all of them at once; a failure of any route fails the
transfer and its generation, for every rank.

Rank 0 of each node speaks gRPC and drives its other ranks through one pipe each: `RankLink` (rank 0) sends a
numbered command, `RankAgent` (on the rank) runs it on a thread of its own and answers under that number, so
the answers of two routes (two ranks, or two requests) are never taken for one another. A decode node's
transfer is complete when every route's receiver has answered. A prefill rank posts its sends from its own
engine step: `RouteSenders` is each prefill rank's KV sink, and rank 0 broadcasts the step's prompts with its
inputs (`engine.tp_runtime`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .channel import DECODE_RANK, PREFILL_RANK, KVTransferError, PairChannels, TransferCancelled
from .receiver import drain, receive
from .sender import KVSender, Staging

log = logging.getLogger(__name__)


def rank_name(node_id: str, rank: int) -> str:
    """A node's rank as a pair channel peer. Rank 0 is the node itself; node ids never hold a "/", so
    `PairChannels.drop(node_id)` can find a node's other ranks by the prefix."""
    return node_id if rank == 0 else f"{node_id}/{rank}"


@dataclass(frozen=True, slots=True)
class Route:
    """One route of one transfer, as one of its two ranks sees it."""

    request_id: str
    me: str  # this rank's name (`rank_name`)
    peer: str  # the other end's
    generation: int  # the node pair's
    lane: int
    store: str  # the decode node's KV store address (rank 0 hosts it for all its ranks)
    runs: tuple[tuple[int, int], ...]  # the decode node's reserved blocks, coalesced
    heads: tuple[int, int]  # the range of this rank's own KV heads that the route carries
    num_layers: int


class RouteSenders:
    """A prefill rank's route senders, by request: its engine's KV sink (engine thread) and the routes' opens
    and ends (transfer threads). `pools`: this rank's KV pools, one per layer."""

    def __init__(self, channels: PairChannels, pools: Sequence[torch.Tensor], staging: Staging | None = None) -> None:
        self.channels = channels
        self.pools = pools
        self.staging = staging if staging is not None else Staging()
        self._senders: dict[str, list[KVSender]] = {}
        self._lock = threading.Lock()

    def open(self, route: Route, timeout: float) -> None:
        """Opens (or reuses) the route's lane and registers its sender: its header goes when the prompt's step
        starts. Blocking. Raises KVTransferError (nothing is registered then)."""
        group = self.channels.get(route.peer, route.generation, route.store, PREFILL_RANK, timeout, route.lane)
        heads = None if route.heads == (0, self.pools[0].shape[3]) else route.heads
        sender = KVSender(group, DECODE_RANK, route.request_id, None, route.runs, num_layers=route.num_layers,
                          pool=self.pools[0], post_header=False, staging=self.staging, heads=heads)
        with self._lock:
            self._senders.setdefault(route.request_id, []).append(sender)

    def end(self, request_id: str, timeout: float) -> int:
        """Ends the request's routes from this rank (call once its engine holds the request no more): what a
        route still owes goes (a cancel header, or zeros), then every send is waited for. Returns the bytes
        sent; raises the first route's KVTransferError."""
        with self._lock:
            senders = self._senders.pop(request_id, [])
        sent, error = 0, None
        for sender in senders:
            sender.end_early()  # nothing if every layer went
            try:
                sent += sender.wait(timeout)
            except KVTransferError as e:
                error = error or e
        if error is not None:
            raise error
        return sent

    def _of(self, request_id: str) -> list[KVSender]:
        with self._lock:
            return list(self._senders.get(request_id, ()))

    # The KV sink (engine thread, inside a step): never raises, a failure stays with its route's sender.
    def step_started(self, prompts: list[tuple[str, list[int]]], pool: torch.Tensor) -> None:
        for rid, table in prompts:
            for sender in self._of(rid):
                try:
                    sender.begin(table[: sender.num_blocks], pool)
                except Exception as e:  # noqa: BLE001 - kept by the sender, raised by its wait
                    log.warning("kv route of %s: the header failed: %s", rid, e)

    def layer_done(self, layer: int, pool: torch.Tensor, prompts: list[tuple[str, list[int]]]) -> None:
        for rid, _ in prompts:
            for sender in self._of(rid):
                if sender.failed is None and sender.header is not None:
                    try:
                        sender.send_layer(layer, pool)
                    except Exception as e:  # noqa: BLE001 - a dead peer fails only the routes bound for it
                        log.warning("kv route of %s: layer %d failed: %s", rid, layer, e)


def receive_route(channels: PairChannels, route: Route, pools: Sequence[torch.Tensor], timeout: float,
                  drain_only: bool = False, abandoned: Callable[[], bool] | None = None) -> int:
    """A decode rank's side of a route: received into the reserved blocks' head range (or, `drain_only`, taken
    in and dropped: the reservation is gone). Blocking. Returns the bytes; raises TransferCancelled (the lane is
    in step) or KVTransferError, after dropping the route's generation with that peer. `abandoned`: see
    `PairChannels.get` (a set-up still waiting for its peer gives up once it is true)."""
    try:
        group = channels.get(route.peer, route.generation, route.store, DECODE_RANK, timeout, route.lane,
                             abandoned)
        if drain_only:
            first = pools[0]
            shape = (2, first.shape[2], route.heads[1] - route.heads[0], first.shape[4])
            return drain(group, PREFILL_RANK, route.request_id, route.runs, shape, first.dtype, first.device,
                         timeout)
        return receive(group, PREFILL_RANK, route.request_id, pools, route.runs, timeout, heads=route.heads)
    except TransferCancelled:
        raise
    except Exception as e:
        channels.drop(route.peer, route.generation)  # this generation only: a newer one serves others
        if isinstance(e, KVTransferError):
            raise
        raise KVTransferError(f"kv route of {route.request_id} from {route.peer}: {e}") from e


# -- rank 0 and the others --------------------------------------------------------------------------------

OK, CANCELLED, FAILED = "ok", "cancelled", "failed"


class RankAgent:
    """A worker rank's end of its pipe to rank 0: runs the KV commands rank 0 sends, each on a thread of its
    own (a receive waits for its sender, an open for its peer), and answers each under its number.

    Commands: ("open", Route, timeout), ("end", request id, timeout), ("recv", Route, timeout, drain_only),
    ("abandon", request id) (a receive still waiting for its peer to join gives up), ("drop", peer, generation). The pair channels are made on the first command, which names this rank."""

    def __init__(self, conn, pools: Sequence[torch.Tensor], device: torch.device, max_threads: int = 256) -> None:
        self.conn = conn
        self.pools = pools
        self.device = device
        self.senders: RouteSenders | None = None  # read by the worker's step: None until a route was opened
        self._channels: PairChannels | None = None
        self._lock = threading.Lock()  # the pipe's writes, making the channels, the two sets below
        self._receiving: Counter[str] = Counter()  # request id -> its routes receiving here
        self._abandoned: set[str] = set()  # those of them whose transfer rank 0 gave up
        self._threads = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="kv-rank")
        threading.Thread(target=self._serve, name="kv-agent", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                number, command = self.conn.recv()
            except (EOFError, OSError):
                return  # rank 0 is gone: this process ends with it
            self._threads.submit(self._run, number, command)

    def _run(self, number: int, command: tuple) -> None:
        try:
            answer = (OK, self._execute(*command))
        except TransferCancelled as e:
            answer = (CANCELLED, str(e))
        except Exception as e:  # noqa: BLE001 - every failure is rank 0's to handle
            answer = (FAILED, f"{type(e).__name__}: {e}" if not isinstance(e, KVTransferError) else str(e))
        with self._lock:
            try:
                self.conn.send((number, *answer))
            except (OSError, ValueError):
                pass  # rank 0 is gone

    def _execute(self, op: str, *args):
        if op == "open":
            route, timeout = args
            self._for(route.me)
            return self.senders.open(route, timeout)
        if op == "end":
            request_id, timeout = args
            return self.senders.end(request_id, timeout) if self.senders is not None else 0
        if op == "recv":
            route, timeout, drain_only = args
            with self._lock:
                self._receiving[route.request_id] += 1
            try:
                return receive_route(self._for(route.me), route, self.pools, timeout, drain_only,
                                     lambda: route.request_id in self._abandoned)
            finally:
                with self._lock:
                    self._receiving[route.request_id] -= 1
                    if not self._receiving[route.request_id]:
                        del self._receiving[route.request_id]
                        self._abandoned.discard(route.request_id)
        if op == "abandon":
            (request_id,) = args
            with self._lock:
                if request_id in self._receiving:  # else nothing waits: nothing to remember
                    self._abandoned.add(request_id)
            return None
        if op == "drop":
            peer, generation = args
            if self._channels is not None:
                self._channels.drop(peer, generation)
            return None
        raise ValueError(f"unknown command {op!r}")

    def _for(self, me: str) -> PairChannels:
        with self._lock:
            if self._channels is None:
                self._channels = PairChannels(me, self.device)
                self.senders = RouteSenders(self._channels, self.pools)
            return self._channels


class RankLink:
    """Rank 0's ends of the pipes to ranks 1, 2, ...: `call(rank, op, ...)` is an asyncio future of the answer
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

    def call(self, rank: int, op: str, *args) -> asyncio.Future:
        future: Future = Future()
        with self._lock:
            number = next(self._numbers)
            if rank in self._dead:
                future.set_exception(KVTransferError(f"rank {rank} is gone"))
            else:
                self._waiting[number] = (rank, future)
                try:
                    self._conns[rank - 1].send((number, (op, *args)))
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
            if status == OK:
                future.set_result(value)
            elif status == CANCELLED:
                future.set_exception(TransferCancelled(value))
            else:
                future.set_exception(KVTransferError(f"rank {rank}: {value}"))
        with self._lock:
            self._dead.add(rank)
            orphans = [n for n, (r, _) in self._waiting.items() if r == rank]
            futures = [self._waiting.pop(n)[1] for n in orphans]
        for future in futures:
            future.set_exception(KVTransferError(f"rank {rank} is gone"))
