"""The same-device path of a prefill node's transfer (`transfer.Transfer`; `kvtransfer/shared.py`): the K/V are
copied straight into the decode node's pool, mapped here, and the decode node holds the reservation as
receiving from ReceiveKV (shared) until KVWritten.

  start    each decode rank's storage mapped here (once per peer entry and storage), ReceiveKV (shared) and a
           `SharedWriter` registered with this node's KV sink (the same verbs as a route's sender)
  confirm  the copies waited for, then KVWritten (ok)
  end      the writer leaves the KV sink; copies already queued are waited for (the blocks are the decode
           node's again only after); a transfer still owed is given up (KVWritten, not ok)

Owed: from the moment ReceiveKV may reach the decode node until KVWritten answered, or until ReceiveKV was
refused (a refused ReceiveKV owes nothing; a failed KVWritten leaves the blocks to the decode node's
deadline).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import torch

from baton.common.kv_messages import share_from_proto
from baton.engine.parallel import kv_routes
from baton.kvtransfer.channel import KVTransferError
from baton.kvtransfer.shared import SharedWriter
from baton.v1 import node_pb2

from .peers import DecodePeer
from .transfer import Transfer, short

log = logging.getLogger(__name__)


class SameDeviceTransfer(Transfer):
    kind = "kv writes"
    # ValueError / RuntimeError: the pool could not be mapped (a stale handle, another device).
    failures = (KVTransferError, grpc.aio.AioRpcError, ValueError, RuntimeError)

    def __init__(self, sending, request, runs) -> None:
        super().__init__(sending, request, runs)
        self.peer: DecodePeer | None = None
        self.writer: SharedWriter | None = None
        self.owed = False  # the decode node waits for KVWritten

    async def start(self) -> None:
        s, target = self.sending, self.target
        self.peer = s.peers.entry(target.decode_node_id, target.decode_address, target.kv_store_address)
        targets = await self._targets()
        # Owed from the moment the call may reach the decode node: cancelled while it is in flight, the transfer
        # still says "given up" (a decode node that never began answers NOT_FOUND, harmlessly).
        self.owed = True
        self.started = time.monotonic()
        await self.peer.stub.ReceiveKV(node_pb2.ReceiveKVRequest(
            request_id=self.request_id, prefill_node_id=s.node_id, layout=s.layout, num_tokens=self.num_tokens,
            block_ids=target.block_ids, transfer_tag=target.transfer_tag, shared=True, first_block=self.first_block),
            timeout=s.timeout)
        self.writer = SharedWriter(targets, list(target.block_ids)[self.first_block:], s.num_layers)
        # The KV sink copies each layer as it is done, of the blocks after the decode node's cached ones.
        s.ranks.local.senders.add(self.request_id, self.writer, self.first_block)

    async def _targets(self) -> list[tuple[torch.Tensor, int, int]]:
        """Each decode rank's storage, mapped here, with the range of this node's KV heads it holds
        (`kv_routes`: all of them from this single rank)."""
        s, target = self.sending, self.target
        shares = [target.share, *target.rank_shares]
        routes = kv_routes(s.model_config, 1, len(shares))
        mapped = [await s.peers.mapped_pool(self.peer, share_from_proto(share), s.device, rank)
                  for rank, share in enumerate(shares)]
        return [(mapped[r.dst], r.head_start, r.head_end) for r in routes]

    async def confirm(self) -> int:
        s = self.sending
        written = await s.threads.run(self.writer.wait, s.timeout)
        await self.peer.stub.KVWritten(node_pb2.KVWrittenRequest(
            request_id=self.request_id, prefill_node_id=s.node_id, ok=True, bytes_written=written), timeout=s.timeout)
        self.owed = False
        return written

    def failed(self, error: BaseException) -> None:
        self.owed = self.owed and not isinstance(error, grpc.aio.AioRpcError)

    async def end(self) -> None:
        s = self.sending
        confirming = self._confirmation
        if confirming is not None:  # the call ended while its writes were being confirmed: they end first
            await asyncio.wait([confirming])
            self.owed = self.owed and (confirming.cancelled() or confirming.exception() is not None)
        s.ranks.local.senders.remove(self.request_id)
        if self.writer is not None:
            self.writer.end_early()
            await s.threads.run(self.writer.settle)  # the blocks are the decode node's again only after this
        if self.owed:
            try:
                await self.peer.stub.KVWritten(node_pb2.KVWrittenRequest(
                    request_id=self.request_id, prefill_node_id=s.node_id, ok=False), timeout=s.timeout)
            except grpc.aio.AioRpcError as e:
                # NOT_FOUND: the decode node had not begun (the call was cancelled in flight) or already ended.
                # Anything else: its deadline frees the blocks anyway.
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    log.info("kv writes of %s: telling %s they were given up did not reach it: %s", self.request_id,
                             self.peer.node_id, short(e))
        if self.peer is not None:
            s.peers.release(self.peer)
