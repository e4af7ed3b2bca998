"""The router's waiting room (router/flow.py) on its own: places, priorities, weighted fair queuing across keys,
bounds, shedding, waits that run out, callers that leave."""

from __future__ import annotations

import asyncio
import math

import pytest

from baton.router.flow import Busy, FlowSettings, ModelQueue


def queue(slots: float = 1, **settings) -> ModelQueue:
    return ModelQueue("m", FlowSettings(**settings), lambda: slots)


async def let_in_order(q: ModelQueue, arrivals: list[tuple[str, int, int, int]]) -> list[str]:
    """Fills the only place, queues `arrivals` (name, weight, priority, cost), then frees places one at a time:
    the names in the order they were let in."""
    first = await q.acquire("first", 1, 0, 1, 10)
    order: list[str] = []

    async def one(name: str, weight: int, priority: int, cost: int) -> None:
        slot = await q.acquire(name.split("-")[0], weight, priority, cost, 10)
        order.append(name)
        await asyncio.sleep(0)  # the next is let in only when this one is done
        slot.release()

    tasks = [asyncio.ensure_future(one(*a)) for a in arrivals]
    await asyncio.sleep(0)
    assert q.waiting == len(arrivals)
    first.release()
    await asyncio.gather(*tasks)
    return order


def test_a_flooding_key_does_not_starve_another():
    async def main():
        # "flood" queued 10 requests before "polite" sent its 2: fair queuing lets polite's in after one of flood's
        # each, FIFO after all of them.
        arrivals = [(f"flood-{i}", 1, 0, 100) for i in range(10)] + [("polite-0", 1, 0, 100), ("polite-1", 1, 0, 100)]
        fair = await let_in_order(queue(), arrivals)
        assert fair.index("polite-0") <= 1 and fair.index("polite-1") <= 3, fair
        fifo = await let_in_order(queue(policy="fifo"), arrivals)
        assert fifo == [a[0] for a in arrivals]

    asyncio.run(main())


def test_weights_share_places_and_priorities_go_first():
    async def main():
        arrivals = [(f"heavy-{i}", 3, 0, 10) for i in range(9)] + [(f"light-{i}", 1, 0, 10) for i in range(3)]
        order = await let_in_order(queue(), arrivals)
        # weight 3 against 1: three of heavy's for each of light's
        assert [n.split("-")[0] for n in order[:8]].count("heavy") == 6, order
        arrivals = [(f"low-{i}", 1, -1, 10) for i in range(3)] + [(f"high-{i}", 1, 5, 10) for i in range(2)]
        assert (await let_in_order(queue(), arrivals))[:2] == ["high-0", "high-1"]

    asyncio.run(main())


def test_a_full_queue_sheds_lower_priorities_and_else_refuses():
    async def main():
        q = queue(max_queued=2)
        held = await q.acquire("a", 1, 0, 1, 10)
        sheddable = asyncio.ensure_future(q.acquire("b", 1, -1, 1, 10))
        normal = asyncio.ensure_future(q.acquire("c", 1, 0, 1, 10))
        await asyncio.sleep(0)
        arrival = asyncio.ensure_future(q.acquire("d", 1, 0, 1, 10))  # full: the negative priority goes
        await asyncio.sleep(0)
        with pytest.raises(Busy) as shed:
            await sheddable
        assert shed.value.reason == "shed" and shed.value.retry_after >= 1
        with pytest.raises(Busy) as refused:  # full of its own priority: the arrival is refused
            await q.acquire("e", 1, 0, 1, 10)
        assert refused.value.reason == "queue_full"
        held.release()
        (await normal).release()
        (await arrival).release()
        assert (q.in_flight, q.waiting, q.queued_tokens) == (0, 0, 0)

    asyncio.run(main())


def test_tokens_bound_the_queue_and_waits_run_out():
    async def main():
        q = queue(max_queued_tokens=100)
        held = await q.acquire("a", 1, 0, 1, 10)
        with pytest.raises(Busy, match="tokens"):
            await q.acquire("b", 1, 0, 101, 10)
        with pytest.raises(Busy) as timed_out:
            await q.acquire("b", 1, 0, 50, 0.01)
        assert timed_out.value.reason == "queue_timeout"
        assert (q.waiting, q.queued_tokens) == (0, 0)
        held.release()

    asyncio.run(main())


def test_a_caller_that_leaves_gives_its_place_to_the_next():
    async def main(let_in_first: bool):
        q = queue()
        held = await q.acquire("a", 1, 0, 1, 10)
        leaving = asyncio.ensure_future(q.acquire("b", 1, 0, 1, 10))
        staying = asyncio.ensure_future(q.acquire("c", 1, 0, 1, 10))
        await asyncio.sleep(0)
        if let_in_first:  # b is let in, and its caller leaves before it runs
            held.release()
        leaving.cancel()
        try:
            (await leaving).release()  # the place reached it first: it owns the place, and gives it back
        except asyncio.CancelledError:
            pass
        if not let_in_first:
            assert q.waiting == 1
            held.release()
        slot = await asyncio.wait_for(staying, 5)
        assert q.in_flight == 1 and q.waiting == 0
        slot.release()
        slot.release()  # twice: nothing more
        assert q.in_flight == 0

    asyncio.run(main(False))
    asyncio.run(main(True))


def test_without_a_bound_nothing_waits():
    async def main():
        q = queue(math.inf)
        slots = [await q.acquire("a", 1, 0, 1, 0) for _ in range(100)]
        assert q.in_flight == 100 and q.waiting == 0
        for s in slots:
            s.release()

    asyncio.run(main())
