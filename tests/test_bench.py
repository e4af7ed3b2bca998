"""`baton bench`: workload generation, metrics on hand-made records, and one short run on a real cluster."""

from __future__ import annotations

import asyncio
import json
import math
import re
import statistics
from itertools import islice
from pathlib import Path

import pytest

from baton.engine.checkpoint import DEFAULT_MODEL
from baton.engine.tokenizer import Tokenizer

from baton.bench.comparison import compare, ratio
from baton.bench.loadgen import RequestRecord
from baton.bench.metrics import SLO, percentile, summarize
from baton.bench.runner import parse_config, resolve_slo, run_config
from baton.bench.slo import Bound, SLOSpec, Unloaded
from baton.bench.workload import (LengthDist, WorkloadSpec, fit, from_conversations, read_sharegpt, synthetic,
                                  tokenize_sharegpt)

MIXTURE = {"mixture": [
    {"name": "chat", "weight": 0.9, "prompt_len": {"dist": "uniform", "min": 64, "max": 256},
     "output_len": {"dist": "uniform", "min": 64, "max": 256}},
    {"name": "long", "weight": 0.1, "prompt_len": {"dist": "uniform", "min": 768, "max": 1000}, "output_len": 32},
]}


def take(spec: WorkloadSpec, n: int, seed: int = 0, vocab: int = 32000, max_len: int = 1024):
    return list(islice(synthetic(spec, seed, vocab, max_len), n))


def test_same_seed_same_requests_and_another_seed_differs():
    spec = WorkloadSpec.parse(MIXTURE)
    a, b, c = take(spec, 50, seed=7), take(spec, 50, seed=7), take(spec, 50, seed=8)
    assert a == b
    assert [r.prompt for r in a] != [r.prompt for r in c]


def test_mixture_weights_lengths_and_context_limit():
    reqs = take(WorkloadSpec.parse(MIXTURE), 2000)
    long = [r for r in reqs if r.workload == "long"]
    assert 0.07 < len(long) / len(reqs) < 0.13
    for r in reqs:
        assert len(r.prompt) == r.prompt_len and all(3 <= t < 32000 for t in r.prompt)
        assert r.prompt_len + r.output_len <= 1023 and r.output_len >= 1
        if r.workload == "chat":
            assert 64 <= r.prompt_len <= 256 and 64 <= r.output_len <= 256
        else:  # 1000 + 32 > 1023: the output is shortened, never the prompt
            assert 768 <= r.prompt_len <= 1000 and r.output_len == min(32, 1023 - r.prompt_len)
    assert fit(5000, 10, 512) == (510, 1)


def test_length_distributions():
    import random

    rng = random.Random(0)
    assert {LengthDist.parse(12, "x").sample(rng) for _ in range(10)} == {12}
    uni = [LengthDist.parse({"dist": "uniform", "min": 5, "max": 9}, "x").sample(rng) for _ in range(2000)]
    assert set(uni) == {5, 6, 7, 8, 9}
    normal = LengthDist.parse({"dist": "normal", "mean": 100, "std": 20, "min": 70, "max": 150}, "x")
    xs = [normal.sample(rng) for _ in range(4000)]
    assert min(xs) == 70 and max(xs) <= 150  # clipped (70 is 1.5 sigma below the mean: often reached)
    assert abs(statistics.mean(xs) - 100) < 3


@pytest.mark.parametrize("obj, field", [
    ({"prompt_len": {"dist": "uniform", "min": 10, "max": 5}, "output_len": 4}, "workload.prompt_len.max"),
    ({"prompt_len": {"dist": "zipf"}, "output_len": 4}, "workload.prompt_len.dist"),
    ({"prompt_len": 8}, "workload.output_len"),
    ({"mixture": [{"name": "a", "weight": 0, "prompt_len": 4, "output_len": 4}]}, "workload.mixture[0].weight"),
    ({"prompt_len": 0, "output_len": 4}, "workload.prompt_len.value"),
])
def test_bad_workloads_name_the_field(obj, field):
    with pytest.raises(ValueError, match="^" + re.escape(field) + ":"):
        WorkloadSpec.parse(obj)


