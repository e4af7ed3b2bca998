"""The whole cluster as users run it: `baton up` (real etcd, real node processes, gRPC on loopback), driven
through the client module. Outputs are checked against the offline engine, which test_stories.py checks
against transformers token for token."""

from __future__ import annotations

import asyncio
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest

from baton.engine import SamplingParams
from baton.router.client import (
    AsyncBatonClient, BatonClient, DeadlineExceeded, Delta, Finished, InvalidArgument, NotFound, Unavailable,
)

from cluster_harness import BatonUp, cluster_pids

PROMPTS = [
    "Once upon a time",
    "Lily wanted to play with the big red ball, but",
    "The little dog",
    "One day, Tom and his mom went to the store to buy some food. They saw",
]


def expected_greedy(llm, prompt: str, max_tokens: int, **kw):
    return llm.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0, **kw))[0]


def kv_bytes(prompt_len: int, cfg, block_size: int = 16) -> int:
    """What the prompt's blocks hold: every layer's K and V of every block the prompt fills (float32)."""
    blocks = -(-prompt_len // block_size)
    return cfg.num_layers * blocks * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * 4


@pytest.fixture(scope="module")
def one_one(stories_path, tmp_path_factory):
    # Conditional disaggregation on (it is off by default): short rests of cached prompts are computed locally.
    with BatonUp(tmp_path_factory.mktemp("up11"), "--model", str(stories_path), "--max-local-prefill-tokens",
                 "256") as up:
        yield up
    assert not up.hung and up.leftovers == [] and up.returncode == 0


def test_greedy_through_the_cluster_matches_offline(one_one, stories_llm):
    with BatonClient(one_one.address, timeout=60) as client:
        for prompt in PROMPTS:
            got = client.complete(prompt, max_tokens=128, temperature=0, logprobs=True)
            want = expected_greedy(stories_llm, prompt, 128)
            assert got.token_ids == want.token_ids, prompt
            assert got.text == want.text
            assert got.finished.finish_reason == want.finish_reason.value
            assert got.finished.prompt_tokens == len(want.prompt_token_ids)
            assert got.finished.completion_tokens == len(want.token_ids)
            assert got.finished.prefill_node == "prefill-0" and got.finished.decode_node == "decode-0"
            assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)


def test_seeded_sampling_through_the_cluster_matches_offline(one_one, stories_llm):
    params = dict(max_tokens=50, temperature=0.8, top_p=0.95, top_k=40, seed=1234)
    want = stories_llm.generate([PROMPTS[0]], SamplingParams(**params))[0]
    with BatonClient(one_one.address, timeout=60) as client:
        assert client.complete(PROMPTS[0], **params).token_ids == want.token_ids


def test_stream_carries_indices_and_first_token_arrives_alone(one_one):
    with BatonClient(one_one.address, timeout=60) as client:
        items = list(client.generate([1, 403, 407, 261, 378], max_tokens=20, temperature=0, ignore_eos=True))
    deltas = [i for i in items if isinstance(i, Delta)]
    assert isinstance(items[-1], Finished) and items[-1].finish_reason == "length"
    assert deltas[0].index == 0 and deltas[0].token_ids and len(deltas[0].token_ids) == 1
    assert [d.index for d in deltas] == [sum(len(x.token_ids) for x in deltas[:i]) for i in range(len(deltas))]
    assert sum(len(d.token_ids) for d in deltas) == 20
    assert items[-1].ttft_ms > 0 and items[-1].e2e_ms >= items[-1].ttft_ms


