"""Membership against a real etcd server: registration, leases, the watcher and its recovery."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid

import aetcd
import pytest
import uvloop

from baton.cluster import etcd_server
from baton.cluster.etcd_server import EtcdServer
from baton.common.membership import MembershipWatcher, NodeInfo, NodeRegistration, node_key, nodes_prefix

WAIT = 5.0  # bound on waits for things that happen within milliseconds


def run(coro, *, loop: str = "uvloop", limit: float = 30.0):
    """Run one test body on a fresh event loop (uvloop, as the services run), bounded as a whole."""

    async def bounded():
        async with asyncio.timeout(limit):
            return await coro

    with asyncio.Runner(loop_factory=uvloop.new_event_loop if loop == "uvloop" else None) as runner:
        return runner.run(bounded())


@pytest.fixture(scope="module")
def etcd():
    with EtcdServer() as server:
        yield server


@pytest.fixture
def cluster() -> str:
    return f"t{uuid.uuid4().hex[:10]}"  # tests share the server, never a cluster


def node(node_id: str, role: str = "prefill", **load) -> NodeInfo:
    return NodeInfo(node_id=node_id, role=role, model="stories260K", address=f"127.0.0.1:{5000 + len(node_id)}",
                    capacity=64, free_blocks=64, **load)


# -- NodeInfo ------------------------------------------------------------------------------------------
def test_node_info_round_trips_and_validates():
    info = node("p0", running=2, waiting=1)
    assert NodeInfo.from_json(info.to_json()) == info
    assert node_key("c1", "decode", "d7") == "/baton/c1/nodes/decode/d7"
    with pytest.raises(ValueError, match="role"):
        node("x", role="router")
    with pytest.raises(ValueError, match="free_blocks"):
        NodeInfo("x", "decode", "m", "h:1", capacity=4, free_blocks=5)
    with pytest.raises(ValueError, match="running"):
        node("x", running=-1)
    with pytest.raises(ValueError, match="node_id"):
        node("a/b")
    with pytest.raises(ValueError, match="unknown fields"):
        NodeInfo.from_json(b'{"node_id":"x","role":"decode","model":"m","address":"h:1","gpu":0}')
    with pytest.raises(ValueError, match="address"):
        NodeInfo.from_json(b'{"node_id":"x","role":"decode","model":"m"}')
    with pytest.raises(ValueError, match="cluster"):
        nodes_prefix("a/b")


# -- registration and the watcher ------------------------------------------------------------------------
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_two_registered_nodes_are_seen(etcd, cluster, loop):
    async def body():
        watcher = await MembershipWatcher.start(etcd.url, cluster)
        assert watcher.nodes() == []
        p = await NodeRegistration.register(etcd.url, cluster, node("p0", "prefill"))
        d = await NodeRegistration.register(etcd.url, cluster, node("d0", "decode"))
        await watcher.wait_for(lambda: len(watcher.nodes()) == 2, WAIT)
        assert [n.node_id for n in watcher.nodes("prefill")] == ["p0"]
        assert watcher.nodes("decode") == [node("d0", "decode")]
        assert watcher.get("p0") == node("p0", "prefill") and watcher.get("nope") is None
        # A watcher started later gets the same picture from its initial read.
        late = await MembershipWatcher.start(etcd.url, cluster)
        assert late.nodes() == watcher.nodes() and late.revision >= watcher.revision
        for x in (p, d, watcher, late):
            await x.close()

    run(body(), loop=loop)


def test_update_load_is_seen(etcd, cluster):
    async def body():
        async with await MembershipWatcher.start(etcd.url, cluster) as watcher:
            async with await NodeRegistration.register(etcd.url, cluster, node("d1", "decode")) as reg:
                await watcher.wait_for(lambda: watcher.get("d1") is not None, WAIT)
                lease = reg.lease_id
                await reg.update_load(free_blocks=10, running=3, waiting=2)
                await watcher.wait_for(lambda: watcher.get("d1").free_blocks == 10, WAIT)
                seen = watcher.get("d1")
                assert (seen.running, seen.waiting, seen.capacity) == (3, 2, 64)
                assert reg.lease_id == lease  # same key, same lease
                with pytest.raises(ValueError, match="free_blocks"):
                    await reg.update_load(free_blocks=65)

    run(body())


def test_close_removes_the_node_at_once(etcd, cluster):
    async def body():
        async with await MembershipWatcher.start(etcd.url, cluster) as watcher:
            reg = await NodeRegistration.register(etcd.url, cluster, node("p9"), ttl=30)
            await watcher.wait_for(lambda: watcher.get("p9") is not None, WAIT)
            await reg.close()
            # A bound far below the 30 s TTL: the revoke removed it, not the lease running out.
            await watcher.wait_for(lambda: watcher.get("p9") is None, 10.0)
            await reg.close()  # twice is fine

    run(body())


def test_a_node_registered_anew_has_another_registration(etcd, cluster):
    """What the router compares to tell a node that left, or restarted, from the one it picked: the same for
    load updates, None once the node left, another once it registered again (seen through the watch and
    through a later watcher's first read alike)."""
    async def body():
        async with await MembershipWatcher.start(etcd.url, cluster) as watcher:
            first = await NodeRegistration.register(etcd.url, cluster, node("d7", "decode"))
            await watcher.wait_for(lambda: watcher.get("d7") is not None, WAIT)
            picked = watcher.get("d7")
            registration = watcher.registration(picked)
            assert registration is not None
            await first.update_load(free_blocks=3)
            await watcher.wait_for(lambda: watcher.get("d7").free_blocks == 3, WAIT)
            assert watcher.registration(picked) == registration
            await first.close()
            await watcher.wait_for(lambda: watcher.get("d7") is None, WAIT)
            assert watcher.registration(picked) is None
            async with await NodeRegistration.register(etcd.url, cluster, node("d7", "decode")):
                await watcher.wait_for(lambda: watcher.get("d7") is not None, WAIT)
                again = watcher.registration(picked)
                assert again is not None and again != registration
                async with await MembershipWatcher.start(etcd.url, cluster) as late:
                    assert late.registration(picked) == again

    run(body())


def test_lease_lost_during_a_pause_is_regranted(etcd, cluster):
    async def body():
        async with await MembershipWatcher.start(etcd.url, cluster) as watcher:
            async with await NodeRegistration.register(etcd.url, cluster, node("p5"), ttl=2) as reg:
                await watcher.wait_for(lambda: watcher.get("p5") is not None, WAIT)
                # What a pause longer than the TTL leaves behind: the lease is gone on the server.
                old = reg.lease_id
                async with aetcd.Client("127.0.0.1", etcd.client_port) as other:
                    await other.revoke_lease(old)
                await watcher.wait_for(lambda: watcher.get("p5") is None, WAIT)
                await watcher.wait_for(lambda: watcher.get("p5") is not None, reg.ttl)  # within one refresh
                assert reg.lease_id not in (None, old)

    run(body())


_CHILD = """
import asyncio, sys
from baton.common.membership import NodeInfo, NodeRegistration

async def main():
    info = NodeInfo(node_id="victim", role="decode", model="m", address="127.0.0.1:1", capacity=8, free_blocks=8)
    await NodeRegistration.register(sys.argv[1], sys.argv[2], info, ttl=2)
    print("registered", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_killed_node_process_disappears_within_ttl(etcd, cluster):
    ttl = 2.0

    async def body():
        async with await MembershipWatcher.start(etcd.url, cluster) as watcher:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _CHILD, etcd.url, cluster,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), 20)
                assert line == b"registered\n", (await proc.stderr.read()).decode()
                await watcher.wait_for(lambda: watcher.get("victim") is not None, WAIT)
                t0 = time.monotonic()
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
                # etcd expires a lease at its TTL, checked every ~0.5 s; the margin is for a loaded machine.
                await watcher.wait_for(lambda: watcher.get("victim") is None, ttl + 3.0)
                elapsed = time.monotonic() - t0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            print(f"killed node gone after {elapsed:.2f} s (ttl {ttl:.0f} s)")

    run(body())


# -- recovery of the watcher ---------------------------------------------------------------------------
@pytest.fixture
def private_etcd():
    with EtcdServer() as server:  # restarted by the test: not the shared one
        yield server


def test_watcher_resumes_after_etcd_restart(private_etcd, cluster):
    etcd = private_etcd

    async def body():
        async with await MembershipWatcher.start(etcd.url, cluster) as watcher:
            async with await NodeRegistration.register(etcd.url, cluster, node("before"), ttl=3) as before:
                await watcher.wait_for(lambda: watcher.get("before") is not None and watcher.connected, WAIT)
                old_pid = etcd.pid
                await asyncio.to_thread(etcd.restart)  # same port, same data; the loop keeps running
                assert etcd.pid != old_pid
                after = await NodeRegistration.register(etcd.url, cluster, node("after", "decode"))
                await watcher.wait_for(lambda: watcher.get("after") is not None, WAIT)
                assert watcher.connected
                # The lease survives the restart and is still being refreshed.
                await before.update_load(running=1)
                await watcher.wait_for(lambda: watcher.get("before").running == 1, WAIT)
                await after.close()
                await watcher.wait_for(lambda: watcher.get("after") is None, WAIT)

    run(body())


_WRITER = """
import asyncio, sys
import aetcd

async def main(port, prefix, gone, new_value, compact):
    async with aetcd.Client("127.0.0.1", int(port)) as c:
        await c.delete(gone.encode())
        put = await c.put((prefix + "decode/late").encode(), new_value.encode())
        if compact == "1":
            await c.compact(put.header.revision, physical=True)

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.mark.parametrize("compact", [False, True], ids=["resume", "compacted"])
def test_watcher_catches_up_on_changes_made_while_it_was_away(private_etcd, cluster, compact):
    """The loop is held while etcd restarts and others change the nodes: the watch stream is broken, and
    the changes are in etcd's history (resume from revision + 1) or compacted away (re-read the prefix)."""
    etcd = private_etcd

    async def body():
        async with await MembershipWatcher.start(etcd.url, cluster) as watcher:
            async with await NodeRegistration.register(etcd.url, cluster, node("p1"), ttl=30) as stays:
                gone = await NodeRegistration.register(etcd.url, cluster, node("p2"), ttl=30)
                await watcher.wait_for(lambda: len(watcher.nodes()) == 2 and watcher.connected, WAIT)
                # Blocking calls on purpose: nothing on this loop runs until they are done.
                etcd.restart()
                subprocess.run(
                    [sys.executable, "-c", _WRITER, str(etcd.client_port), nodes_prefix(cluster),
                     node_key(cluster, "prefill", "p2"), node("late", "decode").to_json().decode(),
                     "1" if compact else "0"],
                    check=True, timeout=20)
                await watcher.wait_for(lambda: watcher.get("late") is not None and watcher.get("p2") is None,
                                       WAIT)
                assert [n.node_id for n in watcher.nodes()] == ["late", "p1"]
                await gone.close()
                assert stays.lease_id is not None

    run(body())


# -- the server itself ---------------------------------------------------------------------------------
def test_stop_leaves_no_etcd_process():
    server = EtcdServer().start()
    pid, root = server.pid, server.root
    assert server.running() and root.is_dir() and server.url.startswith("http://127.0.0.1:")
    assert server.log_path.stat().st_size > 0  # its output goes to the file, not the console
    server.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not root.exists()
    server.stop()  # twice is fine


def test_missing_etcd_binary_says_how_to_install(monkeypatch):
    monkeypatch.setattr(etcd_server.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="README"):
        EtcdServer().start()


def test_a_router_on_every_interface_publishes_the_address_it_is_told(etcd, cluster):
    """`baton router --host 0.0.0.0 --advertise-host H` (a pod's IP on Kubernetes): its etcd record names H,
    and its metrics answer there; 127.0.0.2 is a loopback address other than the one it would publish alone."""
    from cluster_harness import terminate

    from baton.cluster.etcd_server import free_port
    from baton.common.membership import published_address, read_routers

    assert published_address("0.0.0.0:1", "10.0.0.7") == "10.0.0.7:1" and published_address("[::]:2", "fe80::1") \
        == "[fe80::1]:2" and published_address("127.0.0.1:3") == "127.0.0.1:3"
    port, metrics = free_port(), free_port()
    router = subprocess.Popen([sys.executable, "-m", "baton.cluster.cli", "router", "--etcd", etcd.url, "--cluster",
                               cluster, "--host", "0.0.0.0", "--port", str(port), "--metrics-port", str(metrics),
                               "--advertise-host", "127.0.0.2", "--parent-pid", str(os.getpid())],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        async def record():
            client = aetcd.Client(host="127.0.0.1", port=int(etcd.url.rsplit(":", 1)[1]))
            try:
                deadline = time.monotonic() + 60
                while not (routers := await read_routers(client, cluster)):
                    assert router.poll() is None and time.monotonic() < deadline, "the router did not register"
                    await asyncio.sleep(0.1)
                return routers
            finally:
                await client.close()

        [info] = run(record(), limit=90)
        assert (info.router_id, info.address, info.metrics_address) == (
            f"router-127.0.0.2:{port}", f"127.0.0.2:{port}", f"127.0.0.2:{metrics}")
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://{info.metrics_address}/metrics", timeout=10) as reply:
            assert b"baton_router" in reply.read()
    finally:
        terminate(router)
