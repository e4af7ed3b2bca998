"""`baton status`: the nodes etcd lists, with the load each one's metrics endpoint reports, and the routers.

One range read of the cluster's records (`/baton/<cluster>/`, or every cluster's), then a scrape of each node's
`metrics_address`, all at once. A node whose metrics cannot be read (no address, not answering within
SCRAPE_TIMEOUT_S, a reply without the figures) shows "-" in the columns that come from them.
"""

from __future__ import annotations

import asyncio
import sys
import time
import urllib.request
from dataclasses import dataclass

import aetcd
from prometheus_client.parser import text_string_to_metric_families

from baton.common.membership import ROLES, NodeInfo, RouterInfo, close_quietly, etcd_client, nodes_prefix

SCRAPE_TIMEOUT_S = 2.0
ETCD_TIMEOUT_S = 5.0
COLUMNS = ("NODE", "ROLE", "MODEL", "ADDRESS", "TP", "RUNNING", "WAITING", "KV BLOCKS", "MEMORY")
ROUTER_COLUMNS = ("ROUTER", "ADDRESS", "HTTP", "METRICS", "MEMORY")
_FIGURES = ("baton_sequences_running", "baton_sequences_waiting", "baton_kv_blocks_used", "baton_kv_blocks_capacity")
_MEMORY = "process_resident_memory_bytes"  # the serving process's
_RANKS_MEMORY = "baton_rank_resident_memory_bytes"  # a tensor-parallel node's other ranks', one sample each
# No proxy: metrics addresses are the cluster's own (a proxy from the environment would not reach them).
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True, slots=True)
class Load:
    running: int
    waiting: int
    blocks_used: int
    blocks_capacity: int
    resident_bytes: int | None = None  # None: not reported (an older node)


async def read_nodes(client: aetcd.Client, cluster: str
                     ) -> tuple[list[tuple[str, NodeInfo]], list[tuple[str, RouterInfo]]]:
    """(cluster, node) of every node registered in `cluster` ("": in every cluster), by cluster, role, id;
    and (cluster, router) of every router, by cluster and id."""
    result = await client.get_prefix((f"/baton/{cluster}/" if cluster else "/baton/").encode())
    nodes, routers = [], []
    for kv in result:
        # "", "baton", cluster, "nodes", role, node id  |  "", "baton", cluster, "routers", router id
        parts = kv.key.decode(errors="replace").split("/")
        try:
            if len(parts) == 6 and parts[3] == "nodes":
                nodes.append((parts[2], NodeInfo.from_json(kv.value)))
            elif len(parts) == 5 and parts[3] == "routers":
                routers.append((parts[2], RouterInfo.from_json(kv.value)))
        except ValueError:
            continue  # another version's record, a hand-made key: not ours to show
    return (sorted(nodes, key=lambda n: (n[0], ROLES.index(n[1].role), n[1].node_id)),
            sorted(routers, key=lambda r: (r[0], r[1].router_id)))


def scrape(address: str) -> Load | None:
    """The load a node's metrics report, or None if they cannot be read."""
    values = _read(address)
    try:
        memory = values.get(_MEMORY)
        if memory is not None:
            memory += values.get(_RANKS_MEMORY, 0)  # the node is all its ranks' processes
        return Load(*(int(values[name]) for name in _FIGURES), None if memory is None else int(memory))
    except KeyError:  # incomplete
        return None


def scrape_memory(address: str) -> int | None:
    """A router's resident memory, from its metrics (None if they cannot be read)."""
    memory = _read(address).get(_MEMORY)
    return None if memory is None else int(memory)


