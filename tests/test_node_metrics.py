"""Every node's Prometheus metrics, as a scraper sees them: the address each node publishes in etcd, scraped over
HTTP and parsed with prometheus_client's own parser, moved by exactly the requests and tokens sent through the
router; and `baton status`, the real command, reading the same membership and endpoints."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from baton.common.membership import NodeInfo, NodeRegistration
from baton.engine import ModelConfig
from baton.router.client import BatonClient, Delta

from cluster_harness import BatonUp, terminate

BATON = str(Path(sys.executable).with_name("baton"))
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
# (prompt, max_tokens): prompts of one, two and four KV blocks; ignore_eos, so each gives exactly max_tokens.
REQUESTS = [("Once upon a time", 6), ("Lily wanted to play with the big red ball, but her mom said no", 9),
            ("One day, Tom and his mom went to the store to buy some food. They saw a big cake and many toys, and "
             "Tom wanted all of them", 4)]


class Scrape:
    """One scrape of a node's metrics: `s.value(name, **labels)` sums the samples of that name whose labels
    include `labels` (0 when there are none)."""

    def __init__(self, address: str) -> None:
        with HTTP.open(f"http://{address}/metrics", timeout=10) as reply:
            self.content_type = reply.headers["Content-Type"]
            text = reply.read().decode()
        self.samples = [s for family in text_string_to_metric_families(text) for s in family.samples]

    def value(self, name: str, **labels: str) -> float:
        return sum(s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items())

    def labels(self, name: str) -> list[dict[str, str]]:
        return [s.labels for s in self.samples if s.name == name]


def kv_bytes(prompt_tokens: int, cfg: ModelConfig, block_size: int = 16) -> int:
    """A prompt's blocks: every layer's K and V of every block it fills (float32)."""
    return cfg.num_layers * -(-prompt_tokens // block_size) * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * 4


@pytest.fixture(scope="module")
def up(stories_path, tmp_path_factory):
    with BatonUp(tmp_path_factory.mktemp("metrics"), "--model", str(stories_path)) as up:
        yield up
    assert not up.hung and up.leftovers == [] and up.returncode == 0


@pytest.fixture(scope="module")
def nodes(up) -> dict[str, NodeInfo]:
    return {n.role: n for n in up.nodes()}


def idle(node: NodeInfo) -> bool:
    s = Scrape(node.metrics_address)
    return (s.value("baton_kv_blocks_free") == s.value("baton_kv_blocks_capacity") > 0
            and s.value("baton_sequences_running") == s.value("baton_sequences_waiting") == 0
            and s.value("baton_kv_blocks_used") == 0)


def test_every_node_publishes_a_metrics_endpoint_in_etcd(nodes):
    assert set(nodes) == {"prefill", "decode"}
    for role, node in nodes.items():
        assert node.metrics_address and node.metrics_address != node.address
        assert node.tensor_parallel_size == 1
        s = Scrape(node.metrics_address)
        assert s.content_type.startswith("text/plain")
        assert s.labels("baton_node_info") == [{"node": node.node_id, "role": role, "model": node.model,
                                                "tensor_parallel_size": "1"}]
        assert s.value("baton_kv_blocks_capacity") == node.capacity > 0
        assert s.value("baton_sequences_reserved") == 0  # only on decode nodes; 0 when absent
        for name in ("baton_requests_total", "baton_prompt_tokens_total", "baton_kv_blocks_free"):
            assert all(ls["node"] == node.node_id and ls["role"] == role for ls in s.labels(name))
        with pytest.raises(urllib.error.HTTPError) as e:
            HTTP.open(f"http://{node.metrics_address}/nothing", timeout=10)
        assert e.value.code == 404


def test_counters_and_histograms_move_by_exactly_what_was_sent(up, nodes, stories_path):
    cfg = ModelConfig.from_folder(stories_path)
    prefill, decode = nodes["prefill"], nodes["decode"]
    up.wait_until(lambda: idle(prefill) and idle(decode), 10)
    p0, d0 = Scrape(prefill.metrics_address), Scrape(decode.metrics_address)
    prompt_lens = []
    with BatonClient(up.address, timeout=60) as client:
        for prompt, max_tokens in REQUESTS:
            got = client.complete(prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True)
            assert len(got.token_ids) == got.finished.completion_tokens == max_tokens
            prompt_lens.append(got.finished.prompt_tokens)
    n, generated = len(REQUESTS), sum(m for _, m in REQUESTS)
    assert len({-(-p // 16) for p in prompt_lens}) == n  # each prompt fills another number of blocks

    def delta(before: Scrape, node: NodeInfo, name: str, **labels: str) -> float:
        return Scrape(node.metrics_address).value(name, **labels) - before.value(name, **labels)

    # The prefill node settles a request once the decode node confirmed its K/V, which the client need not
    # wait for: wait for that, then for the blocks to come back.
    up.wait_until(lambda: delta(p0, prefill, "baton_requests_total") == n, 10)
    up.wait_until(lambda: idle(prefill) and idle(decode), 10)
    p, d = (lambda name, **ls: delta(p0, prefill, name, **ls)), (lambda name, **ls: delta(d0, decode, name, **ls))
    for moved in (p, d):
        assert moved("baton_requests_total", status="ok") == moved("baton_requests_total") == n
    # The prefill node computes each prompt and samples its first token; the decode node samples the rest.
    assert p("baton_prompt_tokens_total") == sum(prompt_lens)
    assert p("baton_completion_tokens_total") == n
    assert d("baton_prompt_tokens_total") == 0
    assert d("baton_completion_tokens_total") == generated - n
    assert p("baton_time_to_first_token_seconds_count") == n
    assert p("baton_time_to_first_token_seconds_sum") > 0
    assert d("baton_time_to_first_token_seconds_count") == 0
    assert d("baton_time_per_output_token_seconds_count") == generated - n
    assert p("baton_time_per_output_token_seconds_count") == 0
    # Batches: every prompt token once on the prefill node, one token per sequence per decode step.
    assert p("baton_prefill_batch_tokens_sum") == sum(prompt_lens)
    assert 1 <= p("baton_prefill_batch_tokens_count") <= n
    assert p("baton_decode_batch_sequences_count") == 0
    assert d("baton_decode_batch_sequences_sum") == generated - n
    assert d("baton_prefill_batch_tokens_count") == 0
    # Every transfer completed once, with the bytes of its prompt's blocks.
    sent = sum(kv_bytes(t, cfg) for t in prompt_lens)
    assert p("baton_kv_transfer_bytes_total", direction="sent") == sent
    assert d("baton_kv_transfer_bytes_total", direction="received") == sent
    assert p("baton_kv_transfer_seconds_count", direction="sent") == n
    assert d("baton_kv_transfer_seconds_count", direction="received") == n
    assert p("baton_kv_transfer_seconds_sum") > 0 and d("baton_kv_transfer_seconds_sum") > 0


def test_a_stream_cancelled_by_its_client_counts_as_cancelled(up, nodes):
    prefill, decode = nodes["prefill"], nodes["decode"]
    p0, d0 = Scrape(prefill.metrics_address), Scrape(decode.metrics_address)
    with BatonClient(up.address, timeout=60) as client:
        stream = client.generate("The little dog", max_tokens=400, temperature=0, ignore_eos=True)
        deltas = 0
        for item in stream:
            deltas += isinstance(item, Delta)
            if deltas == 3:
                break
        stream.close()  # cancels the call: the router cancels the node's stream
    moved = lambda node, before, **ls: Scrape(node.metrics_address).value("baton_requests_total", **ls) - \
        before.value("baton_requests_total", **ls)
    up.wait_until(lambda: moved(decode, d0) == 1 and moved(prefill, p0) == 1, 10)
    assert moved(decode, d0, status="CANCELLED") == 1
    # The prefill node's part was over (ok) unless the cancel came before its transfer was confirmed.
    assert moved(prefill, p0, status="ok") + moved(prefill, p0, status="CANCELLED") == 1
    up.wait_until(lambda: idle(prefill) and idle(decode), 10)


def baton_status(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([BATON, "status", *args], capture_output=True, text=True, timeout=60)


def test_baton_status_prints_every_node_with_its_role_and_load(up, nodes):
    proc = baton_status("--etcd", up.etcd, "--cluster", up.cluster)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"cluster {up.cluster}: 2 nodes"
    assert lines[1].split() == ["NODE", "ROLE", "MODEL", "ADDRESS", "TP", "RUNNING", "WAITING", "KV", "BLOCKS",
                                "MEMORY"]
    end = lines.index("")
    rows = {line.split()[0]: line.split() for line in lines[2:end]}
    assert set(rows) == {n.node_id for n in nodes.values()}
    for node in nodes.values():
        row = rows[node.node_id]
        assert row[1:5] == [node.role, node.model, node.address, "1"]
        assert row[5:8] == ["0", "0", f"0/{node.capacity}"] and row[8] == "(0.0%)"
        assert row[10] == "MiB" and _near(int(row[9]) << 20, _rss(up.node_pid(node.node_id)))
    # Then the routers: this one has no HTTP front, and its metrics on a port of their own.
    assert lines[end + 1].split() == ["ROUTER", "ADDRESS", "HTTP", "METRICS", "MEMORY"]
    [(router_id, address, http, metrics, memory, unit)] = [tuple(line.split()) for line in lines[end + 2:]
                                                           if line.strip()]
    assert (router_id, address, http, unit) == (f"router-{up.address}", up.address, "-", "MiB")
    assert Scrape(metrics).value("baton_router_live_nodes", role="decode") == 1
    assert _near(int(memory) << 20, Scrape(metrics).value("process_resident_memory_bytes"))


def _rss(pid: int) -> int:
    """A process's resident memory, as /proc has it now."""
    [kib] = [line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
             if line.startswith("VmRSS:")]
    return int(kib) << 10


