"""The cluster simulator (cluster/simulator.py, `baton simulate`): its closed-form runs of decode steps match a
step-by-step reference exactly, admission waits for KV blocks as a decode node's reservations do, prefixes are
found in a prefill node's cache, and the command reads profiles, traces and placements, refusing bad ones by
field."""

from __future__ import annotations

import json
import math
import random
import subprocess
from pathlib import Path

import pytest

from cluster_harness import BATON

from baton.cluster.planner import Planner, Slo
from baton.cluster.simulator import Request, SimConfig, Simulation, read_trace, simulate, summarize, thin, write_trace
from baton.engine.profile import DecodePoint, PrefillPoint, Profile

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def profile(**changes) -> Profile:
    """A made-up node: prefill 2 ms + 20 us/token + attention, decode 5 ms + 0.1 ms/seq + 10 ns/seq/token."""
    base = dict(model="m", device="cpu", dtype="float32", tp=1, machine="test", block_size=16, num_kv_blocks=10_000,
                kv_bytes_per_token=1000, max_num_seqs=256, max_model_len=4096,
                prefill=(PrefillPoint(16, 0, 0.002),), decode=(DecodePoint(1, 16, 0.005),),
                prefill_fit=(0.002, 2e-5, 1e-8), decode_fit=(0.005, 1e-4, 1e-8))
    return Profile(**(base | changes))


def reference(p: Profile, config: SimConfig, requests: list[Request]) -> list[float]:
    """End times for 1P1D with admission never binding, stepped one decode step at a time."""
    prefill_free, arrivals = 0.0, []
    queue = sorted(requests, key=lambda r: r.arrival)
    i = 0
    while i < len(queue):  # FIFO prefill steps of up to step_tokens
        start = max(prefill_free, queue[i].arrival)
        batch, tokens = [], 0
        while i < len(queue) and queue[i].arrival <= start and \
                (not batch or tokens + queue[i].prompt <= config.step_tokens):
            batch.append(queue[i])
            tokens += queue[i].prompt
            i += 1
        end = start + p.prefill_batch_s([(r.prompt, 0) for r in batch])
        for r in batch:
            arrivals.append((max(end, start + r.prompt * p.kv_bytes_per_token / config.bandwidth)
                             + config.transfer_latency, r, end))
        prefill_free = end
    arrivals.sort(key=lambda a: a[0])
    ends: dict[Request, float] = {}
    running: list[list] = []  # [left, context, request]
    t, k = 0.0, 0
    while k < len(arrivals) or running:
        if not running:
            t = max(t, arrivals[k][0])
        while k < len(arrivals) and arrivals[k][0] <= t:
            _, r, first = arrivals[k]
            if r.output == 1:
                ends[r] = first
            else:
                running.append([r.output - 1, r.prompt + 1, r])
            k += 1
        if not running:
            continue
        t += p.decode_step_s(len(running), sum(s[1] for s in running) / len(running))
        for s in running:
            s[0] -= 1
            s[1] += 1
            if s[0] == 0:
                ends[s[2]] = t
        running = [s for s in running if s[0] > 0]
    return [ends[r] for r in requests]


def trace(n: int, rate: float, seed: int = 0) -> list[Request]:
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(Request(t, rng.randint(8, 400), rng.randint(1, 120)))
    return out


def test_runs_of_decode_steps_match_a_step_by_step_reference():
    p, config = profile(), SimConfig(bandwidth=2e8)
    for rate in (5.0, 40.0, 200.0):  # from nearly one at a time to hundreds decoding together
        requests = trace(400, rate, seed=int(rate))
        got = [o.end for o in simulate(p, config, requests)]
        assert got == pytest.approx(reference(p, config, requests), rel=1e-9, abs=1e-12), rate


def test_one_request_costs_what_the_profile_says():
    p = profile()
    [o] = simulate(p, SimConfig(bandwidth=1e6, transfer_latency=0.001), [Request(1.0, 100, 4)])
    assert o.ttft == pytest.approx(p.prefill_s(100))
    arrives = max(1.0 + p.prefill_s(100), 1.0 + 100 * 1000 / 1e6) + 0.001  # 0.1 s of transfer dominates
    steps = sum(p.decode_step_s(1, 101 + i) for i in range(3))
    assert o.end == pytest.approx(arrives + steps) and o.tpot == pytest.approx((o.end - o.first_token) / 3)


