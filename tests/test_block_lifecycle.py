"""One owner for every block: the engine's release, the async engine's streams, the decode node's
reservation lifecycle and the background loops, on a real engine (stories260K) and a real event loop.

Each test makes one of the failure paths of the hardening issue happen deterministically, in process: the
same paths run end to end in test_failure_paths.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from baton.common.loops import every
from baton.decode.reservations import NotAllowed, Phase, Reservations
from baton.engine import LLM, FinishReason, SamplingParams
from baton.engine.async_engine import AsyncEngine

BOUND = 30.0  # seconds: an upper bound on what happens at once; a hang fails the test instead of blocking CI


def run(coro):
    async def bounded():
        async with asyncio.timeout(BOUND):
            return await coro

    return asyncio.run(bounded())


@pytest.fixture()
def engine(stories_path):
    return LLM(str(stories_path), num_kv_blocks=32).engine


def test_a_prefill_cancelled_while_queued_leaves_no_block(engine):
    """The cancel lands while the add is still queued on the engine thread (behind a step): the add runs
    after it, and the release queued behind the add undoes it. It used to keep the blocks for good."""

    async def main():
        ae = AsyncEngine(engine, asyncio.get_running_loop())
        try:
            ids = engine.tokenizer.encode("Once upon a time there was a little girl")
            for i in range(100):
                task = asyncio.ensure_future(_drain(ae.generate(f"q{i}", ids, SamplingParams(max_tokens=1),
                                                                prefill_only=True)))
                await asyncio.sleep(0)  # the add is submitted, not run
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            total, free, running, waiting, _ = await ae.load()
            assert (free, running, waiting) == (total, 0, 0)
        finally:
            await ae.close()

    run(main())


async def _drain(outputs):
    async for _ in outputs:
        pass


def test_a_release_ends_the_stream_of_an_adopted_sequence(engine):
    """A lease that runs out (or any release) while a sequence is being adopted or decoded must end the
    Continue stream reading it, with no client deadline to save it: the abort output reaches the stream."""

    async def main():
        ae = AsyncEngine(engine, asyncio.get_running_loop())
        try:
            ids = engine.tokenizer.encode("Once upon a time")
            await ae.reserve("x", len(ids), 400)
            stream = ae.open_stream("x")
            await ae.adopt("x", ids, 432, -0.1, SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
            outputs = ae.outputs("x", stream)
            first = await outputs.__anext__()
            assert first.finish_reason is None
            assert await ae.release("x") > 0
            reasons = [out.finish_reason async for out in outputs]
            assert reasons[-1] is FinishReason.ABORT
            total, free, _, _, _ = await ae.load()
            assert free == total
        finally:
            await ae.close()

    run(main())


def test_the_reservation_lifecycle_moves_forward_only_and_defers_release_while_receiving(engine, caplog):
    async def main():
        ae = AsyncEngine(engine, asyncio.get_running_loop())
        res = Reservations(ae)
        try:
            total = (await ae.load())[0]
            r = await res.reserve("a", 40, 8, lease_s=60)
            res.advance(r, Phase.RECEIVING)
            # A Release while K/V land: nothing is freed now (the receive still writes into the blocks)...
            assert await res.release("a", "released") == 0
            assert (await ae.load())[1] == total - 3 and r.phase is Phase.RECEIVING
            # ...and everything when the receive ends, even a successful one.
            await res.receive_ended(r, ok=True, cause="")
            assert r.phase is Phase.RELEASED and r.cause == "released" and (await ae.load())[1] == total
            assert res.get("a") is None and await res.release("a", "released") == 0  # twice is harmless

            b = await res.reserve("b", 20, 8, lease_s=60)
            with caplog.at_level(logging.ERROR), pytest.raises(NotAllowed):
                res.advance(b, Phase.DECODING)  # Continue before the K/V: refused and logged, nothing freed
            assert "RESERVED -> DECODING is not allowed" in caplog.text
            res.advance(b, Phase.RECEIVING)
            with pytest.raises(NotAllowed):
                res.advance(b, Phase.RECEIVING)  # a duplicate ReceiveKV
            await res.receive_ended(b, ok=False, cause="kv transfer failed: peer gone")
            assert b.phase is Phase.RELEASED and b.settled.is_set() and (await ae.load())[1] == total

            c = await res.reserve("c", 20, 8, lease_s=60)
            res.compute_here(c)  # conditional disaggregation: no K/V come, this node computes the prompt
            assert c.phase is Phase.DECODING
            with pytest.raises(NotAllowed):
                res.compute_here(c)  # only from RESERVED
            assert await res.release("c", "finished") == 2 and (await ae.load())[1] == total
        finally:
            await ae.close()

    run(main())


def test_leases_expire_only_while_nobody_writes_or_decodes(engine):
    async def main():
        now = [0.0]
        ae = AsyncEngine(engine, asyncio.get_running_loop())
        res = Reservations(ae, clock=lambda: now[0])
        try:
            total = (await ae.load())[0]
            idle = await res.reserve("idle", 16, 4, lease_s=1)
            busy = await res.reserve("busy", 16, 4, lease_s=1)
            res.advance(busy, Phase.RECEIVING)
            now[0] = 5.0
            await res.expire()
            assert idle.phase is Phase.RELEASED and idle.cause == "lease expired" and idle.settled.is_set()
            assert busy.phase is Phase.RECEIVING and (await ae.load())[1] == total - 1
            await res.receive_ended(busy, ok=True, cause="")
            assert busy.phase is Phase.READY
            await res.expire()  # READY and past its lease: Continue never came
            assert busy.phase is Phase.RELEASED and (await ae.load())[1] == total
        finally:
            await ae.close()

    run(main())


def test_a_background_loop_survives_its_exceptions(caplog):
    """Lease expiry, load reports and readiness run under `every`: an exception is logged, the loop goes on
    (the lease-expiry loop used to stop for good on its first one)."""

    async def main():
        calls = []
        done = asyncio.Event()

        async def step():
            calls.append(len(calls))
            if len(calls) in (1, 2):
                raise RuntimeError(f"injected failure {len(calls)}")
            if len(calls) == 4:
                done.set()

        task = asyncio.create_task(every(0.001, step, "test loop"))
        await done.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert calls == [0, 1, 2, 3]

    with caplog.at_level(logging.ERROR):
        run(main())
    assert caplog.text.count("test loop failed") == 2 and "injected failure 2" in caplog.text


def test_a_background_loops_transient_errors_are_one_line_warnings(caplog):
    """etcd slow to answer on a loaded machine is expected now and then: a warning without a traceback (a
    storm test that fails on any traceback failed on one), while other errors keep theirs."""

    async def main():
        calls = []
        done = asyncio.Event()

        async def step():
            calls.append(len(calls))
            if len(calls) == 1:
                raise TimeoutError("etcd did not answer")
            if len(calls) == 2:
                raise RuntimeError("a bug")
            done.set()

        task = asyncio.create_task(every(0.001, step, "report", transient=(TimeoutError,)))
        await done.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.WARNING):
        run(main())
    assert "report failed (TimeoutError: etcd did not answer)" in caplog.text
    assert caplog.text.count("Traceback") == 1 and "RuntimeError: a bug" in caplog.text


@contextlib.asynccontextmanager
async def decode_peers(**options):
    """A prefill node's `DecodePeers` over real pair channels and transfer threads, closed afterwards."""
    from baton.kvtransfer.channel import PairChannels, TransferThreads
    from baton.prefill.peers import DecodePeers

    channels, threads = PairChannels("prefill-0"), TransferThreads("t", 4)
    peers = DecodePeers(channels, threads, **options)
    try:
        yield peers, channels
    finally:
        await peers.close()
        channels.close()
        threads.close()


