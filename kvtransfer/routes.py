"""KV transfers between nodes of any tensor-parallel degrees: rank to rank, never through one process.

A transfer from a prefill node of degree p to a decode node of degree d is split into pieces
(`engine.parallel.kv_routes`): prefill rank s sends KV heads [a, b) to decode rank r. Each piece, as one of its
two ranks sees it, is a `Route`: a transfer of its own (the `sender` / `receiver` protocol; a head range is
packed into one contiguous buffer per layer) on the pair channel between those two processes, each named by its
rank (`rank_name`). Every route of a transfer travels on the node pair's generation and lane, so the lanes'
rule (one transfer at a time, a lane given back only once the decode node has answered) holds for all of them
at once; a failure of any route fails the transfer and its generation, for every rank.

A prefill rank's routes are `RouteSenders` (its engine's KV sink posts their layers from its own step); a
decode rank's are `receive_route` calls. Which rank runs what is `ranks.py`'s business.

A pull (`Route.pull`) goes the other way on the same lanes: a decode rank sends blocks it holds cached
(`send_route`, every layer at once from its pool) into blocks a prefill rank reserved (`receive_route`), with the
same header, checksums and failure handling. The pair group's ranks stay what they are (prefill 0, decode 1).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
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
    first_block: int = 0  # the prompt's first block it carries: the decode node holds those before (cached)
    pull: bool = False  # decode -> prefill: the decode node's cached blocks read back (`runs`: the prefill node's)

    @property
    def ranks(self) -> tuple[int, int]:
        """(this rank's place in the pair group, the peer's) for the receiving end."""
        return (PREFILL_RANK, DECODE_RANK) if self.pull else (DECODE_RANK, PREFILL_RANK)


@dataclass(frozen=True, slots=True)
class TransferRoutes:
    """What every route of one transfer shares, as one node sees it: the routes differ only in their ranks
    and heads (`routes`)."""

    request_id: str
    node_id: str  # this node's
    peer_id: str  # the other node's
    generation: int
    lane: int
    store: str
    runs: tuple[tuple[int, int], ...]
    num_layers: int
    first_block: int = 0
    pull: bool = False

    def routes(self, pieces, sending: bool, head_starts: Sequence[int]) -> list[tuple[int, Route]]:
        """Each piece (`engine.parallel.KVRoute`: src rank, dst rank, global head range) as this node's rank
        sees it: (that rank, its Route, with the heads in the rank's own numbering). `head_starts`: the first
        global KV head of each of this node's ranks."""
        out = []
        for piece in pieces:
            mine, theirs = (piece.src, piece.dst) if sending else (piece.dst, piece.src)
            start = head_starts[mine]
            out.append((mine, Route(self.request_id, rank_name(self.node_id, mine), rank_name(self.peer_id, theirs),
                                    self.generation, self.lane, self.store, self.runs,
                                    (piece.head_start - start, piece.head_end - start), self.num_layers,
                                    self.first_block, self.pull)))
        return out


class RouteSenders:
    """A prefill rank's route senders, by request: its engine's KV sink (engine thread) and the routes' opens
    and ends (transfer threads). `pools`: this rank's KV pools, one per layer."""

    def __init__(self, channels: PairChannels, pools: Sequence[torch.Tensor], staging: Staging | None = None) -> None:
        self.channels = channels
        self.pools = pools
        self.staging = staging if staging is not None else Staging()
        self._senders: dict[str, list[tuple[int, KVSender]]] = {}  # (the first block it sends, the sender)
        self._lock = threading.Lock()

    def open(self, route: Route, timeout: float) -> None:
        """Opens (or reuses) the route's lane and registers its sender: its header goes when the prompt's step
        starts. Blocking. Raises KVTransferError (nothing is registered then)."""
        group = self.channels.get(route.peer, route.generation, route.store, PREFILL_RANK, timeout, route.lane)
        heads = None if route.heads == (0, self.pools[0].shape[3]) else route.heads
        sender = KVSender(group, DECODE_RANK, route.request_id, None, route.runs, num_layers=route.num_layers,
                          pool=self.pools[0], post_header=False, staging=self.staging, heads=heads)
        self.add(route.request_id, sender, route.first_block)

    def add(self, request_id: str, sender, first_block: int = 0) -> None:
        """Registers a sender of the request's K/V for the KV sink (a route's `KVSender`, or a same-device
        `SharedWriter`: the same verbs), which sends the prompt's blocks from `first_block` on."""
        with self._lock:
            self._senders.setdefault(request_id, []).append((first_block, sender))

    def remove(self, request_id: str) -> list:
        """Takes the request's senders out: the KV sink posts nothing more for them."""
        with self._lock:
            return [sender for _, sender in self._senders.pop(request_id, [])]

    def end(self, request_id: str, timeout: float) -> int:
        """Ends the request's routes from this rank (call once its engine holds the request no more): what a
        route still owes goes (a cancel header, or zeros), then every send is waited for. Returns the bytes
        sent; raises the first route's KVTransferError."""
        sent, error = 0, None
        for sender in self.remove(request_id):
            sender.end_early()  # nothing if every layer went
            try:
                sent += sender.wait(timeout)
            except KVTransferError as e:
                error = error or e
        if error is not None:
            raise error
        return sent

    def _of(self, request_id: str) -> list[tuple[int, object]]:
        with self._lock:
            return list(self._senders.get(request_id, ()))

    # The KV sink (engine thread, inside a step): never raises, a failure stays with its sender.
    def step_started(self, prompts: list[tuple[str, list[int]]], pool: torch.Tensor) -> None:
        for rid, table in prompts:
            for first, sender in self._of(rid):
                try:
                    sender.begin(table[first: first + sender.num_blocks], pool)
                except Exception as e:  # noqa: BLE001 - kept by the sender, raised by its wait
                    log.warning("kv transfer of %s: the header failed: %s", rid, e)

    def layer_done(self, layer: int, pool: torch.Tensor, prompts: list[tuple[str, list[int]]]) -> None:
        for rid, _ in prompts:
            for _, sender in self._of(rid):
                if sender.failed is None and sender.header is not None:
                    try:
                        sender.send_layer(layer, pool)
                    except Exception as e:  # noqa: BLE001 - a dead peer fails only the transfers bound for it
                        log.warning("kv transfer of %s: layer %d failed: %s", rid, layer, e)


def receive_route(channels: PairChannels, route: Route, pools: Sequence[torch.Tensor], timeout: float,
                  drain_only: bool = False, abandoned: Callable[[], bool] | None = None) -> int:
    """The receiving rank's side of a route (a decode rank's; a prefill rank's for a pull): received into the
    reserved blocks' head range (or, `drain_only`, taken in and dropped: the reservation is gone). Blocking.
    Returns the bytes; raises TransferCancelled (the lane is in step) or KVTransferError, after dropping the
    route's generation with that peer. `abandoned`: see `PairChannels.get` (a set-up still waiting for its peer
    gives up once it is true)."""
    me, peer = route.ranks
    try:
        group = channels.get(route.peer, route.generation, route.store, me, timeout, route.lane, abandoned)
        if drain_only:
            first = pools[0]
            shape = (2, first.shape[2], route.heads[1] - route.heads[0], first.shape[4])
            return drain(group, peer, route.request_id, route.runs, shape, first.dtype, first.device, timeout)
        return receive(group, peer, route.request_id, pools, route.runs, timeout, heads=route.heads)
    except TransferCancelled:
        raise
    except Exception as e:
        channels.drop(route.peer, route.generation)  # this generation only: a newer one serves others
        if isinstance(e, KVTransferError):
            raise
        raise KVTransferError(f"kv route of {route.request_id} from {route.peer}: {e}") from e


def send_route(channels: PairChannels, route: Route, src_blocks: Sequence[int], pools: Sequence[torch.Tensor],
               timeout: float) -> int:
    """A decode rank's side of a pulled route: the K/V of `src_blocks` (cached blocks of its pool, held by a
    reservation meanwhile), every layer at once, into the prefill rank's `route.runs`; with no `src_blocks`, a
    cancel header (the pull was refused: the lane stays in step). Blocking. Returns the bytes sent; raises
    KVTransferError after dropping the route's generation with that peer."""
    try:
        group = channels.get(route.peer, route.generation, route.store, DECODE_RANK, timeout, route.lane)
        heads = None if route.heads == (0, pools[0].shape[3]) else route.heads
        if not src_blocks:
            sender = KVSender(group, PREFILL_RANK, route.request_id, None, route.runs, num_layers=len(pools),
                              pool=pools[0], post_header=False, heads=heads)
            sender.end_early()  # before any header: a cancel header
            return sender.wait(timeout)
        sender = KVSender(group, PREFILL_RANK, route.request_id, src_blocks, route.runs, num_layers=len(pools),
                          pool=pools[0], heads=heads)
        for layer, pool in enumerate(pools):
            sender.send_layer(layer, pool)
        return sender.wait(timeout)
    except Exception as e:
        channels.drop(route.peer, route.generation)
        if isinstance(e, KVTransferError):
            raise
        raise KVTransferError(f"kv pull of {route.request_id} to {route.peer}: {e}") from e
