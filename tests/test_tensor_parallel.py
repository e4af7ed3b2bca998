"""Tensor-parallel engines: one process per rank (real gloo groups on the CPU), rank 0 scheduling and
sampling, against transformers and against the same engine with one rank."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from baton.engine import LLM, ConfigError, SamplingParams

transformers = pytest.importorskip("transformers")

from test_architectures import PROMPTS as RANDOM_PROMPTS, Variant, hf_greedy, load_hf, write_checkpoint  # noqa: E402
from test_stories import PROMPTS, hf_greedy as hf_stories_greedy  # noqa: E402

# 6 query heads on 2 KV heads with q/k/v biases (Qwen2), and Llama with 8 on 2 plus attention and MLP biases
# (row-parallel biases are added once) and a vocabulary the ranks split unevenly.
QWEN = Variant("Qwen2ForCausalLM", dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=96,
                                        intermediate_size=161))
LLAMA = Variant("LlamaForCausalLM", dict(num_attention_heads=8, num_key_value_heads=2, attention_bias=True,
                                         mlp_bias=True, vocab_size=515))


def _alive(pids: list[int]) -> list[int]:
    """Those of `pids` still running (a reaped process has no /proc entry; a zombie is not running)."""
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split()[2] != "Z":
                    alive.append(pid)
        except OSError:
            pass
    return alive


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _children_of(parent: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                found.append(int(entry))
    return found


def _matrix_elements(llm: LLM) -> int:
    """Elements of the model's projection matrices and embedding (packed CPU weights included)."""
    model = llm.engine.runner.model
    linear = sum(m.in_features * m.out_features for m in model.modules() if hasattr(m, "in_features"))
    return linear + model.embed_tokens.weight.numel()


def _worker_pids(llm: LLM) -> list[int]:
    return [p.pid for p in llm.engine._workers.procs]


def test_stories_with_two_ranks_matches_transformers_and_one_rank(stories_path, hf_stories, stories_llm):
    params = SamplingParams(max_tokens=64, temperature=0)
    with LLM(str(stories_path), tensor_parallel_size=2) as llm:
        workers = _worker_pids(llm)
        assert llm.engine.runner.model.shard.num_heads == 4 and llm.engine.kv_spec.num_kv_heads == 2
        # Rank 0 holds half of every matrix (its heads, its MLP and vocabulary slices): never the whole model.
        assert _matrix_elements(llm) * 2 == _matrix_elements(stories_llm)
        outs = llm.generate(PROMPTS, params)
        seeded = SamplingParams(max_tokens=40, temperature=0.9, top_p=0.95, seed=11)
        sampled = llm.generate(PROMPTS[:2], seeded)
    eos = set(hf_stories.generation_config.eos_token_id)
    for prompt, out in zip(PROMPTS, outs):
        want = hf_stories_greedy(hf_stories, out.prompt_token_ids, 64)
        if any(t in eos for t in want):
            want = want[: next(i for i, t in enumerate(want) if t in eos) + 1]
        assert out.token_ids == want, prompt
    assert [o.token_ids for o in sampled] == [o.token_ids for o in stories_llm.generate(PROMPTS[:2], seeded)]
    assert len(workers) == 1 and _alive(workers) == []  # the other rank is gone with the engine


@pytest.mark.parametrize("variant, tp", [(QWEN, 2), (LLAMA, 2), (LLAMA, 4)], ids=["qwen2-6q2kv-tp2",
                                                                                  "llama-biases-tp2",
                                                                                  "llama-kv-replicated-tp4"])
