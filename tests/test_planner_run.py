"""`baton planner` on a live cluster: a real etcd, a `baton launch` of a router and three nodes (two prefill, one
decode) of the bundled model on a machine that may run four, and the planner process reading the router's
metrics. Its profile (made up: decode steps cost 200 ms per sequence, prompts nearly nothing) says a stream of
answers needs more decode nodes than there are: in a dry run, which only re-roles, it says 2P1D -> 1P2D and
changes nothing; for real, with `--max-nodes`, it moves a prefill node to decode and adds a decode node where
the machine has room (2P1D -> 1P3D), with its reason in the history: the node changes role in place, `baton
launch` starts the new one, and the requests go on, token-exact; its metrics serve what the Grafana
dashboard's planner panels query."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster_harness import BATON, terminate
from test_launch import Launch, cluster, place, wait_serving  # noqa: F401 (cluster: a fixture)
from test_simulator import profile as made_up

from baton.cluster.etcd_server import free_port
from baton.cluster.placement_store import history, read
from baton.cluster.planner_run import Scrape, median, parse, prefix_hits
from baton.common.membership import MembershipWatcher
from baton.engine import SamplingParams
from baton.router.client import AsyncBatonClient

PROMPT, TOKENS = "Once upon a time", 48


def planner(etcd: str, name: str, tmp_path, *flags: str) -> subprocess.Popen:
    out = open(tmp_path / f"planner{'-dry' if '--dry-run' in flags else ''}.out", "w")
    return subprocess.Popen([BATON, "planner", "--etcd", etcd, "--cluster", name, "--slo", "ttft=1000,tpot=100",
                             "--profile", str(tmp_path / "profile.yaml"), "--interval", "1", "--confirm", "1",
                             "--cooldown", "0", "--correction-weight", "0", *flags], stdout=out,
                            stderr=subprocess.STDOUT)


def planner_series(port: int) -> set[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples} | \
        {family.name for family in text_string_to_metric_families(text)}


def dashboard_planner_series() -> set[str]:
    """The planner's series the Grafana dashboard queries (examples/monitoring)."""
    dashboard = Path(__file__).parents[1] / "examples" / "monitoring" / "grafana-dashboard.json"
    queries = [t["expr"] for p in json.loads(dashboard.read_text())["panels"] for t in p["targets"]]
    return {m for q in queries for m in re.findall(r"\bbaton_planner_[a-z0-9_]+", q)}


def test_the_planner_moves_and_adds_decode_nodes_when_answers_need_them(cluster, stories_path,  # noqa: F811
                                                                        stories_llm, tmp_path):
    etcd, name, launches = cluster
    made_up(prefill_fit=(0.001, 0.0, 0.0), decode_fit=(0.005, 0.2, 0.0)).save(tmp_path / "profile.yaml")
    port = free_port()
    spec = {"cluster": name, "model": {"path": str(stories_path)}, "options": {"num_kv_blocks": 512},
            "machines": [{"name": "m", "host": "127.0.0.1", "router": {"port": port}, "max_nodes": 4,
                          "nodes": [{"name": "a", "role": "prefill"}, {"name": "b", "role": "prefill"},
                                    {"name": "c", "role": "decode"}]}]}
    place(tmp_path, etcd.url, spec)
    launches.append(Launch("m", etcd.url, name, tmp_path))
    want = stories_llm.generate([PROMPT], SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True))[0]
    address = f"127.0.0.1:{port}"
    wait_serving(address, 120)

    async def load(until) -> list:
        """Requests two at a time, until `until()`: every answer."""
        answers = []

        async def client_loop(client):
            while not until():
                answers.append(await client.complete(PROMPT, max_tokens=TOKENS, temperature=0, ignore_eos=True))

        async with AsyncBatonClient(address, timeout=60) as client:
            await asyncio.gather(client_loop(client), client_loop(client))
        return answers

    async def run() -> None:
        watcher = await MembershipWatcher.start(etcd.url, name)
        roles = lambda: {n.node_id: n.role for n in watcher.nodes()}  # noqa: E731
        try:
            await watcher.wait_for(lambda: roles() == {"a": "prefill", "b": "prefill", "c": "decode"}, 120)
            dry = planner(etcd.url, name, tmp_path, "--dry-run")
            out = tmp_path / "planner-dry.out"
            deadline = time.monotonic() + 60
            try:
                await load(lambda: "2P1D -> 1P2D" in out.read_text() or time.monotonic() > deadline)
            finally:
                assert terminate(dry) == 0
            said = out.read_text()
            assert "2P1D -> 1P2D: decode needs more nodes" in said, said
            assert [r.action for r in await history(etcd.url, name)] == ["place"]  # a dry run changes nothing

            metrics_port = free_port()
            real = planner(etcd.url, name, tmp_path, "--metrics-port", str(metrics_port), "--max-nodes", "8")
            deadline = time.monotonic() + 120  # a planner that never acts fails the asserts below, not hangs
            try:
                answers = await load(lambda: sorted(roles().values()) == ["decode", "decode", "decode", "prefill"]
                                     or real.poll() is not None or time.monotonic() > deadline)
                served = await asyncio.to_thread(planner_series, metrics_port)
            finally:
                code = terminate(real)
            assert dashboard_planner_series() <= served, sorted(dashboard_planner_series() - served)
            said = (tmp_path / "planner.out").read_text()
            assert code == 0 and re.search(r"2P1D -> 1P3D: decode needs more nodes", said), said
            assert re.search(r"placed \(history #2\): [ab]: prefill -> decode; added decode-0 \(decode on m, tp 1\)",
                             said), said
            assert answers and all(a.token_ids == want.token_ids for a in answers)
        finally:
            await watcher.close()

    asyncio.run(run())
    records = asyncio.run(history(etcd.url, name))
    assert [r.by for r in records] == [records[0].by, "planner"]
    assert "decode needs more nodes" in records[1].reason and "predicted" in records[1].reason
    placed = asyncio.run(read(etcd.url, name))
    assert sorted(n.role for _, n in placed.nodes().values()) == ["decode", "decode", "decode", "prefill"]
    moved = next(n.name for _, n in placed.nodes().values() if n.name in "ab" and n.role == "decode")
    log = (tmp_path / "m" / f"{moved}.log").read_text()
    assert f"{moved}: changed role prefill -> decode" in log, log[-2000:]


