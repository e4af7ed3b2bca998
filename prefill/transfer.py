"""A prefill node's K/V on their way to the decode node: the `Transfer` interface that `PrefillServicer.Prefill`
drives, whichever path carries them (`pair.PairTransfer`: the pair channel; `same_device.SameDeviceTransfer`:
written straight into the decode node's pool, mapped here).

A transfer moves forward only, driven by the one skeleton:

    NEW ──start()──▶ ANNOUNCED ──(the prompt is computed: the KV sink posts its layers)──▶ confirm() ──▶ CONFIRMED
     └────────────────┴─────────────────────────────┴──────────end(), whatever ended the call──────▶ ENDED

  start()    takes what the path needs from `DecodePeers` and tells the decode node (ReceiveKV): from here the
             transfer is owed to it, whole or given up, however the call ends
  confirm()  the bytes sent, once the decode node has them all
  failed()   the skeleton's one error path hands the transfer its failure (what it means is the path's)
  end()      settles what is still owed (shielded; the request has left the engine first), and gives the
             peer's entry back

The skeleton counts bytes and transfer times; each path counts nothing of its own but the bytes per sending
rank (`Sending.rank_bytes`).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from baton.engine.config import ModelConfig
from baton.kvtransfer.channel import KVTransferError, TransferThreads
from baton.kvtransfer.ranks import NodeRanks
from baton.v1 import node_pb2

from .peers import DecodePeers


@dataclass(frozen=True, slots=True)
class Sending:
    """What every transfer from this node shares."""

    node_id: str
    peers: DecodePeers
    ranks: NodeRanks
    threads: TransferThreads
    layout: node_pb2.KVLayout
    model_config: ModelConfig
    device: torch.device  # this node's KV pool's
    head_starts: tuple[int, ...]  # each rank's first KV head
    num_layers: int
    timeout: float
    rank_bytes: list[int]  # KV bytes each rank sent (mutable: the pair path adds to it)


class Transfer(abc.ABC):
    """One request's transfer (see the module's docstring). `request`: its PrefillRequest."""

    kind = "kv transfer"  # how its log lines name it
    failures: tuple[type[BaseException], ...] = (KVTransferError, grpc.aio.AioRpcError)  # the path's failures

    def __init__(self, sending: Sending, request, runs: list[tuple[int, int]]) -> None:
        self.sending = sending
        self.request_id = request.request_id
        self.target = request.target
        self.runs = runs  # the decode node's blocks it sends to, coalesced: those after its cached ones
        self.first_block = request.target.cached_blocks  # the prompt's first block it sends
        # A resumed stream's delivered tokens are computed (and their K/V sent) with the prompt.
        self.num_tokens = len(request.prompt_token_ids) + len(request.resumed.token_ids)
        self.started = 0.0  # time.monotonic() when the decode node was told
        self._confirmation: asyncio.Future | None = None

    @abc.abstractmethod
    async def start(self) -> None:
        """Before the prompt is scheduled. Raises one of `failures`."""

    def confirmation(self, counted: Callable[[int], None]) -> asyncio.Future:
        """`confirm()`, then `counted(bytes)`, as a future made once: the skeleton awaits it (it goes on if the
        call ends first, as it may once the decode node has the K/V), and `end` may wait for it."""
        if self._confirmation is None:
            async def confirmed() -> int:
                sent = await self.confirm()
                counted(sent)
                return sent

            self._confirmation = asyncio.ensure_future(confirmed())
            self._confirmation.add_done_callback(retrieve)
        return self._confirmation

    @abc.abstractmethod
    async def confirm(self) -> int:
        """The bytes sent, once the decode node has them all. Raises one of `failures`."""

    @abc.abstractmethod
    def failed(self, error: BaseException) -> None:
        """The call failed with `error`, one of `failures`."""

    @abc.abstractmethod
    async def end(self) -> None:
        """Whatever ended the call, once the request has left the engine (no layer is posted for it after)."""


def retrieve(future: asyncio.Future) -> None:
    """Marks a future's error as seen (a failed transfer does not wait for every one of its parts)."""
    if not future.cancelled():
        future.exception()


def short(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return str(e) or type(e).__name__
