"""Prefix caching in the engine (issue 25, part 1): full blocks named by their contents, kept once their
request ends, and reused by the next prompt that starts the same way; outputs exact whatever was cached."""

from __future__ import annotations

import pytest

from test_stories import PROMPTS, hf_greedy

from baton.engine import LLM, SamplingParams
from baton.engine.block_manager import BlockManager
from baton.engine.prefix import block_names

SEED = b"model"


def _filled(bm: BlockManager, seq_id: str, tokens: list[int]) -> None:
    """A sequence that computed `tokens` (attached to what is cached, grown, committed)."""
    match = bm.match(tokens)
    bm.attach(seq_id, match, len(tokens))
    bm.grow(seq_id, len(tokens))
    bm.commit(seq_id, tokens, len(tokens))


def test_names_chain_over_the_prefix_and_the_model():
    a = block_names(SEED, list(range(10)), 4)
    assert len(a) == 2  # full blocks only: the partly filled third is never named
    assert block_names(SEED, list(range(8)) + [99], 4) == a  # the same first blocks, whatever follows
    assert block_names(SEED, [7] + list(range(1, 10)), 4)[1] != a[1]  # same tokens, another parent
    assert block_names(b"other model", list(range(10)), 4)[0] != a[0]
    assert block_names(SEED, list(range(10)), 4, start=a[:1]) == a  # extended, not recomputed


def test_a_released_prompt_stays_cached_and_a_later_one_attaches_its_blocks():
    bm = BlockManager(num_blocks=8, block_size=4, seed=SEED)
    tokens = list(range(13))  # 3 full blocks and one token
    _filled(bm, "a", tokens)
    first = bm.table("a")
    assert bm.free("a") == 4 and bm.num_free == 8 and bm.num_cached == 3  # cached blocks count as available
    again = bm.match(tokens)
    assert again.blocks == first[:3] and again.reclaimed == 3
    whole = bm.match(tokens[:12])  # a prompt cached whole: its last block is computed again (its logits)
    assert whole.blocks == first[:2]
    assert bm.match([1] + tokens[1:]).blocks == []  # another first token: nothing matches
    _filled(bm, "b", tokens[:9] + [50, 51, 52])
    assert bm.table("b")[:2] == first[:2] and bm.refs(first[0]) == 1
    assert bm.counters.queries == 13 + 12 and bm.counters.hits == 8


def test_eviction_takes_the_least_recently_released_leaf_first_and_flush_empties_the_cache():
    bm = BlockManager(num_blocks=6, block_size=2, seed=SEED)
    _filled(bm, "old", [1, 2, 3, 4, 5, 6])  # three blocks, named
    old = bm.table("old")
    bm.free("old")
    _filled(bm, "new", [9, 9, 8, 8])
    bm.free("new")
    assert bm.num_free == 6 and bm.num_cached == 5
    bm.grow("x", 2)  # the one never-used block
    bm.grow("y", 2)  # then the oldest release's leaf
    assert bm.table("y") == [old[2]] and bm.counters.evictions == 1
    assert bm.match([1, 2, 3, 4, 5, 6, 7]).blocks == old[:2]  # its prefix is still whole
    assert bm.flush() == 4 and bm.num_cached == 0 and bm.num_free == 4
    assert bm.match([1, 2, 3, 4, 5, 6, 7]).blocks == []


def test_blocks_computed_twice_at_once_keep_one_name():
    bm = BlockManager(num_blocks=8, block_size=4, seed=SEED)
    tokens = list(range(9))
    for seq in ("a", "b"):  # both admitted before either committed: neither found the other's blocks
        bm.attach(seq, bm.match(tokens), len(tokens))
        bm.grow(seq, len(tokens))
    for seq in ("a", "b"):
        bm.commit(seq, tokens, len(tokens))
    assert bm.num_cached == 2
    bm.free("a")
    bm.free("b")
    assert bm.num_free == 8 and bm.num_cached == 2  # b's copies went back free, unnamed


def test_no_seed_no_caching():
    bm = BlockManager(num_blocks=4, block_size=2)
    _filled(bm, "a", [1, 2, 3])
    bm.free("a")
    assert bm.num_cached == 0 and bm.match([1, 2, 3]).blocks == []


GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=11, ignore_eos=True)