def _near(shown: int, now: int) -> bool:
    """A figure read a moment before another of the same memory (an idle process: within 10%)."""
    return abs(shown - now) <= now / 10


def test_baton_status_shows_a_dash_for_a_node_whose_metrics_cannot_be_read(up):
    ghost = NodeInfo(node_id="ghost-0", role="decode", model="m", address="127.0.0.1:9", capacity=8, free_blocks=8,
                     metrics_address="127.0.0.1:9")  # nothing listens on port 9 (discard)

    async def with_ghost() -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
        # In a cluster of its own, so the router never sees it.
        async with await NodeRegistration.register(up.etcd, "ghosts", ghost, ttl=30):
            one = await asyncio.to_thread(baton_status, "--etcd", up.etcd, "--cluster", "ghosts")
            every = await asyncio.to_thread(baton_status, "--etcd", up.etcd)
            return one, every

    one, every = asyncio.run(with_ghost())
    assert one.returncode == 0, one.stderr
    assert one.stdout.splitlines()[2].split() == ["ghost-0", "decode", "m", "127.0.0.1:9", "1", "-", "-", "-", "-"]
    assert every.returncode == 0, every.stderr
    assert "cluster ghosts: 1 node" in every.stdout and f"cluster {up.cluster}: 2 nodes" in every.stdout


