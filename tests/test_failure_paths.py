"""The hardening issue's failure paths, each made to happen for real on running clusters (`baton up`, real
node processes, real cancellations, real dead peers), each asserting what must hold afterwards: every node's
blocks back to their baseline, only the affected requests failed, nothing hangs, nothing is left behind."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from cluster_harness import BatonUp, cluster_pids

from baton.cluster.etcd_server import EtcdServer
from baton.common.membership import MembershipWatcher
from baton.engine import SamplingParams
from baton.router.client import AsyncBatonClient, BatonClient, BatonError, Unavailable
from baton.router.picker import Picker
from baton.router.node_stubs import NodeStubs
from baton.v1 import baton_pb2 as pb
from baton.v1 import node_pb2, node_pb2_grpc

BATON = str(Path(sys.executable).with_name("baton"))
SETTLE = 5.0  # seconds for every node to be back at its baseline after the last request ended


def all_idle(up: BatonUp) -> bool:
    for node in up.nodes():
        s = up.stats(node)
        if s.free_blocks != s.total_blocks or s.running or s.waiting or s.reserved:
            return False
    return True


def node_process(tmp_path: Path, up: BatonUp, role: str, node_id: str, *extra: str) -> subprocess.Popen:
    log = open(tmp_path / f"{node_id}-again.log", "wb")
    with log:
        return subprocess.Popen([BATON, "node", "--role", role, "--node-id", node_id, "--etcd", up.etcd,
                                 "--cluster", up.cluster, *extra], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("migrations", [0, 3], ids=["no-migration", "migration"])
def test_a_killed_decode_node_costs_only_its_own_requests(stories_path, tmp_path, migrations):
    """Prefills bound for two decode nodes run in the same batches; one decode node is SIGKILLed. Without
    migration, the requests it held or was about to receive fail (naming it); with it (the default) they resume
    on the other node and all complete. Either way the other node's requests all finish, and the prefill node
    is left holding nothing and keeps serving (one failed send used to fail the whole batch)."""
    long_prompt = "Once upon a time, there was a little girl named Lily. " * 6
    with BatonUp(tmp_path, "--model", str(stories_path), "--prefill", "1", "--decode", "2",
                 "--max-migrations", str(migrations)) as up:
        victim = up.node_pid("decode-0")

        async def one(client, i):
            try:
                n = 0
                async for item in client.generate(long_prompt, max_tokens=200, temperature=0, ignore_eos=True,
                                                  request_id=f"r{i}"):
                    n += len(getattr(item, "token_ids", ()))
                    if i == 0 and n >= 2:
                        os.kill(victim, signal.SIGKILL)  # while the others are prefilling or decoding
                return item.decode_node, None
            except BatonError as e:
                return None, e

        async def storm():
            async with AsyncBatonClient(up.address, timeout=60) as client:
                return await asyncio.gather(*(one(client, i) for i in range(24)))

        results = asyncio.run(storm())
        failures = [e for node, e in results if e is not None]
        moved = (up.log_dir / "router.log").read_text().count("decode-0 failed")
        assert failures or moved, "the kill came too late to touch anything: the test proves nothing"
        if migrations:
            assert not failures
            # What moved ended on the live node (on a loaded machine, some streams may have ended on decode-0
            # before the kill: they go at uneven paces).
            moved_ids = re.findall(r"request r(\d+): decode-0 failed", (up.log_dir / "router.log").read_text())
            assert moved_ids and all(results[int(i)][0] == "decode-1" for i in moved_ids)
        for e in failures:
            assert isinstance(e, Unavailable) and "decode-0" in e.details, e
        served_by = {node for node, e in results if e is None}
        assert "decode-1" in served_by
        up.wait_until(lambda: not any(n.node_id == "decode-0" for n in up.nodes("decode")), timeout=15)
        with BatonClient(up.address, timeout=60) as client:
            for _ in range(4):
                assert client.complete(long_prompt, max_tokens=8, temperature=0).finished.decode_node == "decode-1"
        up.wait_until(lambda: all_idle(up), timeout=SETTLE)
        prefill = up.stats(up.nodes("prefill")[0])
        assert prefill.free_blocks == prefill.total_blocks


def test_a_decode_node_restarted_under_its_id_serves_at_once(stories_path, stories_llm, tmp_path):
    """Its new rendezvous store counts generations on from above the old one's, and the prefill node lets go
    of the dead node's entry: the first request after the restart is served (requests used to fail until the
    generation counts met)."""
    with BatonUp(tmp_path, "--model", str(stories_path), "--prefill", "1", "--decode", "1") as up:
        with BatonClient(up.address, timeout=60) as client:
            for _ in range(3):
                client.complete("Once upon a time", max_tokens=4, temperature=0)
            old = up.nodes("decode")[0]
            os.kill(up.node_pid("decode-0"), signal.SIGKILL)
            up.wait_until(lambda: not up.nodes("decode"), timeout=15)
            again = node_process(tmp_path, up, "decode", "decode-0", "--model", str(stories_path))
            try:
                up.wait_until(lambda: bool(up.nodes("decode")), timeout=60, interval=0.1)
                assert up.nodes("decode")[0].address != old.address
                want = stories_llm.generate(["The dog ran"], SamplingParams(max_tokens=12, temperature=0))[0]
                for _ in range(5):
                    got = client.complete("The dog ran", max_tokens=12, temperature=0)
                    assert got.token_ids == want.token_ids
                up.wait_until(lambda: all_idle(up), timeout=SETTLE)
            finally:
                stop(again)


def test_a_prefill_node_keeps_no_state_for_decode_nodes_that_failed(stories_path, tmp_path):
    """Decode nodes that come and go (here: 30 that never answer) leave no per-peer state on the prefill node."""
    with BatonUp(tmp_path, "--model", str(stories_path), "--transfer-timeout", "0.3") as up:
        prefill = up.nodes("prefill")[0]
        decode = up.nodes("decode")[0]
        layout = up.stats(decode)  # only for the node to be warm
        with grpc.insecure_channel(prefill.address) as channel:
            stub = node_pb2_grpc.PrefillNodeStub(channel)
            real_layout = _layout(up, decode)

            def prefill_for(i: int) -> grpc.StatusCode:
                target = node_pb2.KVTarget(decode_node_id=f"ghost-{i}", decode_address="127.0.0.1:9",
                                           kv_store_address="127.0.0.1:9", block_ids=[0], transfer_tag=1,
                                           layout=real_layout)
                req = node_pb2.PrefillRequest(request_id=f"g{i}", prompt_token_ids=[1, 2, 3],
                                              sampling=pb.SamplingParams(max_tokens=1), target=target)
                try:
                    list(stub.Prefill(req, timeout=30))
                except grpc.RpcError as e:
                    return e.code()
                return grpc.StatusCode.OK

            with ThreadPoolExecutor(6) as pool:
                codes = list(pool.map(prefill_for, range(30)))
            assert set(codes) == {grpc.StatusCode.UNAVAILABLE}
            stats = stub.GetStats(node_pb2.GetStatsRequest(), timeout=10)
            assert stats.peers == 0 and stats.free_blocks == stats.total_blocks
        del layout
        with BatonClient(up.address, timeout=60) as client:  # the real pair still works
            assert client.complete("Once upon a time", max_tokens=4, temperature=0).finished.completion_tokens == 4


def _layout(up: BatonUp, decode) -> node_pb2.KVLayout:
    with grpc.insecure_channel(decode.address) as channel:
        stub = node_pb2_grpc.DecodeNodeStub(channel)
        r = stub.Reserve(node_pb2.ReserveRequest(request_id="probe", prompt_tokens=3, max_tokens=1), timeout=10)
        stub.Release(node_pb2.ReleaseRequest(request_id="probe"), timeout=10)
        return r.target.layout


def test_the_routers_maps_stay_bounded_as_nodes_come_and_go():
    """200 decode/prefill pairs register, serve a request each (as the router counts it) and leave: the
    router's channels and in-flight counts do not grow with them."""

    async def main(etcd_url: str) -> None:
        from baton.common.membership import NodeInfo, NodeRegistration

        watcher = await MembershipWatcher.start(etcd_url, "churn")
        picker = Picker(watcher)
        stubs = NodeStubs(lambda: {n.address for n in watcher.nodes()})
        try:
            for i in range(200):
                regs = []
                for role in ("prefill", "decode"):
                    info = NodeInfo(node_id=f"{role}-{i}", role=role, model="m", address=f"127.0.0.1:{20000 + 2 * i + (role == 'decode')}",
                                    capacity=4, free_blocks=4)
                    regs.append(await NodeRegistration.register(etcd_url, "churn", info, ttl=3))
                await watcher.wait_for(lambda: len(watcher.nodes()) == 2, 10)
                nodes = [picker.pick("prefill"), picker.pick("decode")]
                for n in nodes:
                    picker.acquire(n.node_id)
                    with stubs.use(n.address):
                        pass
                for n in nodes:
                    picker.release(n.node_id)
                for r in regs:
                    await r.close()
                await watcher.wait_for(lambda: not watcher.nodes(), 10)
            assert len(picker.in_flight) == 0
            with stubs.use("127.0.0.1:1"):  # a new address prunes the channels of every node that left
                pass
            assert len(stubs._nodes) == 1 and len(stubs._closing) <= 400
            await asyncio.gather(*list(stubs._closing))  # no call open on them: they close at once
            assert not stubs._closing
        finally:
            await stubs.close()
            await watcher.close()

    with EtcdServer() as etcd:
        asyncio.run(main(etcd.url))


