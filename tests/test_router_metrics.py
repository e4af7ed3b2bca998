"""The router's inter-token-latency histogram takes a chunk's k gaps as one observation (it runs for every
relayed chunk); scraped, it must read exactly as prometheus_client's own histogram fed the gaps one by one."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from baton.router.metrics import _LATENCY_BUCKETS, RouterMetrics


def _samples(text: bytes, name: str) -> list[tuple[str, tuple, float]]:
    return sorted((s.name, tuple(sorted(s.labels.items())), s.value)
                  for family in text_string_to_metric_families(text.decode()) if family.name == name
                  for s in family.samples if not s.name.endswith("_created"))


def test_chunk_histogram_reads_as_the_stock_one():
    name = "baton_router_inter_token_latency_seconds"
    ours = RouterMetrics()
    registry = CollectorRegistry()
    stock = Histogram(name, "reference", ["model", "front"], buckets=_LATENCY_BUCKETS, registry=registry)
    # Values on and around bucket bounds, below the first and past the last, k at a time, two label sets.
    chunks = [("m", "grpc", 0.0025, 3), ("m", "grpc", 0.00250001, 1), ("m", "openai", 0.0, 2),
              ("m", "grpc", 80.0, 1), ("m", "grpc", 80.5, 4), ("n", "kserve", 0.04, 1), ("m", "grpc", 1e-4, 5)]
    for model, front, gap, k in chunks:
        ours.itl.labels(model, front).observe(gap, k)
        for _ in range(k):
            stock.labels(model, front).observe(gap)
    got = _samples(ours.exposition()[0], name)
    want = _samples(generate_latest(registry), name)
    assert len(got) == len(want) == 3 * (len(_LATENCY_BUCKETS) + 3)  # buckets, +Inf, count and sum per label set
    for (got_name, got_labels, got_value), (want_name, want_labels, want_value) in zip(got, want):
        assert (got_name, got_labels) == (want_name, want_labels)
        if got_name.endswith("_sum"):  # k x gap against k additions of it: equal to the last bits
            assert got_value == pytest.approx(want_value, rel=1e-12)
        else:
            assert got_value == want_value, (got_name, got_labels)
