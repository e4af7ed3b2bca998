"""`baton place` and `baton launch` as an operator runs them: one real etcd, two launch processes standing for
two machines (examples/localhost-cpu.yaml: m1 runs the router and two prefill nodes, m2 a decode node), and
placement changes while streams run: a prefill node becomes a decode node in place, the decode node is removed
and drains its streams, two nodes swap roles while one decodes every stream; removing the placement stops
everything."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from baton.cluster.cli import main
from baton.cluster.etcd_server import EtcdServer, free_port
from baton.common.membership import MembershipWatcher
from baton.engine import SamplingParams
from baton.router.client import AsyncBatonClient, BatonClient, Finished
from baton.v1 import node_pb2, node_pb2_grpc

from cluster_harness import cluster_pids

BATON = str(Path(sys.executable).with_name("baton"))
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "localhost-cpu.yaml"
PROMPTS = ["Once upon a time", "The little dog", "Lily wanted to play with the big red ball, but", "One day, Tom"]
STREAMS, STREAM_TOKENS = 32, 400  # 32 streams at a time, for as long as a change takes (see `streams`)
# A prompt per worker rather than 4 shared ones: the router's prefix-aware choice then keeps the streams spread
# by load, instead of sending all to whichever node cached the 4 (say a prefill node that became a decode node).
STREAM_PROMPTS = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(STREAMS)]


class Launch:
    """`baton launch --machine NAME` as its own process; on exit, whatever is left of the cluster is killed
    (and remembered in `leftovers`, so the test can assert that launch cleaned up alone)."""

    def __init__(self, machine: str, etcd: str, cluster: str, tmp: Path, *flags: str) -> None:
        self.machine, self.cluster, self.out = machine, cluster, tmp / f"launch-{machine}.out"
        with open(self.out, "w") as out:
            self.proc = subprocess.Popen([BATON, "launch", "--machine", machine, "--etcd", etcd, "--cluster", cluster,
                                          "--log-dir", str(tmp / machine), "--parent-pid", str(os.getpid()), *flags],
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def output(self) -> str:
        logs = "".join(f"\n== {p}\n{p.read_text(errors='replace')[-3000:]}"
                       for p in sorted((self.out.parent / self.machine).glob("*.log")))
        return self.out.read_text(errors="replace") + logs

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"launch {self.machine} exited with {self.proc.returncode}:\n{self.output()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def cluster(tmp_path):
    """etcd, a fresh cluster name, and a list to put Launches in: everything goes at the end, even on failure."""
    launches: list[Launch] = []
    name = f"launch-{uuid.uuid4().hex[:8]}"
    with EtcdServer() as etcd:
        try:
            yield etcd, name, launches
        finally:
            for launch in launches:
                launch.kill()
            for pid in cluster_pids(name):
                os.kill(pid, signal.SIGKILL)


def write_spec(tmp_path: Path, spec: dict) -> str:
    path = tmp_path / f"spec-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def place(tmp_path: Path, etcd: str, spec: dict) -> None:
    assert main(["place", write_spec(tmp_path, spec), "--etcd", etcd]) == 0


async def wait_until(watcher: MembershipWatcher, predicate, launches: list[Launch], timeout: float) -> None:
    """Waits on membership changes for `predicate`, failing at once if a launch process died."""
    deadline = time.monotonic() + timeout
    while True:
        for launch in launches:
            launch.check_alive()
        try:
            await watcher.wait_for(predicate, 1.0)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"membership {[(n.node_id, n.role) for n in watcher.nodes()]} after {timeout} s:\n"
                                   + "\n".join(launch.output() for launch in launches)) from None


def wait_for_output(launch: Launch, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in launch.output():
        launch.check_alive()
        assert time.monotonic() < deadline, f"no {text!r} from launch {launch.machine}:\n{launch.output()}"
        time.sleep(0.05)  # polling its log: the process says nothing otherwise


def wait_serving(address: str, timeout: float, credentials: grpc.ChannelCredentials | None = None) -> None:
    deadline = time.monotonic() + timeout
    with grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0, wait_for_ready=True).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"router {address} not serving after {timeout} s")


async def streams(address: str, started: asyncio.Event, feeding: asyncio.Event
                  ) -> list[tuple[str, list[int], Finished, float]]:
    """STREAMS workers, each running greedy streams of STREAM_TOKENS tokens one after another while `feeding`
    is set: (prompt, tokens, finish, end time) of every stream. `started` is set once the first STREAMS streams
    have their first token (their prefills are done: they are decoding). The load is kept up until the test
    has seen the change it makes, so streams are running on a node when it leaves, however fast they go."""
    first, done = 0, []

    async def worker(i: int, client: AsyncBatonClient) -> None:
        nonlocal first
        while True:
            prompt, tokens = STREAM_PROMPTS[i], []
            async for item in client.generate(prompt, max_tokens=STREAM_TOKENS, temperature=0, ignore_eos=True):
                if isinstance(item, Finished):
                    done.append((prompt, tokens, item, time.monotonic()))
                    break
                if not tokens and first < STREAMS:
                    first += 1
                    if first == STREAMS:
                        started.set()
                tokens += item.token_ids
            else:
                raise AssertionError("no Finish")
            if not feeding.is_set():
                return

    async with AsyncBatonClient(address, timeout=180) as client:
        await asyncio.gather(*(worker(i, client) for i in range(STREAMS)))
    return done


def test_place_launch_change_roles_drain_and_remove(cluster, tmp_path, stories_path, stories_llm, capsys):
    etcd, name, launches = cluster
    spec = yaml.safe_load(EXAMPLE.read_text())
    port = free_port()
    spec.update(cluster=name, etcd=[etcd.url], model={"path": str(stories_path), "device": "cpu"},
                options={"num_kv_blocks": 900})  # one decode node holds every stream's blocks (32 x 26)
    spec["machines"][0]["router"]["port"] = port
    address = f"127.0.0.1:{port}"

    place(tmp_path, etcd.url, spec)
    launches += [Launch("m1", etcd.url, name, tmp_path), Launch("m2", etcd.url, name, tmp_path)]
    # While the nodes start: the offline engine's tokens (greedy, one batch).
    every_prompt = PROMPTS + STREAM_PROMPTS
    outs = stories_llm.generate(every_prompt, SamplingParams(max_tokens=STREAM_TOKENS, temperature=0,
                                                             ignore_eos=True))
    want = {prompt: out.token_ids for prompt, out in zip(every_prompt, outs)}

    async def run() -> None:
        watcher = await MembershipWatcher.start(etcd.url, name)
        roles = lambda: {n.node_id: n.role for n in watcher.nodes()}  # noqa: E731
        try:
            await wait_until(watcher, lambda: roles() == {"n1": "prefill", "n2": "prefill", "n3": "decode"},
                             launches, 180)
            await asyncio.to_thread(wait_serving, address, 60)
            with BatonClient(address, timeout=60) as client:
                got = await asyncio.to_thread(client.complete, PROMPTS[2], max_tokens=64, temperature=0,
                                              ignore_eos=True)
            assert got.token_ids == want[PROMPTS[2]][:64]

            # 1. n2 becomes a decode node while 32 streams decode: it drains, leaves, comes back as a decode node.
            async def under_load(new_spec: dict, leaving: str, busy: str):
                """Places `new_spec` while 32 streams at a time run, once node `busy` reports streams running,
                until `leaving` left the membership: every stream's result, and when it left."""
                started, feeding = asyncio.Event(), asyncio.Event()
                feeding.set()
                running = asyncio.create_task(streams(address, started, feeding))
                try:
                    await asyncio.wait_for(started.wait(), 120)
                    # The router spreads streams by the load nodes report: one just freed of a previous step's
                    # streams may get none of the first ones, until its report says so.
                    await wait_until(watcher, lambda: any(n.node_id == busy and n.running for n in watcher.nodes()),
                                     launches, 60)
                    await asyncio.to_thread(place, tmp_path, etcd.url, new_spec)
                    await wait_until(watcher, lambda: leaving not in roles(), launches, 60)
                    left = time.monotonic()
                finally:
                    feeding.clear()
                return await running, left

            changed = yaml.safe_load(yaml.safe_dump(spec))
            changed["machines"][0]["nodes"][1]["role"] = "decode"
            results, left = await under_load(changed, "n2", busy="n3")
            assert max(end for *_, end in results) > left, "the streams ended before the change began"
            for prompt, tokens, finish, _ in results:
                assert tokens == want[prompt] and finish.finish_reason == "length"
            await wait_until(watcher, lambda: roles() == {"n1": "prefill", "n2": "decode", "n3": "decode"},
                             launches, 120)

            # 2. n3 (machine m2's only node) is removed while streams run on it: it finishes them, then exits.
            removed = yaml.safe_load(yaml.safe_dump(changed))
            removed["machines"][1]["nodes"] = []
            results, left = await under_load(removed, "n3", busy="n3")
            on_n3 = [end for _, _, finish, end in results if finish.decode_node == "n3"]
            assert on_n3 and max(on_n3) > left, "no stream was running on n3 while it drained"
            for prompt, tokens, finish, _ in results:
                assert tokens == want[prompt] and finish.finish_reason == "length"

            # 3. n1 and n2 swap roles while streams decode on n2 (the only decode node): n2 finishes them, then
            # serves prefill; the requests sent meanwhile wait for the swap to end.
            await wait_until(watcher, lambda: "n3" not in roles(), launches, 60)
            swapped = yaml.safe_load(yaml.safe_dump(removed))
            swapped["machines"][0]["nodes"][0]["role"] = "decode"
            swapped["machines"][0]["nodes"][1]["role"] = "prefill"
            results, left = await under_load(swapped, "n2", busy="n2")
            on_n2 = [end for _, _, finish, end in results if finish.decode_node == "n2"]
            assert on_n2 and max(on_n2) > left, "no stream was running on n2 as it changed role"
            for prompt, tokens, finish, _ in results:  # those sent during the swap waited for its end: on n1
                assert tokens == want[prompt] and finish.finish_reason == "length"
            await wait_until(watcher, lambda: roles() == {"n1": "decode", "n2": "prefill"}, launches, 120)
            with BatonClient(address, timeout=60) as client:
                got = await asyncio.to_thread(client.complete, PROMPTS[0], max_tokens=64, temperature=0,
                                              ignore_eos=True)
            assert got.token_ids == want[PROMPTS[0]][:64]
            assert (got.finished.prefill_node, got.finished.decode_node) == ("n2", "n1")
            # n2's server serves both internal services; only its role's answers now (health says which).
            n2 = next(n for n in watcher.nodes() if n.node_id == "n2")
            async with grpc.aio.insecure_channel(n2.address) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await node_pb2_grpc.DecodeNodeStub(channel).GetStats(node_pb2.GetStatsRequest(), timeout=10)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "changed role" in e.value.details()
                stats = await node_pb2_grpc.PrefillNodeStub(channel).GetStats(node_pb2.GetStatsRequest(), timeout=10)
                assert stats.role == "prefill"
                health = health_pb2_grpc.HealthStub(channel)
                for service, status in (("baton.v1.DecodeNode", "NOT_SERVING"), ("baton.v1.PrefillNode", "SERVING")):
                    answer = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                    assert answer.status == health_pb2.HealthCheckResponse.ServingStatus.Value(status), service
        finally:
            await watcher.close()

    asyncio.run(run())
    capsys.readouterr()
    assert main(["place", "--history", "--cluster", name, "--etcd", etcd.url]) == 0
    history = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert "n2: prefill -> decode" in history and "removed n3 (decode on m2)" in history, history
    assert "n2: decode -> prefill" in history and "n1: prefill -> decode" in history, history
    assert [line.split()[2] for line in history if line[:1].isdigit()] == ["place"] * 4

    # 3. Removing the placement: both launches stop what they started and exit 0, leaving no process behind.
    assert main(["place", "--remove", "--cluster", name, "--etcd", etcd.url]) == 0
    for launch in launches:
        try:
            assert launch.proc.wait(60) == 0, launch.output()
        except subprocess.TimeoutExpired:
            raise AssertionError(f"launch {launch.machine} still running:\n{launch.output()}") from None
    assert cluster_pids(name) == []
    # Roles changed in place: n1 and n2 ran in one process each from start to end, their weights loaded once.
    m1 = launches[0].output()
    assert m1.count("started n2 (pid") == 1 and m1.count("started n1 (pid") == 1, m1
    for node, changes in (("n1", ["prefill -> decode"]), ("n2", ["prefill -> decode", "decode -> prefill"])):
        log = (tmp_path / "m1" / f"{node}.log").read_text()
        assert re.findall(rf"{node}: changed role (\w+ -> \w+) in", log) == changes, log[-3000:]
    # n3 left the membership with the streams still on it, and served them to the end before it stopped.
    n3_log = (tmp_path / "m2" / "n3.log").read_text()
    draining = re.search(r"n3: left the membership; draining (\d+) running", n3_log)
    assert draining and int(draining.group(1)) > 0 and "n3: drained in" in n3_log, n3_log[-3000:]