async def until(condition) -> None:
    """Yields to the loop until `condition` holds (bounded by `run`)."""
    while not condition():
        await asyncio.sleep(0)


def test_a_prefill_node_forgets_decode_peers_that_went_quiet():
    """Decode nodes used once and then gone: idle entries are forgotten when the next transfer starts, so the
    prefill node's per-peer state stays bounded. (20 nodes on one real rendezvous store: each forgotten peer
    costs a new store connection, and torch's TCPStore client stalls 5 s on every 25th one in a process.)"""
    from baton.kvtransfer.channel import KVStoreHost

    async def main():
        now = [0.0]
        async with decode_peers(idle_seconds=5, clock=lambda: now[0]) as (peers, channels):
            with KVStoreHost() as store:
                for i in range(20):
                    peer, generation, lane = await peers.acquire(f"decode-{i}", f"127.0.0.1:{10000 + i}",
                                                                 store.address, 10)
                    assert generation > 0 and lane == 0
                    peers.release(peer, generation, lane)
                    now[0] += 1.0
                assert len(peers) == 6  # the last 5 s of peers, and the one just used
                now[0] += 60
                peer, _, _ = await peers.acquire("decode-new", "127.0.0.1:9", store.address, 10)
                assert len(peers) == 1 and channels.peers() <= 1
                peers.failed(peer, None)  # a failure: forgotten once its last transfer ends
                peers.release(peer)
                assert len(peers) == 0

    run(main())