def test_bad_bench_config_names_the_field():
    base = {"configurations": [{"name": "a", "router": "x:1"}], "workload": {"prompt_len": 4, "output_len": 4},
            "num_requests": 3}
    parse_config(base)
    for change, field in (({"rates": [0]}, "rate"), ({"mode": "closed", "concurrency": 0}, "concurrency"),
                          ({"mode": "sideways"}, "mode"), ({"num_requests": None}, "num_requests"),
                          ({"slo_ttft_ms": -1}, "slo_ttft_ms"), ({"colour": 1}, "colour"), ({"repeats": 0}, "repeats")):
        with pytest.raises(ValueError, match=f"^{field}:"):
            parse_config(base | change)


TWO = {"configurations": [{"name": "a", "router": "x:1"}, {"name": "b", "router": "y:1"}],
       "workload": {"prompt_len": 4, "output_len": 4}, "num_requests": 3}


def test_slo_relative_and_absolute_forms():
    assert parse_config(TWO | {"slo": {"ttft": "4x", "tpot": "1.5X"}}).slo == \
        SLOSpec(Bound(multiple=4.0), Bound(multiple=1.5))
    assert parse_config(TWO | {"slo": {"ttft_ms": 1000, "tpot_ms": 12}}).slo == SLOSpec(Bound(ms=1000), Bound(ms=12))
    mixed = parse_config(TWO | {"slo": {"ttft_ms": 800, "tpot": " 2 x "}}).slo
    assert mixed == SLOSpec(Bound(ms=800), Bound(multiple=2.0)) and mixed.relative
    legacy = parse_config(TWO | {"slo_ttft_ms": 1000, "slo_tpot_ms": 12}).slo  # the older keys still work
    assert legacy == SLOSpec(Bound(ms=1000), Bound(ms=12)) and not legacy.relative
    assert parse_config(TWO | {"slo": {"tpot": "2x"}}).slo == SLOSpec(None, Bound(multiple=2.0))
    assert parse_config(TWO).slo == SLOSpec()
    assert parse_config(TWO).baseline == "a" and parse_config(TWO | {"baseline": "b"}).baseline == "b"


@pytest.mark.parametrize("change, field", [
    ({"slo": {"tpot": "2y"}}, "slo.tpot"),
    ({"slo": {"tpot": "0x"}}, "slo.tpot"),
    ({"slo": {"ttft": "-3x"}}, "slo.ttft"),
    ({"slo": {"ttft": "x"}}, "slo.ttft"),
    ({"slo": {"ttft": 4}}, "slo.ttft"),  # 4 ms or 4x? Refused rather than guessed
    ({"slo": {"ttft_ms": 0}}, "slo.ttft_ms"),
    ({"slo": {"tpot_ms": "12"}}, "slo.tpot_ms"),
    ({"slo": {"ttft": "2x", "ttft_ms": 100}}, "slo.ttft"),
    ({"slo": {"latency": "2x"}}, "slo.latency"),
    ({"slo": "2x"}, "slo"),
    ({"slo": {"tpot": "2x"}, "slo_ttft_ms": 100}, "slo_ttft_ms"),
    ({"slo_tpot_ms": -1}, "slo_tpot_ms"),
    ({"baseline": "c"}, "baseline"),
    ({"baseline": 1}, "baseline"),
    ({"calibration_requests": -1}, "calibration_requests"),
    ({"calibration_requests": 0, "slo": {"tpot": "2x"}}, "calibration_requests"),  # nothing to multiply
])
def test_bad_slo_and_baseline_name_the_key(change, field):
    with pytest.raises(ValueError, match="^" + re.escape(field) + ":"):
        parse_config(TWO | change)


def test_unloaded_figures_are_medians_of_the_calibration_requests():
    records = [rec(0, 90.0, 6.0, 20), rec(1, 40.0, 5.0, 20), rec(2, 50.0, 7.0, 20),
               rec(3, 60.0, None, 1),  # one token: a TTFT, no TPOT
               rec(4, None, None, 0, error="UNAVAILABLE")]
    u = Unloaded.from_records(records)
    assert (u.ttft_ms, u.tpot_ms, u.requests) == (55.0, 6.0, 5)
    assert u.ttft_samples_ms == (90.0, 40.0, 50.0, 60.0) and u.tpot_samples_ms == (6.0, 5.0, 7.0)
    assert Unloaded.from_records([]) == Unloaded(None, None)