def test_random_checkpoints_with_several_ranks_match_transformers(variant, tp, tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt", variant)
    hf = load_hf(folder)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    with LLM(str(folder), tensor_parallel_size=tp, block_size=8, enable_chunked_prefill=True,
             max_num_batched_tokens=32, max_num_seqs=4) as llm:
        outs = llm.generate(RANDOM_PROMPTS, params)
    for prompt, out in zip(RANDOM_PROMPTS, outs):
        assert out.token_ids == hf_greedy(hf, prompt)[0]


def test_a_degree_the_model_cannot_take_is_refused_before_any_process_starts(tmp_path):
    folder = write_checkpoint(tmp_path / "qwen", QWEN)
    with pytest.raises(ConfigError, match="4 does not divide the model's 6 query heads") as e:
        LLM(str(folder), tensor_parallel_size=4)
    assert e.value.field == "tensor_parallel_size"


def test_a_dead_rank_fails_the_engine_instead_of_hanging(stories_path):
    llm = LLM(str(stories_path), tensor_parallel_size=2)
    try:
        [worker] = llm.engine._workers.procs
        pids = _worker_pids(llm)
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(timeout=10)
        with pytest.raises(RuntimeError):
            llm.generate(PROMPTS[0], SamplingParams(max_tokens=8, temperature=0))
    finally:
        llm.close()
    assert _alive(pids) == []


def test_a_colocated_node_with_two_ranks_serves_and_goes_down_whole_when_a_rank_dies(stories_path, stories_llm,
                                                                                     tmp_path):
    from baton.router.client import BatonClient

    from cluster_harness import BatonUp

    with BatonUp(tmp_path, "--model", str(stories_path), "--prefill", "0", "--decode", "0", "--colocated", "1",
                 "--tp", "2") as up:
        with BatonClient(up.address, timeout=60) as client:
            for prompt in PROMPTS[:3]:
                want = stories_llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0))[0]
                assert client.complete(prompt, max_tokens=40, temperature=0).token_ids == want.token_ids
        _rank_memory_is_reported(up, "colocated-0")
        kill_a_rank_mid_stream(up, "colocated-0", "colocated")
    assert not up.hung and up.leftovers == []