def _read(address: str) -> dict[str, float]:
    """Each figure at `address`/metrics, summed over its samples ({} if unread)."""
    if not address:
        return {}
    try:
        with _OPENER.open(f"http://{address}/metrics", timeout=SCRAPE_TIMEOUT_S) as reply:
            text = reply.read().decode()
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                values[s.name] = values.get(s.name, 0.0) + s.value
        return values
    except (OSError, ValueError):  # unreachable, refused, timed out, not Prometheus text
        return {}


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def render(nodes: list[tuple[str, NodeInfo]], loads: list[Load | None],
           routers: list[tuple[str, RouterInfo]] = (), router_memory: list[int | None] | None = None) -> str:
    """One table of nodes per cluster, then its routers."""
    out: list[str] = []
    for cluster in dict.fromkeys(c for c, _ in [*nodes, *routers]):
        rows = [_row(info, load) for (c, info), load in zip(nodes, loads) if c == cluster]
        out.append(f"cluster {cluster}: {len(rows)} node{'s' * (len(rows) != 1)}")
        out += table(COLUMNS, rows, left=4)  # names left-aligned, figures right-aligned
        memory = router_memory if router_memory is not None else [None] * len(routers)
        mine = [(r.router_id, r.address, r.http_address or "-", r.metrics_address or "-", mib(m))
                for (c, r), m in zip(routers, memory) if c == cluster]
        if mine:
            out += ["", *table(ROUTER_COLUMNS, mine, left=4)]
        out.append("")
    return "\n".join(out)


def table(columns: tuple[str, ...], rows: list[tuple[str, ...]], left: int) -> list[str]:
    """Lines of a text table: the first `left` columns left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [columns, *rows]) for i in range(len(columns))]
    return ["  ".join(v.ljust(w) if i < left else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))).rstrip()
            for r in [columns, *rows]]


def _row(info: NodeInfo, load: Load | None) -> tuple[str, ...]:
    names = (info.node_id, info.role, info.model, info.address, str(info.tensor_parallel_size))
    if load is None:
        return (*names, "-", "-", "-", "-")
    used, total = load.blocks_used, load.blocks_capacity
    kv = f"{used}/{total} ({100 * used / total:.1f}%)" if total else f"{used}/{total}"
    return (*names, str(load.running), str(load.waiting), kv, mib(load.resident_bytes))


async def snapshot(client: aetcd.Client, etcd: str, cluster: str) -> str:
    nodes, routers = await read_nodes(client, cluster)
    if not nodes and not routers:
        return f"no nodes registered in cluster {cluster} (etcd {etcd})\n" if cluster else \
            f"no nodes registered in etcd {etcd}\n"
    loads = await asyncio.gather(*(asyncio.to_thread(scrape, info.metrics_address) for _, info in nodes))
    memory = await asyncio.gather(*(asyncio.to_thread(scrape_memory, r.metrics_address) for _, r in routers))
    return render(nodes, list(loads), routers, list(memory))


async def _run(etcd: str, cluster: str, watch: float | None) -> int:
    client = etcd_client(etcd, ETCD_TIMEOUT_S)
    try:
        while True:
            try:
                text = await snapshot(client, etcd, cluster)
            except aetcd.ClientError as e:
                if watch is None:
                    print(f"baton: error: etcd {etcd}: {type(e).__name__}: {e}", file=sys.stderr)
                    return 1
                text = f"etcd {etcd} cannot be read: {type(e).__name__}: {e}\n"
            if watch is None:
                sys.stdout.write(text)
                return 0
            clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
            sys.stdout.write(f"{clear}{time.strftime('%H:%M:%S')}  every {watch:g} s, Ctrl-C stops\n\n{text}\n")
            sys.stdout.flush()
            await asyncio.sleep(watch)
    finally:
        await close_quietly(client)


def run_status(etcd: str, cluster: str = "", watch: float | None = None) -> int:
    """`baton status`: prints the table once, or every `watch` seconds until Ctrl-C. Exit status: 0, 1 if
    etcd cannot be read (once), 2 for a bad argument."""
    if watch is not None and not watch > 0:
        print(f"baton: error: watch: must be a number of seconds > 0, got {watch:g}", file=sys.stderr)
        return 2
    try:
        if cluster:
            nodes_prefix(cluster)  # refuses a name with a "/"
        return asyncio.run(_run(etcd, cluster, watch))
    except ValueError as e:  # a bad --etcd URL or --cluster name
        print(f"baton: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