def test_relative_slo_resolves_against_the_baseline_unloaded_figures():
    unloaded = {"a": Unloaded(ttft_ms=50.0, tpot_ms=6.0), "b": Unloaded(ttft_ms=80.0, tpot_ms=14.0)}
    spec = SLOSpec(Bound(multiple=4.0), Bound(multiple=2.0))
    assert spec.resolve(unloaded["b"]) == SLO(320.0, 28.0)
    assert SLOSpec(Bound(ms=1000.0), Bound(multiple=2.0)).resolve(unloaded["a"]) == SLO(1000.0, 12.0)
    assert SLOSpec(Bound(ms=1000.0), None).resolve(None) == SLO(1000.0, None)  # nothing relative: no figures needed
    with pytest.raises(ValueError, match="^slo.tpot:"):
        spec.resolve(Unloaded(ttft_ms=50.0, tpot_ms=None))

    # The run's SLO: the named baseline's figures (not each configuration's own), else the first's
    slo, record = resolve_slo(parse_config(TWO | {"slo": {"ttft": "4x", "tpot": "2x"}, "baseline": "b"}), unloaded)
    assert slo == SLO(320.0, 28.0)
    assert record == {"ttft_ms": 320.0, "tpot_ms": 28.0, "ttft_multiple": 4.0, "tpot_multiple": 2.0,
                      "relative_to": "b", "relative_to_unloaded": {"ttft_ms": 80.0, "tpot_ms": 14.0}}
    slo, record = resolve_slo(parse_config(TWO | {"slo": {"ttft_ms": 1000, "tpot": "2x"}}), unloaded)
    assert slo == SLO(1000.0, 12.0) and record["relative_to"] == "a" and record["ttft_multiple"] is None
    slo, record = resolve_slo(parse_config(TWO | {"slo_ttft_ms": 1000, "slo_tpot_ms": 12}), unloaded)
    assert slo == SLO(1000.0, 12.0) and record["relative_to"] is None and "relative_to_unloaded" not in record
    # The baseline failed: no SLO to judge by, said so (the caller leaves goodput out)
    slo, record = resolve_slo(parse_config(TWO | {"slo": {"tpot": "2x"}, "baseline": "b"}), {"a": unloaded["a"]})
    assert slo is None and record["tpot_ms"] is None and "'b'" in record["error"]


def point(ttft_p99: float | None, tpot_p99: float | None, goodput: float | None, attainment: float | None) -> dict:
    """The fields of a summarize() entry that the comparison reads."""
    return {"ttft_ms": {"p99": ttft_p99}, "tpot_ms": {"p99": tpot_p99}, "goodput_rps": goodput,
            "slo_attainment": attainment}