def test_scrapes_subtract_and_medians_interpolate():
    text = "\n".join([
        '# TYPE baton_router_requests counter',
        'baton_router_requests_total{model="m",front="grpc",outcome="ok"} 10',
        'baton_router_requests_total{model="other",front="grpc",outcome="ok"} 99',
        '# TYPE baton_router_prompt_tokens counter',
        'baton_router_prompt_tokens_total{model="m",front="grpc"} 1000',
        '# TYPE baton_router_time_to_first_token_seconds histogram',
        'baton_router_time_to_first_token_seconds_bucket{model="m",front="grpc",le="0.1"} 2',
        'baton_router_time_to_first_token_seconds_bucket{model="m",front="grpc",le="0.5"} 8',
        'baton_router_time_to_first_token_seconds_bucket{model="m",front="grpc",le="+Inf"} 10',
        'baton_router_time_to_first_token_seconds_count{model="m",front="grpc"} 10',
        'baton_router_time_to_first_token_seconds_sum{model="m",front="grpc"} 3',
    ]) + "\n"
    now = parse(text, "m")
    assert (now.requests, now.prompt) == (10, 1000) and parse(text).requests == 109
    assert median(now.ttft) == pytest.approx(0.1 + 0.4 * (5 - 2) / 6)  # the 5th of 10 is in (0.1, 0.5]
    before = Scrape(4, 400, 0, {0.1: 2, 0.5: 2, float("inf"): 4}, {})
    since = now.minus(before)
    assert (since.requests, since.prompt, since.ttft[0.5]) == (6, 600, 6)
    assert now.minus(Scrape(50, 0, 0)) is now  # the router restarted: its counters began again
    assert median({}) != median({})  # nan: nothing observed
    node = ('# TYPE baton_prefix_cache_hits counter\n'
            'baton_prefix_cache_hits_total{node="p0",role="prefill",model="m"} 1234.0\n'
            '# TYPE baton_prefix_cache_queries counter\n'
            'baton_prefix_cache_queries_total{node="p0",role="prefill",model="m"} 5000.0\n')
    assert prefix_hits(node) == 1234 and prefix_hits("") == 0


def test_bad_planner_flags_are_refused_naming_the_field(tmp_path):
    made_up().save(tmp_path / "profile.yaml")
    for flags, field in ((["--max-nodes", "1"], "max_nodes"), (["--headroom", "-1"], "headroom"),
                         (["--confirm", "0"], "confirm")):
        proc = subprocess.run([BATON, "planner", "--etcd", "http://127.0.0.1:1", "--cluster", "c", "--slo",
                               "ttft=500,tpot=50", "--profile", str(tmp_path / "profile.yaml"), *flags],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stderr.startswith(f"baton: error: {field}:"), (flags, proc.stderr)
