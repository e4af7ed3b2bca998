"""A key's limits across routers (router/limits.py, router/ledger.py), on a real etcd: two limiters stand for two
routers. Budget is never granted twice, charges land exactly, a dead router's slices come back when its lease
expires, and with etcd stopped each limiter does what its policy says."""

from __future__ import annotations

import asyncio
import random

import pytest

from baton.cluster.etcd_server import EtcdServer
from baton.common.keys import KeyRecord
from baton.router.ledger import WINDOW_S, LedgerId, LedgerStore, ledger_root, read_usage
from baton.router.limits import Limiter, LimitsUnavailable, OverLimit

CLUSTER = "limits"


def record(**limits) -> KeyRecord:
    key_id = "%012x" % random.getrandbits(48)
    return KeyRecord(key_id=key_id, name=f"k-{key_id}", digest="0" * 64, **limits)


def limiter(url: str, router: str, **kw) -> Limiter:
    lim = Limiter(LedgerStore(url, CLUSTER, router, lease_ttl=kw.pop("lease_ttl", 10)), **kw)
    lim.start()
    return lim


async def usage(url: str, ledger: LedgerId):
    store = LedgerStore(url, CLUSTER, "reader")
    try:
        return await store.read(ledger)
    finally:
        await store.close()


@pytest.fixture(scope="module")
def etcd_url():
    with EtcdServer() as server:
        yield server.url


def test_routers_never_grant_a_quota_twice_and_charge_exactly(etcd_url):
    async def scenario(seed: int) -> None:
        key = record(quota_tokens=3000)
        routers = [limiter(etcd_url, f"r{i}") for i in range(4)]
        rng = random.Random(seed)
        charged = admitted = refused = 0

        async def one(lim: Limiter) -> None:
            nonlocal charged, admitted, refused
            tokens = rng.randint(10, 60)
            try:
                hold = await lim.reserve(key, f"r{rng.random()}", tokens)
            except OverLimit:
                refused += 1
                return
            admitted += 1
            await asyncio.sleep(rng.random() / 100)  # requests end in any order, with other grants between
            charge = tokens if rng.random() < 0.8 else tokens // 2  # some ended early (cancelled, failed)
            charged += charge
            await lim.settle_written(hold, charge)

        await asyncio.gather(*(one(routers[i % 4]) for i in range(300)))
        assert admitted and refused  # 300 requests of 10-60 tokens each: the quota ran out on the way
        await asyncio.gather(*(lim.close() for lim in routers))  # their slices go back
        spent = await usage(etcd_url, LedgerId(key.key_id, "quota"))
        assert spent.spent == charged <= 3000
        assert spent.held == 0

    async def main():
        for seed in range(4):
            await scenario(seed)

    asyncio.run(main())


def test_concurrency_is_shared_and_a_dead_routers_slices_come_back_with_its_lease(etcd_url):
    async def main():
        key = record(max_concurrency=3, quota_tokens=1000)
        a, b = limiter(etcd_url, "a", lease_ttl=2), limiter(etcd_url, "b")
        held = [await a.reserve(key, "a1", 100), await b.reserve(key, "b1", 100), await a.reserve(key, "a2", 100)]
        for lim in (a, b):
            with pytest.raises(OverLimit, match="requests in flight") as refused:
                await lim.reserve(key, "x", 100)
            assert refused.value.retry_after is not None
        await b.settle_written(held[1], 40)  # b's request ends: its place is free for either router
        await a.settle_written(held[0], 100)
        held.append(await b.reserve(key, "b2", 10))
        # a dies (its writer stops, nothing handed back) with a2 in flight: 100 tokens and a place held.
        a._task.cancel()
        await a.store._client.close()
        assert (await usage(etcd_url, LedgerId(key.key_id, "quota"))).held > 0
        # Until a's lease expires, the quota is short by what a held; then b can take all that was not charged.
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            try:
                hold = await b.reserve(key, "big", 1000 - 140 - 10)
                break
            except OverLimit:
                assert asyncio.get_running_loop().time() < deadline, "a's slices never came back"
                await asyncio.sleep(0.2)
        await b.settle_written(hold, 0)
        await b.settle_written(held[3], 10)
        await b.close()
        quota = await usage(etcd_url, LedgerId(key.key_id, "quota"))
        assert (quota.spent, quota.held) == (150, 0)

    asyncio.run(main())