def test_admission_waits_for_kv_blocks_and_refuses_what_never_fits():
    p = profile(num_kv_blocks=10)  # 160 tokens: one request of 100 + 50 at a time
    a, b, huge = Request(0.0, 100, 50), Request(0.0, 100, 50), Request(0.0, 300, 10)
    first, second, never = simulate(p, SimConfig(), [a, b, huge])
    assert second.admitted == pytest.approx(first.end) and second.first_token > first.end
    assert math.isnan(never.end)
    s = summarize([first, second, never])
    assert (s.requests, s.served) == (3, 2) and s.attained == pytest.approx(2 / 3)


def test_a_cached_prefix_is_not_computed_again():
    p = profile()
    r1, r2 = Request(0.0, 300, 2, "system", 256), Request(1.0, 300, 2, "system", 256)
    one, two = simulate(p, SimConfig(), [r1, r2])
    assert (one.cached, two.cached) == (0, 256)
    assert two.ttft == pytest.approx(p.prefill_s(300 - 256, 256)) and two.ttft < one.ttft


class Scanning(Simulation):
    """Picks nodes by looking at every one, as the indexes' definition says."""

    def _prefiller_for(self, r: Request):
        return min((p for p in self.prefillers if not p.draining),
                   key=lambda p: (p.queued_tokens + r.prompt - p.held(r), p.index))

    def _decoder_for(self, need: int):
        room = [d for d in self.decoders if not d.draining and d.held < self.places and d.free_blocks >= need]
        return min(room, key=lambda d: (d.held, -d.free_blocks, d.index)) if room else None


def test_the_node_indexes_pick_what_a_scan_of_every_node_picks():
    """Many nodes, shared prefixes (more than a node's cache holds), KV blocks short (the least held node often
    lacks them) and a planner that adds and drains nodes: the same outcomes as picking by a scan of every node."""
    rng = random.Random(7)
    requests = [Request(r.arrival, r.prompt + 64, r.output, f"p{rng.randrange(40)}", 64) if rng.random() < 0.5
                else r for r in trace(3000, 150.0, seed=5)]
    p = profile(num_kv_blocks=200)
    runs = []
    for kind in (Simulation, Scanning):
        sim = kind(p, SimConfig(prefill=5, decode=4))
        outcomes = sim.run(requests, Planner(p, Slo(0.2, 0.02), max_nodes=14, confirm=1, cooldown=0), 2.0, 0.5)
        runs.append([(o.first_token, o.end, o.prefill_node, o.decode_node, o.cached) for o in outcomes])
        assert sum(d.apply for _, d in sim.decisions) >= 3  # the planner resized the cluster
    assert runs[0] == runs[1]
    assert sum(c > 0 for *_, c in runs[0]) > 100  # prefixes were found in caches


def test_thinning_keeps_a_random_share():
    requests = trace(20_000, 100.0, seed=2)
    assert thin(requests, 1) == requests
    kept = thin(requests, 10, seed=3)
    assert 1_800 < len(kept) < 2_200 and set(kept) <= set(requests) and kept == thin(requests, 10, seed=3)
    with pytest.raises(ValueError, match="thin"):
        thin(requests, 0)


def test_colocated_nodes_decode_while_they_compute_prompts():
    p = profile()
    requests = trace(200, 20.0, seed=3)
    outcomes = simulate(p, SimConfig(prefill=0, decode=0, colocated=2), requests)
    assert all(o.end >= o.first_token > o.request.arrival for o in outcomes)
    assert {o.decode_node for o in outcomes} == {0, 1} and all(o.prefill_node == o.decode_node for o in outcomes)