def _prompts(llm: LLM) -> list[list[int]]:
    """Prompts that share prefixes of every kind: one ending on a block boundary (16 tokens), one cached whole,
    one that extends another."""
    base = llm.tokenizer.encode(PROMPTS[3] + " " + PROMPTS[1])
    boundary = base[:32] + llm.tokenizer.encode(" The cat")
    return [base, base, base[:32], boundary, base + llm.tokenizer.encode(" and the dog")]


@pytest.fixture(scope="module")
def uncached(stories_path) -> LLM:
    return LLM(str(stories_path), enable_prefix_caching=False)


@pytest.mark.parametrize("chunked", [False, True])
def test_outputs_with_the_cache_equal_those_without_and_transformers(stories_path, uncached, hf_stories, chunked):
    extra = dict(enable_chunked_prefill=True, max_num_batched_tokens=24, max_num_seqs=8) if chunked else {}
    cached = LLM(str(stories_path), **extra)
    prompts = _prompts(cached)
    for params in (GREEDY, SAMPLED):  # one prefix under different sampling settings
        want = [o.token_ids for o in uncached.generate(prompts, params)]
        for _ in range(2):  # the second time, every prompt finds its blocks cached
            assert [o.token_ids for o in cached.generate(prompts, params)] == want
    c = cached.engine.blocks.counters
    assert c.hits > c.queries / 2
    for prompt in prompts[2:]:
        [out] = cached.generate([prompt], GREEDY)
        assert out.token_ids == hf_greedy(hf_stories, prompt, GREEDY.max_tokens)


def test_preemption_and_eviction_recompute_exactly(stories_path, uncached):
    """A pool too small for the batch: sequences are preempted, cached blocks evicted and found again."""
    cached = LLM(str(stories_path), num_kv_blocks=24, max_num_seqs=8)
    prompts = _prompts(cached) * 3
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    want = [o.token_ids for o in uncached.generate(prompts, params)]
    assert [o.token_ids for o in cached.generate(prompts, params)] == want
    blocks = cached.engine.blocks
    assert blocks.counters.evictions > 0 and blocks.num_free == blocks.num_blocks  # nothing held: all available
    cached_now = blocks.num_cached
    assert cached_now and cached.engine.reset_prefix_cache() == cached_now and blocks.num_cached == 0


def test_blocks_evicted_to_the_second_tier_come_back_instead_of_being_computed(stories_path, uncached):
    """`kv_offload_bytes`: a pool of 24 blocks, prompts that need three times that; what is evicted goes to a
    file-backed second tier, and the prompts sent again copy their blocks back from it (offload hits) instead of
    computing them, exact against the uncached engine; the tier keeps at most what its bytes hold, the least
    recently used going first, and a cache reset empties it too. Without it, the same prompts compute again."""
    rng = __import__("random").Random(3)
    prompts = [[rng.randrange(3, 500) for _ in range(100)] for _ in range(6)]  # 6 full blocks and a bit each
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    want = [o.token_ids for o in uncached.generate(prompts, params)]
    per_block = None
    for tier in (True, False):
        engine_options = dict(num_kv_blocks=24, max_num_seqs=2)
        if tier:
            cfg = uncached.engine.model_config
            per_block = cfg.num_layers * 2 * 16 * cfg.num_kv_heads * cfg.head_dim * 4
            engine_options["kv_offload_bytes"] = 40 * per_block + per_block // 2  # 40 blocks, and a part
        llm = LLM(str(stories_path), **engine_options)
        blocks = llm.engine.blocks
        for p, w in zip(prompts, want):  # one at a time: each evicts what came before
            assert llm.generate([p], params)[0].token_ids == w
        before = dict(llm.engine.prefix_cache())
        assert [o.token_ids for o in llm.generate(prompts[:2], params)] == want[:2]
        after = llm.engine.prefix_cache()
        assert blocks.counters.evictions > 0
        if tier:
            assert after["offload_hits"] - before["offload_hits"] == 2 * 6 * 16  # every full block came back
            assert after["hits"] - before["hits"] == 2 * 6 * 16
            assert 0 < after["offloaded_blocks"] <= 40 == blocks.tier.slots
            assert blocks.num_free == blocks.num_blocks
            llm.engine.reset_prefix_cache()
            assert llm.engine.prefix_cache()["offloaded_blocks"] == 0 and blocks.num_cached == 0
            assert llm.generate([prompts[0]], params)[0].token_ids == want[0]
            assert llm.engine.prefix_cache()["offload_hits"] == after["offload_hits"]  # nothing came back
        else:
            assert blocks.tier is None and after["offload_hits"] == 0 and after["hits"] == before["hits"]