def test_per_minute_windows_count_requests_and_tokens_per_minute(etcd_url):
    async def main():
        now = [WINDOW_S * 1000 + 1.0]
        key = record(rpm=3, tpm=200)
        lim = Limiter(LedgerStore(etcd_url, CLUSTER, "a"), clock=lambda: now[0])
        lim.start()
        holds = [await lim.reserve(key, f"r{i}", 50) for i in range(3)]
        with pytest.raises(OverLimit, match="requests per minute") as refused:
            await lim.reserve(key, "r3", 50)
        assert 0 < refused.value.retry_after <= WINDOW_S
        for hold in holds:
            await lim.settle_written(hold, 20)
        with pytest.raises(OverLimit):  # settled requests still count this minute
            await lim.reserve(key, "r4", 50)
        now[0] += WINDOW_S  # the next minute: a fresh window
        with pytest.raises(OverLimit, match="tokens per minute"):
            await lim.reserve(key, "big", 201)
        hold = await lim.reserve(key, "r5", 200)
        await lim.settle_written(hold, 200)
        await lim.close()
        first = await usage(etcd_url, LedgerId(key.key_id, "tpm", 1000))
        second = await usage(etcd_url, LedgerId(key.key_id, "tpm", 1001))
        assert (first.spent, second.spent) == (60, 200)
        assert (await usage(etcd_url, LedgerId(key.key_id, "rpm", 1000))).spent == 3

    asyncio.run(main())


@pytest.mark.parametrize("fail_open", [False, True])
def test_with_etcd_stopped_each_policy_holds(fail_open):
    async def main(server: EtcdServer):
        key = record(quota_tokens=10_000)
        lim = limiter(server.url, "a", fail_open=fail_open, idle_return_s=3600)
        lim.grant_timeout_s = 1.0
        first = await lim.reserve(key, "r0", 100)  # takes a slice: 1/8 of the pool
        await lim.settle_written(first, 100)
        held = next(iter(lim._accounts.values())).free
        server.kill_process()
        hold = await lim.reserve(key, "local", held - 10)  # budget already held: no etcd needed
        lim.settle(hold, 0)
        if fail_open:
            late = await lim.reserve(key, "r1", held + 500)  # admitted without budget
            lim.flush_wait_s = 0.5
            await lim.settle_written(late, 300)  # not written yet: etcd is down
        else:
            with pytest.raises(LimitsUnavailable):
                await lim.reserve(key, "r1", held + 500)
        server.relaunch()
        # close() writes what waited, within flush_wait_s: the 0.5 s above (for the write that could not land)
        # is shorter than a reconnection to the relaunched etcd takes on a loaded machine (gRPC's backoff): it
        # failed so once, writing nothing. close() returns as soon as the write lands.
        lim.flush_wait_s = 30.0
        await lim.close()
        quota = await usage(server.url, LedgerId(key.key_id, "quota"))
        assert quota.spent == (400 if fail_open else 100)

    with EtcdServer() as server:
        asyncio.run(main(server))


def test_a_ledger_reads_as_its_parts(etcd_url):
    """`read_usage` sums every router's parts of a ledger and nothing outside it."""
    async def main():
        key = record(quota_tokens=500)
        a, b = limiter(etcd_url, "a", idle_return_s=3600), limiter(etcd_url, "b", idle_return_s=3600)
        await a.settle_written(await a.reserve(key, "1", 30), 30)
        await b.settle_written(await b.reserve(key, "2", 20), 5)
        store = LedgerStore(etcd_url, CLUSTER, "reader")
        prefix = LedgerId(key.key_id, "quota").prefix(CLUSTER)
        kvs = await store._client.get_prefix(prefix)
        names = sorted(kv.key[len(prefix):].decode() for kv in kvs)
        assert names == ["slice/a", "slice/b", "spent/a", "spent/b", "v"]
        u = read_usage(kvs, prefix)
        assert u.spent == 35 and u.held + u.spent <= 500
        assert all(kv.key.startswith(ledger_root(CLUSTER).encode()) for kv in kvs)
        await store.close()
        await a.close()
        await b.close()

    asyncio.run(main())


def test_a_router_whose_lease_lapsed_takes_back_what_its_requests_hold(etcd_url):
    """Its slices went back to the pool when its ledger lease expired (cut off past its TTL; revoked here): it
    takes back what its requests in flight reserved, and their charges still land."""
    async def main():
        key = record(quota_tokens=1000)
        lim = limiter(etcd_url, "a", idle_return_s=3600)
        hold = await lim.reserve(key, "1", 100)
        other = LedgerStore(etcd_url, CLUSTER, "outside")
        await other._client.revoke_lease(await lim.store.lease())
        await other.close()
        quota = LedgerId(key.ledger_id, "quota")
        assert (await usage(etcd_url, quota)).held == 0  # the slice is gone with the lease
        await lim.settle_written(hold, 60)
        assert (await usage(etcd_url, quota)).spent == 60
        again = await lim.reserve(key, "2", 100)  # from a slice taken under the new lease
        assert (await usage(etcd_url, quota)).held >= 100
        lim.settle(again, 0)
        await lim.close()
        final = await usage(etcd_url, quota)
        assert (final.spent, final.held) == (60, 0)

    asyncio.run(main())
