"""What each tensor-parallel rank holds, and which ranks send which KV heads between two layouts."""

from __future__ import annotations

import dataclasses

import pytest

from baton.engine import ConfigError
from baton.engine.config import ModelConfig, RopeScaling
from baton.engine.parallel import KVRoute, kv_routes, shard

BASE = ModelConfig(architecture="LlamaForCausalLM", vocab_size=512, hidden_size=64, intermediate_size=160,
                   num_layers=2, num_heads=8, num_kv_heads=2, head_dim=8, max_position_embeddings=256,
                   rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=RopeScaling(), tie_word_embeddings=False,
                   qkv_bias=False, o_bias=False, mlp_bias=False, dtype="float32", bos_token_id=1, eos_token_ids=(2,))
QWEN = dataclasses.replace(BASE, architecture="Qwen2ForCausalLM", num_heads=6, num_kv_heads=2, intermediate_size=161,
                           vocab_size=515)


def test_ranks_split_heads_intermediate_and_vocabulary_evenly():
    shards = [shard(QWEN, 2, r) for r in range(2)]
    assert [(s.head_start, s.num_heads, s.kv_head_start, s.num_kv_heads) for s in shards] == [(0, 3, 0, 1), (3, 3, 1, 1)]
    assert [(s.inter_start, s.inter_end) for s in shards] == [(0, 81), (81, 161)]  # uneven: the first is longer
    assert [(s.vocab_start, s.vocab_end) for s in shards] == [(0, 258), (258, 515)]


def test_kv_heads_are_replicated_above_their_count():
    assert [(s.kv_head_start, s.num_kv_heads) for s in (shard(BASE, 4, r) for r in range(4))] == \
        [(0, 1), (0, 1), (1, 1), (1, 1)]  # rank r holds head r * 2 // 4
    assert [s.kv_head_start for s in (shard(BASE, 8, r) for r in range(8))] == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("cfg, tp, says", [
    (QWEN, 4, "4 does not divide the model's 6 query heads"),
    (QWEN, 3, "3 ranks cannot share the model's 2 KV heads"),
    (BASE, 0, "must be >= 1"),
    (dataclasses.replace(BASE, num_kv_heads=4), 8, None),  # fine: each of 4 KV heads on 2 ranks
])
def test_degrees_the_model_cannot_take_are_refused_naming_the_numbers(cfg, tp, says):
    if says is None:
        assert shard(cfg, tp, tp - 1).num_kv_heads == 1
        return
    with pytest.raises(ConfigError, match=says) as e:
        shard(cfg, tp, 0)
    assert e.value.field == "tensor_parallel_size"


@pytest.mark.parametrize("p, d, want", [
    (1, 1, [KVRoute(0, 0, 0, 2)]),
    (1, 2, [KVRoute(0, 0, 0, 1), KVRoute(0, 1, 1, 2)]),
    (2, 1, [KVRoute(0, 0, 0, 1), KVRoute(1, 0, 1, 2)]),
    (2, 2, [KVRoute(0, 0, 0, 1), KVRoute(1, 1, 1, 2)]),
    (4, 2, [KVRoute(0, 0, 0, 1), KVRoute(2, 1, 1, 2)]),  # replicas: the lowest rank holding the head sends
    (2, 4, [KVRoute(0, 0, 0, 1), KVRoute(0, 1, 0, 1), KVRoute(1, 2, 1, 2), KVRoute(1, 3, 1, 2)]),
    (8, 1, [KVRoute(0, 0, 0, 1), KVRoute(4, 0, 1, 2)]),
])
def test_kv_routes_give_each_decode_rank_exactly_its_heads(p, d, want):
    routes = kv_routes(BASE, p, d)
    assert routes == want
    for r in range(d):
        s = shard(BASE, d, r)
        got = sorted((x.head_start, x.head_end) for x in routes if x.dst == r)
        covered = [h for a, b in got for h in range(a, b)]
        assert covered == list(range(s.kv_head_start, s.kv_head_start + s.num_kv_heads))
        for x in routes:  # every sender holds what it sends
            src = shard(BASE, p, x.src)
            assert src.kv_head_start <= x.head_start and x.head_end <= src.kv_head_start + src.num_kv_heads