def _rank_memory_is_reported(up, node_id: str) -> None:
    """The node's metrics give its rank 1's resident memory, as /proc has it (within 10%: read apart)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    [info] = [n for n in up.nodes() if n.node_id == node_id]
    [rank1] = [pid for pid in _children_of(up.node_pid(node_id)) if b"spawn_main" in _cmdline(pid)]
    with urllib.request.urlopen(f"http://{info.metrics_address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    [reported] = [s.value for f in text_string_to_metric_families(text) for s in f.samples
                  if s.name == "baton_rank_resident_memory_bytes" and s.labels["rank"] == "1"]
    [kib] = [line.split()[1] for line in open(f"/proc/{rank1}/status") if line.startswith("VmRSS:")]
    assert abs(reported - (int(kib) << 10)) <= reported / 10


def kill_a_rank_mid_stream(up, node_id: str, role: str) -> None:
    """SIGKILLs rank 1 of `node_id` while a stream runs on it: the stream fails cleanly (it does not hang),
    the node leaves etcd within the membership TTL + 1 s, and none of its processes is left."""
    from baton.router.client import BatonClient, BatonError

    node = up.node_pid(node_id)
    [rank1] = [pid for pid in _children_of(node) if b"spawn_main" in _cmdline(pid)]
    with BatonClient(up.address, timeout=60) as client:
        stream = client.generate(PROMPTS[0], max_tokens=400, temperature=0, ignore_eos=True)
        next(stream)

        def kill_rank1_and_see_the_stream_fail() -> None:
            os.kill(rank1, signal.SIGKILL)
            with pytest.raises(BatonError) as e:
                for _ in stream:
                    pass
            assert e.value.code.name in ("UNAVAILABLE", "CANCELLED"), e.value

        # The node leaves etcd within the membership TTL (3 s) + 1 s of the SIGKILL, as one watcher sees it.
        up.departure(kill_rank1_and_see_the_stream_fail, lambda watcher: not watcher.nodes(role),
                     within=3.0 + 1.0, what=node_id)
    up.wait_until(lambda: _alive([node, rank1]) == [], timeout=15, interval=0.1)


def _host_rank(path: str, calls: int, result) -> None:
    from baton.engine.host_collectives import HostCollectives

    host = HostCollectives(1, 2, 1 << 16, path)
    total = 0.0
    for k in range(calls):
        x = torch.full((1 + k % 7, 33), float(k), dtype=torch.float32)
        host.all_reduce(x)
        total += float(x.sum())
        host.all_gather(torch.tensor([k, 100 + k]))
    result.put(total)


def test_shared_memory_collectives_sum_and_gather_across_processes_and_notice_a_dead_peer():
    import multiprocessing as mp

    from baton.engine.host_collectives import HostCollectives

    host = HostCollectives(0, 2, 1 << 16)
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    calls = 300  # many more than the two alternating slot sets: a slot reused too early would show
    peer = ctx.Process(target=_host_rank, args=(host.path, calls, result))
    peer.start()
    try:
        total = 0.0
        for k in range(calls):
            x = torch.full((1 + k % 7, 33), float(k) + 0.5, dtype=torch.float32)
            host.all_reduce(x)
            assert bool((x == 2 * k + 0.5).all()), k  # rank 1 sent k, rank 0 k + 0.5
            total += float(x.sum())
            assert [t.tolist() for t in host.all_gather(torch.tensor([-k, -100 - k]))] == [[-k, -100 - k], [k, 100 + k]]
        assert result.get(timeout=60) == total
    finally:
        peer.join(timeout=30)
    with pytest.raises(RuntimeError, match="rank 1 .* is gone"):
        host.all_reduce(torch.ones(4))  # the peer has exited: noticed, not waited for


def _group_rank(port: int, path: str, done) -> None:
    import datetime

    import torch.distributed as dist

    from baton.engine.host_collectives import HostCollectives
    from baton.engine.parallel import make_group

    store = dist.TCPStore("127.0.0.1", port, None, False, datetime.timedelta(seconds=60), wait_for_workers=False)
    group = make_group(1, 2, store, torch.device("cpu"), [3, 2], 60.0, HostCollectives(1, 2, 64, path))
    small, large = torch.full((4,), 2.0), torch.full((100,), 2.0)  # 16 bytes fit the slot, 400 do not
    group.all_reduce(small), group.all_reduce(large)
    done.put((small.tolist(), large.tolist(), group.gather_vocab(torch.tensor([[7.0, 8.0]])).tolist()))


def test_the_rank_group_takes_shared_memory_where_a_tensor_fits_and_gloo_where_it_does_not():
    import datetime
    import multiprocessing as mp

    import torch.distributed as dist

    from baton.engine.host_collectives import HostCollectives
    from baton.engine.parallel import make_group

    store = dist.TCPStore("127.0.0.1", 0, None, True, datetime.timedelta(seconds=60), wait_for_workers=False)
    host = HostCollectives(0, 2, 64)
    ctx = mp.get_context("spawn")
    done = ctx.Queue()
    peer = ctx.Process(target=_group_rank, args=(store.port, host.path, done))
    peer.start()
    try:
        group = make_group(0, 2, store, torch.device("cpu"), [3, 2], 60.0, host)
        small, large = torch.full((4,), 1.0), torch.full((100,), 1.0)
        group.all_reduce(small), group.all_reduce(large)
        logits = group.gather_vocab(torch.tensor([[4.0, 5.0, 6.0]]))  # vocabulary ranges of 3 and 2
        theirs = done.get(timeout=60)
    finally:
        peer.join(timeout=30)
    assert small.tolist() == [3.0] * 4 and large.tolist() == [3.0] * 100
    assert logits.tolist() == [[4.0, 5.0, 6.0, 7.0, 8.0]]
    assert theirs == ([3.0] * 4, [3.0] * 100, [[4.0, 5.0, 6.0, 7.0, 8.0]])


def test_a_prefill_node_writes_each_rank_of_a_two_rank_decode_node_its_heads(stories_path, stories_llm, tmp_path):
    """Prefill TP=1 -> decode TP=2 on one host (the same-device path through /dev/shm): each decode rank's pool
    gets exactly its KV heads of the prompt's blocks, and the tokens are the offline engine's."""
    from baton.router.client import BatonClient

    from cluster_harness import BatonUp

    with BatonUp(tmp_path, "--model", str(stories_path), "--kv-path", "shared", "--decode-tp", "2") as up:
        [decode], [prefill] = up.nodes("decode"), up.nodes("prefill")
        baseline = up.stats(decode).total_blocks
        with BatonClient(up.address, timeout=60) as client:
            for prompt in PROMPTS:
                want = stories_llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0))[0]
                got = client.complete(prompt, max_tokens=40, temperature=0)
                assert got.token_ids == want.token_ids, prompt
            seeded = dict(max_tokens=30, temperature=0.8, top_p=0.9, seed=5)
            want = stories_llm.generate([PROMPTS[1]], SamplingParams(**seeded))[0].token_ids
            assert client.complete(PROMPTS[1], **seeded).token_ids == want
        cfg = stories_llm.engine.model_config
        per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4  # every head once, float32
        prompts = [len(stories_llm.tokenizer.encode(p)) for p in PROMPTS] + [len(stories_llm.tokenizer.encode(PROMPTS[1]))]
        blocks = sum(-(-n // 16) for n in prompts)
        assert up.stats(prefill).kv_bytes_sent == up.stats(decode).kv_bytes_received == blocks * 16 * per_token
        up.wait_until(lambda: (s := up.stats(decode)).free_blocks == baseline and not s.running, timeout=10)
    assert not up.hung and up.leftovers == [] and up.returncode == 0