def test_kv_bytes_received_match_the_prompt_blocks_and_blocks_come_back(one_one, stories_llm):
    """A prompt no other test sends moves whole; sent again, the decode node holds all its blocks but the last
    one's (prefix caching) and computes that one itself (conditional disaggregation): the prefill node does
    nothing, nothing moves, and the tokens are the same."""
    [decode], [prefill] = one_one.nodes("decode"), one_one.nodes("prefill")
    cfg = stories_llm.engine.model_config
    prompt = "A purple kite flew over the quiet river while the old baker sang to his three cats"
    n = len(stories_llm.tokenizer.encode(prompt))
    assert n > 32
    moved, served, tokens = [], [], []
    with BatonClient(one_one.address, timeout=60) as client:
        for _ in range(2):
            before = one_one.stats(decode).kv_bytes_received, one_one.stats(prefill).requests_served
            tokens.append(client.complete(prompt, max_tokens=5, temperature=0).token_ids)
            moved.append(one_one.stats(decode).kv_bytes_received - before[0])
            served.append(one_one.stats(prefill).requests_served - before[1])
    assert moved == [kv_bytes(n, cfg), 0] and served == [1, 0]
    assert tokens[0] == tokens[1] == stories_llm.generate([prompt], SamplingParams(max_tokens=5, temperature=0))[
        0].token_ids
    after = one_one.stats(decode)
    assert after.free_blocks == after.total_blocks and after.reserved == 0


def test_every_invalid_field_gets_its_status(one_one):
    long_prompt = [5] * 600
    cases = [
        (dict(prompt=""), InvalidArgument, "prompt"),
        (dict(prompt=[]), InvalidArgument, "prompt"),
        (dict(prompt=[1, 100000]), InvalidArgument, "prompt"),
        (dict(prompt=long_prompt), InvalidArgument, "prompt"),
        (dict(max_tokens=0), InvalidArgument, "max_tokens"),
        (dict(max_tokens=-3), InvalidArgument, "max_tokens"),
        (dict(temperature=-1.0), InvalidArgument, "temperature"),
        (dict(top_p=0.0), InvalidArgument, "top_p"),
        (dict(top_p=1.5), InvalidArgument, "top_p"),
        (dict(top_k=-1), InvalidArgument, "top_k"),
        (dict(seed=-1), InvalidArgument, "seed"),
        (dict(stop=[""]), InvalidArgument, "stop"),
        (dict(stop_token_ids=[-1]), InvalidArgument, "stop_token_ids"),
        (dict(request_id="x" * 300), InvalidArgument, "request_id"),
        (dict(max_tokens=100000), InvalidArgument, "max_tokens"),  # can never fit the decode node's cache
        (dict(model="gpt-5"), NotFound, "model"),
    ]
    with BatonClient(one_one.address, timeout=30) as client:
        for kw, error, field in cases:
            prompt = kw.pop("prompt", "Once upon a time")
            with pytest.raises(error) as e:
                client.complete(prompt, **kw)
            assert field in e.value.details, (kw, e.value.details)
            if error is InvalidArgument:
                assert e.value.field == field
        # The cluster still serves, and nothing was left reserved.
        assert client.complete("Once", max_tokens=3, temperature=0).finished.completion_tokens >= 1
    stats = one_one.stats(one_one.nodes("decode")[0])
    assert stats.free_blocks == stats.total_blocks and stats.reserved == 0


def test_client_cancel_frees_the_decode_blocks(one_one):
    decode = one_one.nodes("decode")[0]

    async def cancel_mid_stream() -> None:
        async with AsyncBatonClient(one_one.address, timeout=60) as client:
            stream = client.generate("Once upon a time", max_tokens=480, temperature=0, ignore_eos=True)
            seen = 0
            async for item in stream:
                seen += len(item.token_ids)
                if seen >= 10:
                    break
            await stream.aclose()

    asyncio.run(cancel_mid_stream())
    # The cancel reaches the decode node at once; the bound is generous for a loaded machine (well below the
    # 30 s lease that would free the blocks anyway).
    one_one.wait_until(lambda: (s := one_one.stats(decode)).free_blocks == s.total_blocks and not s.running,
                       timeout=10.0)


