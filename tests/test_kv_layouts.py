"""KV transfers between nodes of different tensor-parallel degrees over the pair channels (gloo here): each
decode rank receives exactly its KV heads, rank to rank from the prefill ranks that hold them, and the tokens
are the offline engine's."""

from __future__ import annotations

import pytest

from cluster_harness import BatonUp
from test_prefix_transfer import held_blocks
from test_stories import PROMPTS

from baton.engine import LLM, SamplingParams
from baton.engine.parallel import kv_routes, shard
from baton.router.client import BatonClient

transformers = pytest.importorskip("transformers")

from test_architectures import Variant, write_checkpoint  # noqa: E402
from test_tensor_parallel import kill_a_rank_mid_stream  # noqa: E402

# 8 query heads on 2 KV heads: at TP=4 each KV head is held by two prefill ranks (replicated). Qwen2: 6 query
# heads on 2 KV heads, q/k/v biases.
LLAMA = Variant("LlamaForCausalLM", dict(num_attention_heads=8, num_key_value_heads=2, vocab_size=515))
QWEN = Variant("Qwen2ForCausalLM", dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=96,
                                        intermediate_size=161))


def expected_rank_bytes(cfg, prefill_tp: int, decode_tp: int, blocks: int, block_size: int, dtype_bytes: int = 4
                        ) -> tuple[list[int], list[int]]:
    """What each prefill rank sends and each decode rank receives for `blocks` blocks: its routes' heads,
    every layer, K and V."""
    per_head = blocks * block_size * cfg.num_layers * 2 * cfg.head_dim * dtype_bytes
    sent, received = [0] * prefill_tp, [0] * decode_tp
    for route in kv_routes(cfg, prefill_tp, decode_tp):
        sent[route.src] += (route.head_end - route.head_start) * per_head
        received[route.dst] += (route.head_end - route.head_start) * per_head
    return sent, received


@pytest.mark.parametrize("prefill_tp, decode_tp", [(1, 2), (2, 1), (2, 2)], ids=["tp1-to-tp2", "tp2-to-tp1",
                                                                                 "tp2-to-tp2"])