def test_nothing_outlives_a_sigkilled_baton_up(stories_path, tmp_path):
    up = BatonUp(tmp_path, "--model", str(stories_path), "--prefill", "1", "--decode", "1")
    with up:
        etcd_port = up.etcd.rsplit(":", 1)[1]
        etcd_procs = cluster_pids(f"127.0.0.1:{etcd_port}")  # the etcd server and its supervisor
        data_dirs = [_arg_after(pid, "--data-dir") for pid in etcd_procs]
        data_dirs = [Path(d).parent for d in data_dirs if d]
        assert etcd_procs and data_dirs and all(d.is_dir() for d in data_dirs)
        up.proc.kill()
        up.proc.wait(10)
        up.wait_until(lambda: not cluster_pids(up.cluster) and not cluster_pids(f"127.0.0.1:{etcd_port}")
                      and not any(d.exists() for d in data_dirs), timeout=30, interval=0.1)
    assert up.leftovers == []


def _arg_after(pid: int, flag: str) -> str:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return ""
    return args[args.index(flag) + 1] if flag in args else ""


def test_sigterm_ends_every_process_within_its_grace_even_with_etcd_down(stories_path, tmp_path):
    """etcd goes first (killed), then each process gets one SIGTERM: each must end within its grace period
    (a router once stopped listening but ignored SIGTERM for minutes)."""
    with BatonUp(tmp_path, "--model", str(stories_path), "--prefill", "1", "--decode", "1",
                 "--colocated", "1") as up:
        pids = {name: up.node_pid(name) for name in ("prefill-0", "decode-0", "colocated-0")}
        pids["router"] = next(p for p in cluster_pids(up.cluster)
                              if b"router" in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0"))
        # A router never loads torch (it would cost it ~0.3 GB and seconds of start-up); the nodes do.
        assert "libtorch" not in Path(f"/proc/{pids['router']}/maps").read_text()
        assert "libtorch" in Path(f"/proc/{pids['prefill-0']}/maps").read_text()
        etcd_port = up.etcd.rsplit(":", 1)[1]
        for pid in cluster_pids(f"127.0.0.1:{etcd_port}"):
            os.kill(pid, signal.SIGKILL)
        for name, pid in pids.items():
            os.kill(pid, signal.SIGTERM)
        # The grace is 10 s (SHUTDOWN_GRACE_S); the bound leaves room for a loaded machine.
        up.wait_until(lambda: not any(_alive(p) for p in pids.values()), timeout=20, interval=0.1)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"