def test_comparison_ratios_capacity_and_null_on_zero():
    results = {
        "colocated": {"2": point(400.0, 20.0, 1.8, 1.0), "4": point(500.0, 40.0, 0.0, 0.8),
                      "6": point(800.0, 50.0, 0.0, 0.5)},
        "1P1D": {"2": point(300.0, 10.0, 1.9, 1.0), "4": point(600.0, 12.0, 3.6, 0.95),
                 "6": point(900.0, 15.0, 5.1, 0.85)},
        "idle": {"2": point(None, None, None, None)},  # completed nothing: every ratio null
    }
    c = compare(results, "colocated")
    assert c["baseline"] == "colocated" and c["attainment"] == 0.9 and "error" not in c
    d = c["configurations"]["1P1D"]
    assert d["points"]["2"] == {"tpot_p99": 0.5, "ttft_p99": 0.75, "goodput": pytest.approx(1.9 / 1.8)}
    assert d["points"]["4"] == {"tpot_p99": 0.3, "ttft_p99": 1.2, "goodput": None}  # baseline goodput 0
    assert d["points"]["6"]["goodput"] is None
    # Capacity at 90%: colocated 2 + 2 * (1.0 - 0.9) / (1.0 - 0.8) = 3, 1P1D 4 + 2 * 0.05 / 0.1 = 5
    assert d["capacity"] == {"value": pytest.approx(5.0), "at_least": False, "baseline": pytest.approx(3.0),
                             "baseline_at_least": False, "ratio": pytest.approx(5 / 3)}
    assert c["configurations"]["colocated"]["points"]["2"] == {"tpot_p99": 1.0, "ttft_p99": 1.0, "goodput": 1.0}
    idle = c["configurations"]["idle"]
    assert idle["points"] == {"2": {"tpot_p99": None, "ttft_p99": None, "goodput": None}}
    assert idle["capacity"]["value"] is None and idle["capacity"]["ratio"] is None
    json.dumps(c, allow_nan=False)  # null, never inf or NaN

    # Met at every point: a lower bound; against a baseline whose capacity is None (missed at the lowest rate)
    c = compare({"a": {"2": point(1.0, 1.0, 1.0, 0.5)}, "b": {"2": point(1.0, 1.0, 1.0, 0.95)}}, "a")
    assert c["configurations"]["b"]["capacity"] == {"value": 2.0, "at_least": True, "baseline": None,
                                                    "baseline_at_least": False, "ratio": None}
    assert compare(results, "gone")["error"]  # the baseline failed: no ratios at all
    assert ratio(0.0, 0.0) is None and ratio(3.0, 0.0) is None and ratio(None, 2.0) is None and ratio(3.0, 2.0) == 1.5


def test_sharegpt_loader(tmp_path: Path):
    data = [
        {"conversations": [{"from": "human", "value": "a b c"}, {"from": "gpt", "value": "d e"}]},
        {"conversations": [{"from": "gpt", "value": "no human first"}]},
        {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "x y"},
                           {"from": "gpt", "value": "z " * 600}]},  # too long for a 512 context: dropped
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r s t u"}]},
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    pairs = read_sharegpt(path)
    assert [h for h, _ in pairs] == ["a b c", "x y", "q"]

    class Words:  # stands in for the router's Tokenize: BOS + one id per word
        async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return [1] * add_special_tokens + [5] * len(text.split())

    convs = asyncio.run(tokenize_sharegpt(pairs, Words(), max_model_len=512))
    assert [(c.prompt, c.prompt_len, c.output_len) for c in convs] == [("a b c", 4, 2), ("q", 2, 4)]
    reqs = list(islice(from_conversations(convs, seed=3), 6))
    assert reqs == list(islice(from_conversations(convs, seed=3), 6))
    assert sorted(r.prompt for r in reqs[:2]) == ["a b c", "q"]  # each pass is a permutation


def rec(i: int, ttft: float | None, tpot: float | None, out: int, error: str | None = None,
        warmup: bool = False, chunks: list[float] = ()) -> RequestRecord:
    e2e = None if ttft is None else ttft + (tpot or 0.0) * (out - 1)  # one token: no TPOT
    return RequestRecord(i, "w", warmup, 0.0, 0.0, 10, output_tokens=out, ttft_ms=ttft, tpot_ms=tpot, e2e_ms=e2e,
                         chunk_s=list(chunks), chunk_tokens=[1] * len(chunks), error=error)