def test_kv_goes_rank_to_rank_between_any_two_degrees(stories_path, stories_llm, tmp_path, prefill_tp, decode_tp):
    with BatonUp(tmp_path, "--model", str(stories_path), "--kv-path", "pair", "--prefill-tp", str(prefill_tp),
                 "--decode-tp", str(decode_tp), "--max-local-prefill-tokens", "0") as up:
        [decode], [prefill] = up.nodes("decode"), up.nodes("prefill")
        baseline = up.stats(decode).total_blocks
        tokenizer = stories_llm.tokenizer
        computed: list[list[int]] = []  # what the decode node computed, request by request
        prompts: list[list[int]] = []  # what the prefill node computed
        blocks = pulled = 0  # the blocks that crossed, and those read back from the decode node (the pull path)
        held: list[int] = []  # of each prompt, the blocks the decode node held already
        with BatonClient(up.address, timeout=60) as client:
            def complete(prompt: list[int], **options) -> list[int]:
                nonlocal blocks, pulled
                want = stories_llm.generate([prompt], SamplingParams(**options))[0].token_ids
                got = client.complete(prompt, **options).token_ids
                assert got == want, prompt
                # Each rank of the decode node holds its heads of the blocks it cached: only the rest moves.
                held.append(held_blocks(computed, prompt))
                blocks += -(-len(prompt) // 16) - held[-1]
                # The prefill node lacks the blocks the decode node computed: it reads them back, rank to rank.
                pulled += held[-1] - held_blocks(prompts, prompt)
                computed.append(prompt + got[:-1])
                prompts.append(prompt)
                return got

            for prompt in PROMPTS:
                complete(tokenizer.encode(prompt), max_tokens=40, temperature=0)
            complete(tokenizer.encode(PROMPTS[1]), max_tokens=30, temperature=0.8, top_p=0.9, seed=5)
            # A conversation's next turn: the decode node holds the first turn's blocks.
            first = tokenizer.encode(PROMPTS[3])
            complete(first + computed[3][len(first):] + tokenizer.encode(" Then"), max_tokens=20, temperature=0)
        assert held[-1] >= 3 and pulled >= 1
        cfg = stories_llm.engine.model_config
        back = pulled * 16 * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4
        assert up.stats(prefill).kv_bytes_pulled == up.stats(decode).kv_bytes_pulled == back
        sent, received = expected_rank_bytes(cfg, prefill_tp, decode_tp, blocks, 16)
        assert list(up.stats(prefill).rank_kv_bytes) == sent
        assert list(up.stats(decode).rank_kv_bytes) == received
        assert up.stats(decode).kv_bytes_received == up.stats(prefill).kv_bytes_sent == sum(sent)
        up.wait_until(lambda: (s := up.stats(decode)).free_blocks == baseline and not s.running, timeout=10)
    assert not up.hung and up.leftovers == [] and up.returncode == 0


@pytest.mark.parametrize("variant, prefill_tp, decode_tp", [(LLAMA, 4, 2), (QWEN, 2, 1)],
                         ids=["llama-replicated-tp4-to-tp2", "qwen2-biases-tp2-to-tp1"])
def test_random_checkpoints_through_clusters_of_different_degrees(tmp_path, variant, prefill_tp, decode_tp):
    """Llama, 8 query heads on 2 KV heads, prefill TP=4 (ranks 0 and 1 hold KV head 0, ranks 2 and 3 head 1)
    -> decode TP=2: ranks 0 and 2 send, ranks 1 and 3 send nothing. Qwen2 (biases) TP=2 -> TP=1: the decode
    rank takes half its heads from each prefill rank. Both give one rank's greedy tokens."""
    folder = write_checkpoint(tmp_path / "ckpt", variant)
    prompts = [[(7 * i + 3) % 500 + 1 for i in range(n)] for n in (5, 23, 40)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    with LLM(str(folder), block_size=8) as llm:  # one rank: itself token-exact against transformers elsewhere
        wants = [o.token_ids for o in llm.generate(prompts, params)]
        cfg = llm.engine.model_config
    with BatonUp(tmp_path / "logs", "--model", str(folder), "--kv-path", "pair", "--prefill-tp", str(prefill_tp),
                 "--decode-tp", str(decode_tp), "--block-size", "8", "--max-local-prefill-tokens", "0") as up:
        [decode], [prefill] = up.nodes("decode"), up.nodes("prefill")
        blocks, computed = 0, []
        with BatonClient(up.address, timeout=120) as client:
            for prompt, want in zip(prompts, wants):
                assert client.complete(prompt, max_tokens=12, temperature=0, ignore_eos=True).token_ids == want
                # Each prompt extends the one before: the decode node holds its blocks, the rest moves.
                blocks += -(-len(prompt) // 8) - held_blocks(computed, prompt, 8)
                computed.append(prompt + want[:-1])
        assert blocks < sum(-(-len(p) // 8) for p in prompts)
        sent, received = expected_rank_bytes(cfg, prefill_tp, decode_tp, blocks, 8)
        if prefill_tp == 4:
            assert sent[1] == sent[3] == 0 and sent[0] == sent[2] > 0
        assert list(up.stats(prefill).rank_kv_bytes) == sent
        assert list(up.stats(decode).rank_kv_bytes) == received
    assert not up.hung and up.leftovers == [] and up.returncode == 0


def test_kv_routes_cover_every_decode_head_once(tmp_path):
    from baton.engine.config import ModelConfig

    folder = write_checkpoint(tmp_path / "ckpt", LLAMA)
    cfg = ModelConfig.from_folder(folder)
    for p in (1, 2, 4, 8):
        for d in (1, 2, 4, 8):
            routes = kv_routes(cfg, p, d)
            for dst in range(d):
                mine = shard(cfg, d, dst)
                heads = sorted(h for r in routes if r.dst == dst for h in range(r.head_start, r.head_end))
                assert heads == list(range(mine.kv_head_start, mine.kv_head_start + mine.num_kv_heads))
            for r in routes:  # each route's sender holds the heads it sends
                src = shard(cfg, p, r.src)
                assert src.kv_head_start <= r.head_start < r.head_end <= src.kv_head_start + src.num_kv_heads


def test_a_decode_rank_killed_mid_stream_takes_its_node_down_and_fails_its_streams_cleanly(stories_path, tmp_path):
    with BatonUp(tmp_path, "--model", str(stories_path), "--kv-path", "pair", "--decode-tp", "2") as up:
        [prefill] = up.nodes("prefill")
        baseline = up.stats(prefill).free_blocks
        kill_a_rank_mid_stream(up, "decode-0", "decode")
        assert up.stats(prefill).free_blocks == baseline  # the prefill node holds nothing for the stream
    assert not up.hung and up.leftovers == []


def test_a_rank_whose_pipe_closes_fails_the_calls_waiting_on_it_and_every_later_one():
    """Rank 0's link to a rank that died: its waiting route calls fail at once (not at a timeout), and so do
    new ones; answers are matched by number, whatever order they come in."""
    import asyncio
    import multiprocessing as mp

    from baton.kvtransfer.channel import KVTransferError
    from baton.kvtransfer.ranks import EndRoutes, RankLink

    mine, theirs = mp.Pipe()

    async def run() -> None:
        link = RankLink([mine])
        first, second = link.call(1, EndRoutes("a", 1.0)), link.call(1, EndRoutes("b", 1.0))
        (_, c1), (n2, c2) = theirs.recv(), theirs.recv()
        assert (c1, c2) == (EndRoutes("a", 1.0), EndRoutes("b", 1.0))
        theirs.send((n2, "ok", 22))  # the second answered first
        assert await second == 22 and not first.done()
        waiting = link.call(1, EndRoutes("c", 1.0))
        theirs.recv()
        theirs.close()  # the rank dies with two calls unanswered
        for call in (first, waiting):
            with pytest.raises(KVTransferError, match="rank 1 is gone"):
                await asyncio.wait_for(call, 10)
        with pytest.raises(KVTransferError, match="rank 1 is gone"):
            await link.call(1, EndRoutes("d", 1.0))

    asyncio.run(run())