def test_the_second_tier_is_refused_where_it_cannot_work(stories_path):
    from baton.engine import ConfigError

    for options, message in [(dict(kv_offload_bytes=-1), "must be >= 0"),
                             (dict(kv_offload_bytes=1 << 20, enable_prefix_caching=False), "prefix caching"),
                             (dict(kv_offload_bytes=1 << 20, tensor_parallel_size=2), "one rank"),
                             (dict(kv_offload_bytes=10), "hold no block")]:
        with pytest.raises(ConfigError, match=message) as e:
            LLM(str(stories_path), **options)
        assert e.value.field == "kv_offload_bytes"


def test_tensor_parallel_with_the_cache_is_exact(stories_path, uncached):
    with LLM(str(stories_path), tensor_parallel_size=2) as cached:
        prompts = _prompts(cached)
        want = [o.token_ids for o in uncached.generate(prompts, GREEDY)]
        for _ in range(2):
            assert [o.token_ids for o in cached.generate(prompts, GREEDY)] == want
        assert cached.engine.blocks.counters.hits > 0


def test_a_cluster_caches_prompts_on_both_nodes_and_reports_it(stories_path, uncached, tmp_path):
    """1P1D: the second time a prompt comes, the prefill node finds its blocks cached (its hits rise by them);
    the decode node keeps the finished requests' blocks (prompt and generated) named, and holds them for the
    prompts that start with them, so only the other blocks' K/V cross. Token for token the
    uncached engine's; afterwards no request holds a block (cached ones count as free), and the node metrics
    and GetStats say what was cached."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from baton.router.client import BatonClient
    from cluster_harness import BatonUp
    from test_prefix_transfer import block_bytes, held_blocks

    prompts = _prompts(uncached)
    want = [o.token_ids for o in uncached.generate(prompts, GREEDY)]
    # Every prompt goes through the prefill node (a decode node holding most of one would compute it itself).
    with BatonUp(tmp_path, "--model", str(stories_path), "--prefill", "1", "--decode", "1",
                 "--max-local-prefill-tokens", "0") as up:
        [prefill], [decode] = up.nodes("prefill"), up.nodes("decode")
        with BatonClient(up.address, timeout=60) as client:
            first = [client.complete(p, max_tokens=24, temperature=0, ignore_eos=True).token_ids for p in prompts]
            before = up.stats(prefill).prefix_cache
            again = [client.complete(p, max_tokens=24, temperature=0, ignore_eos=True).token_ids for p in prompts]
        assert first == want and again == want
        after = up.stats(prefill).prefix_cache
        # Every prompt's full blocks but the one holding its last token were cached from the first round.
        assert after.hits - before.hits == sum((len(p) - 1) // 16 * 16 for p in prompts)
        assert after.queries - before.queries == sum(map(len, prompts))
        up.wait_until(lambda: all(s.free_blocks == s.total_blocks and not s.running
                                  for s in map(up.stats, (prefill, decode))), 10)
        assert up.stats(decode).prefix_cache.cached_blocks > 0
        # The decode node held each prompt's blocks it had computed before (prompt and generated, of every
        # earlier request): the prefill node sent the others' K/V alone, to the byte.
        computed, blocks = [], 0
        for prompt, tokens in zip(prompts * 2, want * 2):
            blocks += -(-len(prompt) // 16) - held_blocks(computed, prompt)
            computed.append(prompt + tokens[:-1])
        assert blocks < 2 * sum(-(-len(p) // 16) for p in prompts)
        assert up.stats(decode).kv_bytes_received == up.stats(prefill).kv_bytes_sent == blocks * block_bytes(
            uncached.engine)
        with urllib.request.urlopen(f"http://{prefill.metrics_address}/metrics", timeout=10) as reply:
            samples = {s.name: s.value for f in text_string_to_metric_families(reply.read().decode())
                       for s in f.samples}
        assert samples["baton_prefix_cache_hits_total"] == after.hits
        assert samples["baton_prefix_cache_blocks"] == after.cached_blocks > 0