def test_baton_status_watch_redraws_until_interrupted(up):
    proc = subprocess.Popen([BATON, "status", "--etcd", up.etcd, "--cluster", up.cluster, "--watch", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    header, frames = f"cluster {up.cluster}: 2 nodes", 0
    deadline = time.monotonic() + 60
    while frames < 2 and time.monotonic() < deadline:  # (a line comes at least every 0.2 s while it runs)
        line = proc.stdout.readline()
        if not line:
            break
        frames += line.strip() == header
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert frames == 2 and proc.returncode == 0, err


CACHED = re.compile(r"prompt (\d+) \((\d+) cached\)")


def test_without_a_placement_the_planner_advises_from_the_membership(up, tmp_path):
    """Nodes something else starts (`baton up` here, Kubernetes' Deployments there) and no placement: `baton
    planner` reads the split from the nodes registered, sizes it (a made-up profile: decode steps cost 200 ms a
    sequence, so answers need many decode nodes), and says so in its log and in baton_planner_nodes, which an
    autoscaler reads; it writes no placement. One prompt, over and over: the prefill node's cache holds most
    of it, and the planner's inputs say how much (read from the node's metrics)."""
    from test_simulator import profile as made_up

    from baton.cluster.etcd_server import free_port
    from baton.cluster.placement_store import read

    made_up(prefill_fit=(0.001, 0.0, 0.0), decode_fit=(0.005, 0.2, 0.0)).save(tmp_path / "profile.yaml")
    port, out = free_port(), tmp_path / "planner.out"
    with open(out, "w") as log:
        planner = subprocess.Popen([BATON, "planner", "--etcd", up.etcd, "--cluster", up.cluster, "--slo",
                                    "ttft=1000,tpot=100", "--profile", str(tmp_path / "profile.yaml"), "--interval",
                                    "1", "--confirm", "1", "--cooldown", "0", "--correction-weight", "0",
                                    "--max-nodes", "6", "--metrics-port", str(port)], stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        with BatonClient(up.address, timeout=60) as client:
            while "advice:" not in out.read_text() or not CACHED.search(out.read_text()):
                assert planner.poll() is None and time.monotonic() < deadline, out.read_text()
                client.complete(REQUESTS[2][0], max_tokens=24, temperature=0, ignore_eos=True)
        with HTTP.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    finally:
        terminate(planner)
    said = out.read_text()
    assert "1P1D -> 1P5D: more nodes for the predicted load" in said and "advice: 1P5D" in said, said
    prompt, cached = map(int, CACHED.search(said).groups())
    assert 0 < cached < prompt, said
    nodes = {s.labels["role"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
             if s.name == "baton_planner_nodes"}
    assert nodes == {"prefill": 1.0, "decode": 5.0}
    assert asyncio.run(read(up.etcd, up.cluster)) is None


def test_baton_status_without_etcd_fails_naming_it():
    proc = baton_status("--etcd", "http://127.0.0.1:9")
    assert proc.returncode == 1 and proc.stderr.startswith("baton: error: etcd http://127.0.0.1:9")
    assert "Traceback" not in proc.stderr


def test_records_and_options():
    # A record from before metrics addresses (an older node's) still reads: no endpoint, one rank.
    old = NodeInfo.from_json(b'{"node_id":"d","role":"decode","model":"m","address":"h:1","capacity":4}')
    assert old.metrics_address == "" and old.tensor_parallel_size == 1
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        NodeInfo("d", "decode", "m", "h:1", tensor_parallel_size=0)
    from baton.cluster.node import NodeConfig

    with pytest.raises(ValueError, match="metrics_port"):
        NodeConfig(role="decode", etcd="http://127.0.0.1:2379", metrics_port=70000)


def test_a_colocated_node_counts_the_whole_request(stories_path, tmp_path):
    requests = REQUESTS[:2]
    with BatonUp(tmp_path, "--model", str(stories_path), "--prefill", "0", "--decode", "0", "--colocated", "1") as up:
        (node,) = up.nodes()
        assert node.role == "colocated" and node.metrics_address
        up.wait_until(lambda: idle(node), 10)
        before = Scrape(node.metrics_address)
        with BatonClient(up.address, timeout=60) as client:
            prompt_lens = [client.complete(prompt, max_tokens=m, temperature=0, ignore_eos=True).finished.prompt_tokens
                           for prompt, m in requests]
        up.wait_until(lambda: idle(node), 10)
        after = Scrape(node.metrics_address)
        moved = lambda name, **ls: after.value(name, **ls) - before.value(name, **ls)
        n, generated = len(requests), sum(m for _, m in requests)
        assert moved("baton_requests_total", status="ok") == moved("baton_requests_total") == n
        assert moved("baton_prompt_tokens_total") == moved("baton_prefill_batch_tokens_sum") == sum(prompt_lens)
        assert moved("baton_completion_tokens_total") == generated
        assert moved("baton_time_to_first_token_seconds_count") == n
        assert moved("baton_time_per_output_token_seconds_count") == generated - n
        assert moved("baton_decode_batch_sequences_sum") == generated - n
        assert moved("baton_kv_transfer_seconds_count") == moved("baton_kv_transfer_bytes_total") == 0
        proc = baton_status("--etcd", up.etcd, "--cluster", up.cluster)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[2].split()[:2] == [node.node_id, "colocated"]
    assert not up.hung and up.leftovers == [] and up.returncode == 0