def test_percentiles_interpolate_like_numpy():
    xs = list(range(1, 101))  # 1..100
    assert percentile(xs, 50) == 50.5 and percentile(xs, 90) == pytest.approx(90.1)
    assert percentile(xs, 99) == pytest.approx(99.01) and percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_summary_goodput_errors_and_warmup():
    records = [
        rec(0, 100.0, 10.0, 11, chunks=[0.0, 0.01, 0.03]),  # good
        rec(1, 300.0, 10.0, 11),  # TTFT over the SLO
        rec(2, 100.0, 60.0, 11),  # TPOT over the SLO
        rec(3, 50.0, 5.0, 21),  # good
        rec(4, None, None, 0, error="RESOURCE_EXHAUSTED"),
        rec(5, None, None, 0, error="RESOURCE_EXHAUSTED"),
        rec(6, None, None, 0, error="DEADLINE_EXCEEDED"),
        rec(7, 1e6, 1e6, 99, warmup=True),  # left out everywhere
    ]
    s = summarize(records, wall_s=2.0, slo=SLO(ttft_ms=200, tpot_ms=50))
    assert s["completed"] == 4 and s["requests"] == 7
    assert s["errors"] == {"RESOURCE_EXHAUSTED": 2, "DEADLINE_EXCEEDED": 1}
    assert s["goodput_rps"] == 1.0 and s["throughput_rps"] == 2.0
    assert s["throughput_tok_s"] == (11 + 11 + 11 + 21) / 2.0
    assert s["ttft_ms"]["mean"] == pytest.approx(137.5) and s["ttft_ms"]["p50"] == 100.0
    assert s["tpot_ms"]["p99"] == pytest.approx(percentile([10, 10, 60, 5], 99))
    assert s["itl_ms"]["mean"] == pytest.approx(15.0)  # gaps of 10 and 20 ms
    assert s["e2e_ms"]["p90"] == pytest.approx(percentile([200, 400, 700, 150], 90))
    assert summarize(records, 2.0)["goodput_rps"] == 2.0  # no SLO: every completed request is good
    empty = summarize([], 1.0)
    assert empty["completed"] == 0 and empty["ttft_ms"]["p99"] is None


def test_cli_parser():
    from baton.cluster.cli import build_parser

    args = build_parser().parse_args(["bench", "--config", "c.yaml", "--output", "out"])
    assert args.config == "c.yaml" and args.output == "out" and callable(args.run)


