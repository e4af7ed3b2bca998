"""Runs `baton up` as a user would, and finds its processes and nodes, for the cluster tests."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

from baton.common.membership import MembershipWatcher, NodeInfo
from baton.v1 import node_pb2, node_pb2_grpc

BATON = str(Path(sys.executable).with_name("baton"))
READY = re.compile(r"router listening on (\S+) \(cluster (\S+), etcd (\S+), logs in (.+)\)")
HTTP_READY = re.compile(r"OpenAI-compatible HTTP on (\S+)")


def terminate(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM (what an operator sends), then SIGKILL if it is still there after `timeout`: its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def cluster_pids(cluster: str) -> list[int]:
    """Every live process with `cluster` in an argument of its command line: a cluster's name finds its nodes
    and router, an etcd's "127.0.0.1:PORT" finds the server and its supervisor."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if any(cluster.encode() in arg for arg in cmdline) and state != "Z" and int(entry.name) != os.getpid():
            pids.append(int(entry.name))
    return pids


class BatonUp:
    """`with BatonUp(tmp_path, "--prefill", "1", ...) as up:` — up.address, up.etcd, up.cluster."""

    def __init__(self, log_dir: Path, *args: str, timeout: float = 120.0, baton: str = BATON) -> None:
        # No HTTP front unless a test asks for one (--http-port PORT): clusters that overlap would share 8000.
        http = [] if "--http-port" in args else ["--http-port", "0"]
        # No drain time unless a test asks for one: the suite stops its clusters idle, and a drain waits 0.5 s
        # for stragglers even then, in every one of the suite's hundred-odd clusters.
        drain = [] if "--drain-timeout" in args else ["--drain-timeout", "0"]
        self.args = [baton, "up", "--log-dir", str(log_dir), *http, *drain, *args]
        self.log_dir = log_dir
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self.address = self.cluster = self.etcd = ""
        self.http = ""  # the OpenAI front's base URL (http://host:port/v1), when asked for
        self.hung = False  # `baton up` ignored SIGTERM for 30 s
        self.returncode: int | None = None  # 0: it stopped everything itself on SIGTERM
        self.leftovers: list[int] = []  # processes `baton up` left running

    def __enter__(self) -> BatonUp:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     stdin=subprocess.DEVNULL)
        lines: list[str] = []
        found = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                lines.append(line)
                if READY.search(line):
                    found.set()
            found.set()  # EOF: `baton up` ended

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(self.timeout) or not (m := READY.search("".join(lines))):
            self.__exit__()
            raise RuntimeError(f"baton up did not become ready:\n{''.join(lines)}\n{self.logs()}")
        self.address, self.cluster, self.etcd = m.group(1), m.group(2), m.group(3)
        if http := HTTP_READY.search("".join(lines)):
            self.http = http.group(1)
        return self

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in self.log_dir.glob("*.log"))

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.hung = True
            self.proc.kill()
            self.proc.wait()
        self.returncode = self.proc.returncode
        # Never leave a process behind, but remember it: the tests assert that `baton up` cleaned up alone.
        self.leftovers = cluster_pids(self.cluster) if self.cluster else []
        for pid in self.leftovers:
            os.kill(pid, signal.SIGKILL)

    # -- looking inside ------------------------------------------------------------------------------

    def nodes(self, role: str | None = None) -> list[NodeInfo]:
        async def read() -> list[NodeInfo]:
            watcher = await MembershipWatcher.start(self.etcd, self.cluster)
            try:
                return watcher.nodes(role)
            finally:
                await watcher.close()

        return asyncio.run(read())

    def stats(self, node: NodeInfo, metadata=None) -> node_pb2.NodeStats:
        """The node's stats (`metadata`: the member token, for a closed cluster's node)."""
        with grpc.insecure_channel(node.address) as channel:
            stub = (node_pb2_grpc.PrefillNodeStub if node.role == "prefill" else node_pb2_grpc.DecodeNodeStub)(channel)
            return stub.GetStats(node_pb2.GetStatsRequest(), timeout=10, metadata=metadata)

    def departure(self, action, gone, within: float, what: str) -> float:
        """Runs `action()` (in a thread) while one membership watcher, started before it, follows the cluster;
        returns the seconds from the action's start until `gone(watcher)` held, and fails, saying `what` did
        not leave, if it does not hold within `within` s of that start. The bound is on the departure itself,
        seen as etcd delivers it, not on polls that each open an etcd client of their own. The action's own
        failure, if any, is raised first."""
        async def run() -> float:
            # Its set-up is not what is timed: a generous bound on each etcd call (a loaded machine's etcd
            # may take seconds to answer a new connection).
            watcher = await MembershipWatcher.start(self.etcd, self.cluster, rpc_timeout=30.0)
            try:
                assert not gone(watcher), f"{what} had left before the action"
                loop = asyncio.get_running_loop()
                start = loop.time()
                acting = asyncio.ensure_future(asyncio.to_thread(action))
                try:
                    await watcher.wait_for(lambda: gone(watcher), timeout=within)
                    took = loop.time() - start
                except TimeoutError:
                    took = None
                await acting
                if took is None:
                    raise AssertionError(f"{what} still in the membership {within} s after the action: "
                                         f"{[n.node_id for n in watcher.nodes()]}")
                return took
            finally:
                await watcher.close()

        return asyncio.run(run())

    def wait_until(self, predicate, timeout: float, interval: float = 0.02) -> float:
        """Polls `predicate` until true; returns the seconds it took. Raises TimeoutError past `timeout`."""
        start = time.monotonic()
        while not predicate():
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"condition not met within {timeout} s")
            time.sleep(interval)
        return time.monotonic() - start

    def node_pid(self, node_id: str) -> int:
        for pid in cluster_pids(self.cluster):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if node_id.encode() in cmdline and b"node" in cmdline:
                return pid
        raise LookupError(node_id)