def test_deadline_mid_stream_frees_the_decode_blocks(one_one):
    decode = one_one.nodes("decode")[0]
    with BatonClient(one_one.address) as client:
        seen = []
        with pytest.raises(DeadlineExceeded):
            for item in client.generate("Once upon a time", max_tokens=480, temperature=0, ignore_eos=True,
                                        timeout=0.3):
                seen.append(item)
    assert seen, "the deadline should hit mid-stream, after some tokens"
    one_one.wait_until(lambda: (s := one_one.stats(decode)).free_blocks == s.total_blocks and not s.running,
                       timeout=10.0)


def test_two_by_two_serves_sixteen_concurrent_requests(stories_path, stories_llm, tmp_path):
    prompts = [f"{PROMPTS[i % 4]}" + " and" * (i // 4) for i in range(16)]
    with BatonUp(tmp_path, "--model", str(stories_path), "--prefill", "2", "--decode", "2") as up:
        with BatonClient(up.address, timeout=120) as client, ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda p: client.complete(p, max_tokens=48, temperature=0), prompts))
        for prompt, got in zip(prompts, results):
            want = expected_greedy(stories_llm, prompt, 48)
            assert got.token_ids == want.token_ids, prompt
        assert {r.finished.decode_node for r in results} == {"decode-0", "decode-1"}
        assert {r.finished.prefill_node for r in results} == {"prefill-0", "prefill-1"}
        for node in up.nodes("decode"):
            s = up.stats(node)
            assert s.free_blocks == s.total_blocks and s.reserved == 0
    assert not up.hung and up.leftovers == [] and up.returncode == 0


def test_sigkilled_decode_node_leaves_membership_and_others_take_over(stories_path, stories_llm, tmp_path):
    with BatonUp(tmp_path, "--model", str(stories_path), "--prefill", "1", "--decode", "2") as up:
        assert len(up.nodes("decode")) == 2
        victim = up.node_pid("decode-1")
        # Gone within the membership lease TTL (3 s) + 1 s of the SIGKILL, as one watcher sees it.
        up.departure(lambda: os.kill(victim, signal.SIGKILL),
                     lambda watcher: "decode-1" not in {n.node_id for n in watcher.nodes("decode")},
                     within=3.0 + 1.0, what="decode-1")
        want = expected_greedy(stories_llm, PROMPTS[0], 30)
        with BatonClient(up.address, timeout=60) as client:
            for _ in range(4):
                got = client.complete(PROMPTS[0], max_tokens=30, temperature=0)
                assert got.token_ids == want.token_ids and got.finished.decode_node == "decode-0"
            os.kill(up.node_pid("decode-0"), signal.SIGKILL)
            up.wait_until(lambda: not up.nodes("decode"), timeout=10, interval=0.1)
            with pytest.raises(Unavailable) as e:
                client.complete(PROMPTS[0], max_tokens=5)
            assert "decode" in e.value.details


def test_colocated_mode(stories_path, stories_llm, tmp_path):
    with BatonUp(tmp_path, "--model", str(stories_path), "--prefill", "0", "--decode", "0", "--colocated", "1") as up:
        with BatonClient(up.address, timeout=60) as client:
            got = client.complete(PROMPTS[1], max_tokens=64, temperature=0)
            assert got.token_ids == expected_greedy(stories_llm, PROMPTS[1], 64).token_ids
            assert got.finished.decode_node == "colocated-0"
            [model] = client.list_models()
            assert model.id == "stories260K" and model.max_model_len == 512
            assert client.tokenize("Once upon a time") == stories_llm.tokenizer.encode("Once upon a time")


def test_baton_up_stops_everything_on_repeated_sigterm(stories_path, tmp_path):
    up = BatonUp(tmp_path, "--model", str(stories_path), "--prefill", "0", "--decode", "0", "--colocated", "1")
    with up:
        etcd_port = up.etcd.rsplit(":", 1)[1]
        up.proc.send_signal(signal.SIGTERM)
        up.proc.send_signal(signal.SIGTERM)  # impatient operators press twice
        assert up.proc.wait(30) == 0
    assert not up.hung and up.leftovers == [] and cluster_pids(up.cluster) == []
    assert cluster_pids(f"127.0.0.1:{etcd_port}") == []  # the private etcd is gone too