def test_run_config_end_to_end(tmp_path: Path, capsys):
    """A real local cluster (etcd, 1 prefill + 1 decode node, router) with the bundled stories260K."""
    config = {
        "configurations": [{"name": "1P1D", "launch": {"prefill": 1, "decode": 1, "threads": 1, "model": "default"}}],
        "workload": {"prompt_len": {"dist": "uniform", "min": 8, "max": 48}, "output_len": {"dist": "normal",
                     "mean": 16, "std": 6, "min": 4, "max": 32}},
        "mode": "closed", "concurrency": 3, "num_requests": 10, "warmup_requests": 2, "seed": 5,
        "request_timeout_s": 30, "calibration_requests": 3,
        "slo": {"ttft": "1000x", "tpot": "1000x"},  # relative, and loose: goodput counts (nearly) every request
    }
    summary = run_config(config, tmp_path, progress=False)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert set(on_disk) >= {"machine", "commit", "config", "slo", "unloaded", "results", "comparison"}
    # The unloaded figures: medians of the calibration requests, sent before the load
    unloaded = on_disk["unloaded"]["1P1D"]
    assert unloaded["requests"] == 3 and len(unloaded["ttft_samples_ms"]) == len(unloaded["tpot_samples_ms"]) == 3
    assert unloaded["ttft_ms"] == statistics.median(unloaded["ttft_samples_ms"]) > 0
    assert unloaded["tpot_ms"] == statistics.median(unloaded["tpot_samples_ms"]) > 0
    # The SLO goodput was judged by: the milliseconds the multiples resolved to, and what they multiplied
    slo = on_disk["slo"]
    assert slo["relative_to"] == "1P1D" and slo["ttft_multiple"] == slo["tpot_multiple"] == 1000
    assert slo["relative_to_unloaded"] == {"ttft_ms": unloaded["ttft_ms"], "tpot_ms": unloaded["tpot_ms"]}
    assert slo["ttft_ms"] == pytest.approx(1000 * unloaded["ttft_ms"])
    assert slo["tpot_ms"] == pytest.approx(1000 * unloaded["tpot_ms"])
    # The only configuration is the baseline (the first): every ratio to itself is 1
    comparison = on_disk["comparison"]
    assert comparison["baseline"] == "1P1D" and set(comparison["configurations"]) == {"1P1D"}
    assert comparison["configurations"]["1P1D"]["points"] == {"3": {"tpot_p99": 1.0, "ttft_p99": 1.0, "goodput": 1.0}}
    cap = comparison["configurations"]["1P1D"]["capacity"]
    assert cap["value"] == cap["baseline"] and cap["ratio"] in (1.0, None)
    s = on_disk["results"]["1P1D"]["3"]
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(s[name]) == {"mean", "p50", "p90", "p99"} and s[name]["p50"] > 0
    assert s["completed"] == 10 and s["errors"] == {}
    assert s["throughput_tok_s"] > 0 and s["throughput_rps"] > 0 and s["goodput_rps"] > 0
    raw = json.loads((tmp_path / "raw.json").read_text())["1P1D"]["3"]["records"]
    measured = [r for r in raw if not r["warmup"]]
    assert len(raw) == 12 and len(measured) == 10  # the calibration requests are not among them
    judged = summarize([RequestRecord.from_dict(r) for r in raw], s["wall_s"], SLO(slo["ttft_ms"], slo["tpot_ms"]))
    assert judged["goodput_rps"] == s["goodput_rps"]  # goodput was judged by the resolved milliseconds
    for r in measured:  # ignore_eos + max_tokens: exactly the drawn length, through both nodes
        assert r["error"] is None and r["finish_reason"] == "length" and r["output_tokens"] >= 4
        assert r["prefill_node"].startswith("prefill") and r["decode_node"].startswith("decode")
    assert (tmp_path / "latency_cdf.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "1P1D" in out and "SLO: TTFT <= " in out and "1000x 1P1D's unloaded" in out


def test_open_loop_sweep_end_to_end(tmp_path: Path):
    """Fixed-rate arrivals at two rates, twice each, against a colocated node: one pooled result per rate
    with each repeat's figures, arrivals on schedule, and the sweep plot."""
    config = {
        "configurations": [{"name": "colocated", "launch": {"colocated": 1, "threads": 1, "model": "default"}}],
        "workload": {"prompt_len": {"dist": "uniform", "min": 4, "max": 64}, "output_len": 8},
        "mode": "open", "arrival": "fixed", "rates": [20, 40], "num_requests": 8, "warmup_requests": 1,
        "seed": 1, "repeats": 2, "request_timeout_s": 30, "slo_ttft_ms": 5000, "slo_tpot_ms": 1000,
    }
    summary = run_config(config, tmp_path, progress=False)
    results = summary["results"]["colocated"]
    assert set(results) == {"20", "40"}
    raw = json.loads((tmp_path / "raw.json").read_text())["colocated"]
    for rate in (20, 40):
        s = results[str(rate)]
        assert s["completed"] == 16 and s["errors"] == {} and len(s["repeats"]) == 2
        lens = {}
        for repeat in (0, 1):
            measured = [r for r in raw[str(rate)]["records"] if not r["warmup"] and r["repeat"] == repeat]
            assert len(measured) == 8
            lens[repeat] = [r["prompt_tokens"] for r in sorted(measured, key=lambda r: r["index"])]
            starts = sorted(r["scheduled_s"] for r in measured)
            gaps = [b - a for a, b in zip(starts, starts[1:])]
            assert all(abs(g - 1 / rate) < 1e-6 for g in gaps)  # the schedule, not when requests happened to go
        assert lens[0] != lens[1]  # repeat k draws with seed + k
        for r in raw[str(rate)]["records"]:  # raw.json reads back into the records that wrote it
            assert RequestRecord.from_dict(r).to_dict() == r
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_a_configuration_that_cannot_start_is_recorded_and_the_others_run(tmp_path: Path):
    config = {
        "configurations": [
            {"name": "broken", "launch": {"colocated": 1, "threads": 1, "model": str(tmp_path / "no-model")}},
            {"name": "ok", "launch": {"colocated": 1, "threads": 1, "model": "default"}},
        ],
        "workload": {"prompt_len": 8, "output_len": 4},
        "mode": "closed", "concurrency": 2, "num_requests": 4, "warmup_requests": 0, "seed": 1,
        "request_timeout_s": 30, "slo": {"tpot": "2x"},  # relative to the baseline, the first: broken
    }
    summary = run_config(config, tmp_path / "out", progress=False)
    assert set(summary["failed"]) == {"broken"} and "exited" in summary["failed"]["broken"]
    assert summary["results"]["ok"]["2"]["completed"] == 4
    # Nothing to resolve the SLO or the ratios against: said so, and no goodput rather than a wrong one
    assert "broken" in summary["slo"]["error"] and summary["slo"]["tpot_ms"] is None
    assert summary["results"]["ok"]["2"]["goodput_rps"] is None and "broken" in summary["comparison"]["error"]
    with pytest.raises(RuntimeError):  # nothing ran at all: an error, not an empty report
        run_config({**config, "configurations": config["configurations"][:1]}, tmp_path / "out2", progress=False)


def test_sharegpt_workload_end_to_end(tmp_path: Path):
    """A ShareGPT file through a real 1P1D cluster: text prompts tokenized by the router, each request asks
    for its reference answer's length and gets exactly that many tokens; a too-long conversation is dropped."""
    data = [
        {"conversations": [{"from": "human", "value": "Once upon a time there was a little dog."},
                           {"from": "gpt", "value": "The dog liked to run in the park with his friend."}]},
        {"conversations": [{"from": "system", "value": "be kind"},
                           {"from": "human", "value": "Lily had a red ball."},
                           {"from": "gpt", "value": "She played with it every day."}]},
        {"conversations": [{"from": "human", "value": "Tim saw a big tree."},
                           {"from": "gpt", "value": "tree " * 600}]},  # beyond stories260K's 512 context
        {"conversations": [{"from": "gpt", "value": "no question"}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    config = {
        "configurations": [{"name": "1P1D", "launch": {"prefill": 1, "decode": 1, "threads": 1, "model": "default"}}],
        "workload": {"sharegpt": str(path)},
        "mode": "closed", "concurrency": 2, "num_requests": 6, "warmup_requests": 0, "seed": 2,
        "request_timeout_s": 30, "slo_ttft_ms": 5000, "slo_tpot_ms": 1000,
    }
    summary = run_config(config, tmp_path / "out", progress=False)
    assert summary["results"]["1P1D"]["2"]["completed"] == 6
    records = json.loads((tmp_path / "out" / "raw.json").read_text())["1P1D"]["2"]["records"]
    tok = Tokenizer.from_folder(DEFAULT_MODEL)
    fitting = {(len(tok.encode(h)), len(tok.encode(g, add_special_tokens=False))) for h, g in read_sharegpt(path)[:2]}
    for r in records:
        assert r["error"] is None and r["workload"] == "sharegpt" and r["finish_reason"] == "length"
    # Both fitting conversations were sent (three passes over them), each with its own lengths.
    assert {(r["prompt_tokens"], r["output_tokens"]) for r in records} == fitting


def test_capacity_at_an_slo_attainment():
    from baton.bench.slo_sensitivity import capacity

    assert capacity({2: 1.0, 4: 0.95, 6: 0.85}, 0.9) == pytest.approx(5.0)  # halfway from 0.95 down to 0.85
    assert capacity({2: 1.0, 4: 0.92}, 0.9) == 4  # met at every rate swept: at least the highest
    assert capacity({2: 0.5, 4: 0.2}, 0.9) is None
    assert capacity({2: 0.95, 4: 0.8, 6: 0.95}, 0.9) == pytest.approx(2 + 2 * 0.05 / 0.15)  # the first miss counts


def test_slo_sensitivity_defaults_to_the_runs_own_ttft_bound(tmp_path: Path):
    from baton.bench.slo_sensitivity import run_ttft_ms

    assert run_ttft_ms(tmp_path) == 1000.0  # no summary.json
    (tmp_path / "summary.json").write_text(json.dumps({"config": {"slo_ttft_ms": 800}}))  # before relative SLOs
    assert run_ttft_ms(tmp_path) == 800.0
    (tmp_path / "summary.json").write_text(json.dumps({"config": {"slo": {"ttft": "4x"}}, "slo": {"ttft_ms": 222.5}}))
    assert run_ttft_ms(tmp_path) == 222.5


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "bench" / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_bench_configs_parse(path: Path, tmp_path: Path):
    from baton.bench.runner import _cluster_spec, load_config

    cfg = parse_config(load_config(path))
    for target in cfg.targets:  # launch specs are checked too (a named model would be a real folder)
        if target.launch:
            _cluster_spec(target.__class__(target.name, launch={**target.launch, "model": "default"}), tmp_path)
