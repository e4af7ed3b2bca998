"""The SLO planner's decisions (cluster/planner.py): sizing from a profile, the split of a fixed number of
nodes, hysteresis and cool-down, and the correction from what was observed."""

from __future__ import annotations

import math

import pytest

from test_simulator import profile

from baton.cluster.planner import Load, Observation, Planner, Slo, split


def planner(**kw) -> Planner:
    return Planner(profile(), Slo(ttft=0.5, tpot=0.02), **kw)


def obs(rate: float, prompt: int, output: int, seconds: float = 10.0, **kw) -> Observation:
    n = round(rate * seconds)
    return Observation(seconds, n, n * prompt, n * output, **kw)


def test_needs_grow_with_the_load_and_follow_its_shape():
    p = planner()
    chat = p.needs(Load(20.0, 200, 200))
    assert p.needs(Load(40.0, 200, 200))[0] > chat[0] and p.needs(Load(40.0, 200, 200))[1] > chat[1]
    long_prompts = p.needs(Load(20.0, 2000, 200))
    assert long_prompts[0] > chat[0] and long_prompts[0] / long_prompts[1] > chat[0] / chat[1]
    assert p.needs(Load(0.0, 0, 0)) == (0.0, 0.0)
    # An SLO below one prompt's own time, or one decode step's, cannot be met by any number of nodes.
    assert math.isinf(Planner(profile(), Slo(ttft=0.001, tpot=0.02)).needs(Load(1.0, 200, 50))[0])
    assert math.isinf(Planner(profile(), Slo(ttft=1.0, tpot=0.004)).needs(Load(1.0, 200, 50))[1])


def test_split_meets_each_need_first_then_shares_the_rest():
    assert split(8, 2.2, 3.1) == (3, 5)  # needs 3 + 4, one spare: to decode (the larger need)
    assert split(8, 0.1, 0.1) == (4, 4)
    assert split(4, 6.0, 2.0) == (2, 2)  # short of both: the smaller need met, the rest to the larger
    assert split(10, 30.0, 8.0) == (5, 5) and split(10, 2.0, 30.0) == (2, 8)  # the smaller: up to half
    assert split(3, math.inf, 1.0) == (2, 1) and split(3, 1.0, math.inf) == (1, 2)
    with pytest.raises(ValueError, match="nodes"):
        split(1, 1.0, 1.0)


def test_a_new_split_waits_for_confirmation_and_the_cool_down():
    p = planner(confirm=2, cooldown=3)
    current = (2, 2)
    heavy = obs(30.0, 3000, 20)  # long prompts, short answers: prefill-bound
    first = p.decide(heavy, current)
    assert not first.apply and "2P2D -> 3P1D proposed (1/2)" in first.reason
    assert (first.prefill, first.decode) == current  # nothing changes until it is applied
    second = p.decide(heavy, current)
    assert second.apply and second.prefill == 3 and second.decode == 1, second.reason
    assert "prefill needs more nodes" in second.reason and "predicted" in second.inputs()
    current = (second.prefill, second.decode)
    chat = obs(30.0, 100, 400)  # the load turns decode-bound at once: the cool-down holds the split
    held = [p.decide(chat, current) for _ in range(2)]
    assert not any(d.apply for d in held) and "cool-down" in held[-1].reason
    later = p.decide(chat, current)
    assert later.apply and later.decode > later.prefill


def test_a_steady_fitting_split_is_left_alone():
    p = planner()
    steady = obs(5.0, 300, 100)
    p.observe(steady, (2, 2))
    fitting = split(4, *p.needs(p.predict()))
    decisions = [p.decide(steady, fitting) for _ in range(6)]
    assert not any(d.apply for d in decisions) and decisions[-1].reason == "the split that runs fits the prediction"