def test_a_decode_peers_lanes_are_held_one_transfer_each_and_lost_with_their_generation():
    """`DecodePeers` hands each transfer a lane no other transfer holds, makes the next one wait while all are
    held, takes a lane back only on a generation that did not fail, and loses no wake-up to a waiter that was
    cancelled just after it was woken."""
    from baton.kvtransfer.channel import KVStoreHost

    async def main():
        async with decode_peers(lanes=2) as (peers, _):
            acquire = lambda: peers.acquire("decode-0", "127.0.0.1:9", store.address, 10)  # noqa: E731
            with KVStoreHost() as store:
                peer, generation, first = await acquire()
                _, same, second = await acquire()
                assert (same, first, second) == (generation, 0, 1)
                waiting = asyncio.ensure_future(acquire())
                await until(lambda: len(peer.waiters) == 1)
                assert not waiting.done() and peer.active == 3
                peers.release(peer, generation, 0)  # the decode node answered: the waiter gets lane 0
                assert await waiting == (peer, generation, 0)

                # Both lanes held again: two waiters; the first is woken and cancelled before it runs.
                w1, w2 = asyncio.ensure_future(acquire()), asyncio.ensure_future(acquire())
                await until(lambda: len(peer.waiters) == 2)
                peers.release(peer, generation, 1)
                w1.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await w1
                assert await w2 == (peer, generation, 1)  # the wake-up went on to the next in line

                # A transfer that ended without the decode node's answer: its generation goes, lanes and all.
                w3 = asyncio.ensure_future(acquire())
                await until(lambda: len(peer.waiters) == 1)
                peers.failed(peer, generation)
                peers.release(peer, generation, 0)
                _, newer, lane = await w3  # woken to open the next generation
                assert newer > generation and lane == 0
                peers.release(peer, generation, 1)  # a late end on the old generation returns nothing
                assert peer.free_lanes == [1]
                peers.release(peer, newer, lane)
                assert peer.active == 0 and len(peers) == 0  # broken: forgotten with its last transfer

    run(main())


def test_transfers_queued_for_a_lane_of_a_dead_decode_node_fail_together():
    """The decode node died with every lane held: the transfers waiting for a lane are woken when its
    generation fails, one tries its store, and all fail together, instead of each waiting out a connection
    timeout to the dead store in turn (they used to reach the client's deadline)."""
    from baton.kvtransfer.channel import KVStoreHost, KVTransferError

    async def main():
        async with decode_peers(lanes=1) as (peers, channels):
            attempts = []
            next_generation = channels.next_generation
            channels.next_generation = lambda *a: attempts.append(a) or next_generation(*a)
            store = KVStoreHost()
            address = store.address
            peer, generation, lane = await peers.acquire("decode-0", "127.0.0.1:9", address, 10)
            waiters = [asyncio.ensure_future(peers.acquire("decode-0", "127.0.0.1:9", address, 10)) for _ in range(3)]
            await until(lambda: len(peer.waiters) == 3)
            store.close()  # the decode node dies: its store goes with it
            del store
            peers.failed(peer, generation)  # the lane's transfer failed
            results = await asyncio.gather(*waiters, return_exceptions=True)
            assert all(isinstance(r, KVTransferError) for r in results), results
            assert len(attempts) == 2  # the first acquire's, and one after the failure: not one per waiter
            peers.release(peer, generation, lane)
            assert len(peers) == 0

    run(main())
