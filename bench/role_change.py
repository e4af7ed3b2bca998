"""How long a node takes to serve in a new role: changed in place against drained and restarted, same run.

One `baton launch` on one real etcd runs a router and three nodes of the 51M Llama (p0, p1 prefill, d0
decode) from a placement. Each round, `baton place` moves p1 from prefill to decode, then back, and the bench
times each change from the moment the placement is written to the first request served by p1 in its new role
(a 1-token request whose Finish names p1 as its decode, or prefill, node; requests are sent one after another
until one does, through a router that routes round-robin). The two ways alternate round by round, each on a
launch of its own (placement option `role_change: in_place | restart`), so the machine's noise falls on both
alike; the cluster is idle but for the probes. It prints the medians per way and direction, and restart's
over in-place.

    python bench/role_change.py [--rounds 3] [--model DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from baton.bench.engine_throughput import machine, write_checkpoint
from baton.bench.runner import git_commit
from baton.cluster import placement_store
from baton.cluster.etcd_server import EtcdServer, free_port
from baton.cluster.placement import parse
from baton.common.membership import MembershipWatcher
from baton.router.client import AsyncBatonClient

WAYS = ("in_place", "restart")


class Cluster:
    """One launch of a three-node placement; `flip(role)` moves p1 and times it."""

    def __init__(self, etcd: str, model: Path, way: str, logs: Path) -> None:
        self.etcd, self.model, self.way = etcd, model, way
        self.name = f"roles-{way}-{uuid.uuid4().hex[:6]}"
        self.port = free_port()
        self.spec = {
            "cluster": self.name, "model": {"path": str(model)},
            "options": {"role_change": way, "num_kv_blocks": 256, "drain_timeout": 30},
            # Round-robin: a probe reaches p1 within two tries once it serves (kv routing would keep sending
            # the probes to whichever node cached them).
            "machines": [{"name": "m", "host": "127.0.0.1", "router": {"port": self.port, "routing": "round-robin"},
                          "nodes": [{"name": "p0", "role": "prefill", "threads": 1},
                                    {"name": "p1", "role": "prefill", "threads": 1},
                                    {"name": "d0", "role": "decode", "threads": 1}]}]}
        self.logs = logs / self.name
        self.launch: subprocess.Popen | None = None

    async def start(self) -> None:
        await self.place()
        self.launch = subprocess.Popen(
            [sys.executable, "-m", "baton.cluster.cli", "launch", "--machine", "m", "--etcd", self.etcd, "--cluster",
             self.name, "--log-dir", str(self.logs), "--parent-pid", str(os.getpid())],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    async def place(self) -> None:
        """What `baton place` does, in this process (its own start-up would count in every change)."""
        await placement_store.place(self.etcd, parse(self.spec))

    async def ready(self, watcher: MembershipWatcher, roles: dict[str, str]) -> None:
        await watcher.wait_for(lambda: {n.node_id: n.role for n in watcher.nodes()} == roles, 600)

    async def flip(self, role: str) -> float:
        """p1 to `role`: seconds from the placement write to the first request it served in that role."""
        self.spec["machines"][0]["nodes"][1]["role"] = role
        start = time.perf_counter()
        await self.place()
        address = f"127.0.0.1:{self.port}"
        async with AsyncBatonClient(address, timeout=30) as client:
            while True:
                try:
                    done = await client.complete([5, 6, 7, 8], max_tokens=1, temperature=0)
                except Exception:  # no node of a role for a moment: the router says so; ask again
                    await asyncio.sleep(0.02)
                    continue
                node = done.finished.decode_node if role == "decode" else done.finished.prefill_node
                if node == "p1":
                    return time.perf_counter() - start

    def close(self) -> None:
        if self.launch is None:
            return
        self.launch.send_signal(signal.SIGTERM)
        try:
            self.launch.wait(90)
        except subprocess.TimeoutExpired:
            self.launch.kill()
            self.launch.wait()


async def run(etcd: str, model: Path, rounds: int, logs: Path) -> dict[str, dict[str, list[float]]]:
    times: dict[str, dict[str, list[float]]] = {w: {"prefill->decode": [], "decode->prefill": []} for w in WAYS}
    for r in range(rounds):
        for way in (WAYS if r % 2 == 0 else WAYS[::-1]):
            cluster = Cluster(etcd, model, way, logs)
            watcher = await MembershipWatcher.start(etcd, cluster.name)
            try:
                await cluster.start()
                await cluster.ready(watcher, {"p0": "prefill", "p1": "prefill", "d0": "decode"})
                times[way]["prefill->decode"].append(await cluster.flip("decode"))
                times[way]["decode->prefill"].append(await cluster.flip("prefill"))
                print(f"round {r + 1} {way}: " + ", ".join(f"{d} {v[-1]:.2f} s" for d, v in times[way].items()),
                      flush=True)
            finally:
                await watcher.close()
                await asyncio.to_thread(cluster.close)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", type=Path, default=None, help="a checkpoint folder (default: the 51M Llama)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, EtcdServer() as etcd:
        model = args.model
        if model is None:
            model = Path(tmp) / "llama-51m"
            write_checkpoint(model)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        times = asyncio.run(run(etcd.url, model, args.rounds, Path(tmp)))
    medians = {w: {d: statistics.median(v) for d, v in t.items()} for w, t in times.items()}
    print(f"machine: {machine('3 nodes, 1 torch thread each')}")
    print(f"model: {args.model or '51M Llama (random weights)'}; {args.rounds} rounds; seconds from the placement "
          "write to the first request served in the new role (median)")
    print(f"{'change':18} {'in place':>9} {'restart':>9} {'restart / in place':>19}")
    for d in medians["in_place"]:
        a, b = medians["in_place"][d], medians["restart"][d]
        print(f"{d:18} {a:9.2f} {b:9.2f} {b / a:19.2f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine("3 nodes, 1 torch thread each"), "commit": git_commit(),
                                         "rounds": args.rounds, "seconds": times, "median_s": medians}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