def test_observed_latencies_correct_the_profile():
    p = planner()
    load = Load(5.0, 300, 100)
    ttft, tpot = p.predicted(load, 1, 1)
    p.decide(obs(5.0, 300, 100, ttft_p50=2 * ttft, tpot_p50=tpot), (1, 1))
    assert p.correction[0] == pytest.approx(1.5) and p.correction[1] == pytest.approx(1.0)  # half-way to 2x
    for _ in range(20):
        p.decide(obs(5.0, 300, 100, ttft_p50=100 * ttft, tpot_p50=tpot / 100), (1, 1))
    assert p.correction == [pytest.approx(2.0), pytest.approx(0.5)]  # clipped


def test_the_prediction_follows_a_trend_but_never_halves():
    p = planner()
    for rate in (10.0, 20.0, 30.0):
        p.observe(obs(rate, 100, 100), (1, 1))
    assert p.predict().rate == pytest.approx(40.0)
    for rate in (30.0, 2.0, 1.0):
        p.observe(obs(rate, 100, 100), (1, 1))
    assert p.predict().rate == pytest.approx(0.5)


def test_elastic_adds_at_once_within_the_room_and_removes_after_confirmation():
    p = planner(max_nodes=20, confirm=2, cooldown=0)
    heavy = obs(200.0, 200, 200)
    need_p, need_d = p.needs(Load(200.0, 200, 200))
    assert need_p + need_d > 5
    grown = p.decide(heavy, (1, 1))
    assert grown.apply and "more nodes" in grown.reason
    assert grown.prefill >= need_p * 1.2 and grown.decode >= need_d * 1.2 and grown.prefill + grown.decode <= 20
    # The machines hold 4 nodes in all: the split of 4 that meets the smaller need first.
    capped = planner(max_nodes=20).decide(heavy, (1, 1), room=4)
    assert (capped.prefill, capped.decode, capped.apply) == (2, 2, True)
    # Light load: fewer nodes, but only once proposed twice running.
    light = obs(1.0, 200, 200)
    first = p.decide(light, (grown.prefill, grown.decode))
    assert not first.apply and "proposed (1/2)" in first.reason
    second = p.decide(light, (grown.prefill, grown.decode))
    assert second.apply and "fewer nodes hold the SLO" in second.reason
    assert second.prefill + second.decode < grown.prefill + grown.decode


def test_a_role_that_needs_more_nodes_gets_them_at_once_and_the_other_keeps_its_own_for_now():
    """A shift to long prompts: prefill needs many more nodes, decode fewer. The prefill nodes are added in the
    same interval (waiting for confirmation would leave the prompts queueing); decode nodes go only once
    proposed twice running."""
    p = planner(max_nodes=40, confirm=2, cooldown=0)
    current = (1, 6)
    shifted = obs(20.0, 4000, 20)
    need_p, need_d = p.needs(Load(20.0, 4000, 20))
    assert need_p > 2 and need_d * 1.2 < 5
    now = p.decide(shifted, current)
    assert now.apply and now.prefill > 2 and now.decode == 6 and "more nodes" in now.reason
    later = [p.decide(shifted, (now.prefill, now.decode)) for _ in range(2)]
    assert [d.apply for d in later] == [False, True] and later[1].decode < 6 and later[1].prefill == now.prefill


def test_prompt_tokens_found_in_prefix_caches_shrink_the_prefill_need():
    p = planner()
    fresh, cached = p.needs(Load(20.0, 2000, 100)), p.needs(Load(20.0, 2000, 100, cached=1800))
    assert cached[0] < fresh[0] / 3 and cached[1] <= fresh[1]  # decode: KV held through a shorter prefill
    # The share it sizes for is what the prefill nodes' caches held in the last interval.
    p.observe(Observation(10.0, 200, 200 * 2000, 200 * 100, cached_tokens=200 * 1800), (1, 1))
    assert p.predict().cached == pytest.approx(1800)
    assert "prompt 2000 (1800 cached)" in p.decide(Observation(10.0, 200, 200 * 2000, 200 * 100,
                                                               cached_tokens=200 * 1800), (1, 1)).inputs()