def test_baton_simulate_reads_files_and_refuses_bad_ones(tmp_path):
    p = profile()
    p.save(tmp_path / "profile.yaml")
    write_trace(str(tmp_path / "trace.jsonl"), trace(300, 30.0))
    assert read_trace(str(tmp_path / "trace.jsonl")) == trace(300, 30.0)
    base = [BATON, "simulate", "--profile", str(tmp_path / "profile.yaml"), "--workload", str(tmp_path / "trace.jsonl")]
    done = subprocess.run(base + ["--placement", str(EXAMPLES / "localhost-cpu.yaml"), "--slo", "ttft=500,tpot=50",
                                  "--json", str(tmp_path / "s.json")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "on 2 prefill, 1 decode" in done.stdout, done.stdout + done.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["requests"] == summary["served"] == 300 and summary["nodes"]["prefill"] == 2
    thinned = subprocess.run(base + ["--nodes", "prefill=20,decode=10", "--thin", "10"], capture_output=True,
                             text=True, timeout=60)
    assert thinned.returncode == 0 and "(as 2 prefill, 1 decode on 1/10 of the requests)" in thinned.stdout, \
        thinned.stdout + thinned.stderr
    (tmp_path / "bad.jsonl").write_text('{"t": 0, "prompt": 5, "output": 3}\n{"t": 1, "prompt": 0, "output": 3}\n')
    for args, field in [(["--nodes", "prefill=2,decoder=1"], "nodes"), (["--nodes", "decode=1", "--slo", "ttft=x"],
                                                                          "slo"),
                        (["--nodes", "prefill=1"], "nodes: need prefill and decode"),
                        (["--nodes", "colocated=2", "--thin", "0"], "thin")]:
        done = subprocess.run(base + args, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and field in done.stderr, (args, done.stderr)
    done = subprocess.run([*base[:-1], str(tmp_path / "bad.jsonl"), "--nodes", "colocated=1"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "bad.jsonl:2: prompt" in done.stderr, done.stderr


def test_the_planner_sizes_prefill_for_the_prompt_tokens_caches_hold():
    """Long prompts that share a few long prefixes: the planner is told what the prefill nodes' caches held,
    sizes for the rest, and so needs fewer prefill nodes than for the same prompts without shared prefixes."""
    p = profile()
    rng = random.Random(3)
    plain = trace(1500, 30.0, seed=9)
    plain = [Request(r.arrival, r.prompt + 1500, r.output) for r in plain]
    shared = [Request(r.arrival, r.prompt, r.output, f"doc{rng.randrange(4)}", 1500) for r in plain]
    wanted = []
    for requests in (plain, shared):
        sim = Simulation(p, SimConfig(prefill=1, decode=1))
        # The profile as it is (no correction from observed latencies, which would hide the sizing's part).
        sim.run(requests, Planner(p, Slo(0.2, 0.05), max_nodes=20, smoothing=0.0), interval=5.0)
        wanted.append(sorted(d.needs[0] for _, d in sim.decisions)[len(sim.decisions) // 2])  # the median need
        cached = [d.load.cached for _, d in sim.decisions]
        assert (max(cached) > 1000) == (requests is shared), cached
    assert wanted[1] < wanted[0] / 3, wanted


def test_the_planner_moves_nodes_to_the_role_the_load_shifts_to():
    """A load that turns from chat (short prompts, long answers) to long prompts: the planner, given 4 nodes,
    gives decode the most of them, then prefill once the prompts grow; given up to 8 from 1P1D, it adds nodes as
    the prompts grow and removes them after, keeping most requests within the SLO on fewer node-seconds than 4
    nodes all along."""
    p = profile()
    rng, t, requests = random.Random(7), 0.0, []
    while t < 600:
        t += rng.expovariate(20.0)
        long = t >= 300
        requests.append(Request(t, rng.randint(1500, 2500) if long else rng.randint(50, 150),
                                rng.randint(10, 30) if long else rng.randint(150, 250)))
    slo = Slo(ttft=0.4, tpot=0.03)
    fixed = Simulation(p, SimConfig(prefill=2, decode=2))
    fixed.run(requests, Planner(p, slo), interval=30.0)
    splits = [(round(at), d.prefill, d.decode) for at, d in fixed.decisions if d.apply]
    chat, prompts = [x for x in splits if x[0] < 300], [x for x in splits if x[0] > 300]
    assert chat and all(d > pf for _, pf, d in chat), splits  # chat: decode-bound
    assert prompts and prompts[-1][1:] == (3, 1), splits  # long prompts: prefill-bound
    start = summarize(simulate(p, SimConfig(prefill=1, decode=1), requests), slo.ttft, slo.tpot)
    elastic = Simulation(p, SimConfig(prefill=1, decode=1))
    s = summarize(elastic.run(requests, Planner(p, slo, max_nodes=8), interval=10.0), slo.ttft, slo.tpot)
    # From 1P1D (half the requests within the SLO, left alone), with fewer node-seconds than 4 nodes throughout.
    assert s.attained > 0.9 > 0.6 > start.attained and elastic.node_seconds() < 4 * 600, (s, start)
    reasons = [d.reason for _, d in elastic.decisions if d.apply]
    assert any("more nodes" in r for r in reasons) and any("fewer nodes" in r for r in reasons), reasons