def test_launch_waits_for_its_placement_and_stops_on_sigterm(cluster, tmp_path):
    """A launch started before `baton place` waits for it; SIGTERM stops what it started (here the router of
    a machine that has no node) and it exits 0, leaving nothing behind."""
    etcd, name, launches = cluster
    spec = yaml.safe_load(EXAMPLE.read_text())
    port = free_port()
    spec["cluster"] = name
    spec["machines"][0]["router"]["port"] = port
    spec["machines"].append({"name": "r", "host": "127.0.0.1", "router": {"port": free_port()}})
    launch = Launch("r", etcd.url, name, tmp_path)
    launches.append(launch)
    router = f"127.0.0.1:{spec['machines'][2]['router']['port']}"
    wait_for_output(launch, "waiting for a placement of cluster", 60)
    place(tmp_path, etcd.url, spec)
    deadline = time.monotonic() + 60
    with grpc.insecure_channel(router) as channel:
        while True:  # up: answering health checks (NOT_SERVING: no node is running)
            launch.check_alive()
            try:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0,
                                                          wait_for_ready=True)
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, launch.output()
    [router_pid] = [p for p in cluster_pids(name) if p != launch.proc.pid]
    launch.proc.send_signal(signal.SIGTERM)
    assert launch.proc.wait(30) == 0, launch.output()
    assert cluster_pids(name) == [] and not Path(f"/proc/{router_pid}").exists()



def test_launch_stops_when_the_process_that_started_it_ends(cluster, tmp_path):
    """`--parent-pid`: a bench or script killed while its launch runs leaves nothing behind."""
    etcd, name, _ = cluster
    out = tmp_path / "orphan.out"
    parent = ("import os, subprocess, sys, time\n"
              "p = subprocess.Popen(sys.argv[1:] + ['--parent-pid', str(os.getpid())], stdout=open(sys.argv[-1] + "
              "'.out', 'w'), stderr=subprocess.STDOUT)\n"
              "while b'waiting for a placement' not in open(sys.argv[-1] + '.out', 'rb').read():\n"
              "    assert p.poll() is None and time.sleep(0.05) is None\n"
              "print(p.pid)\n")
    done = subprocess.run([sys.executable, "-c", parent, BATON, "launch", "--machine", "m", "--etcd", etcd.url,
                           "--cluster", name, "--log-dir", str(out)], capture_output=True, text=True, timeout=120)
    pid = int(done.stdout)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and "State:\tZ" not in Path(f"/proc/{pid}/status").read_text(errors="ignore"):
        assert time.monotonic() < deadline, f"launch {pid} outlived its parent:\n{Path(str(out) + '.out').read_text()}"
        time.sleep(0.1)
