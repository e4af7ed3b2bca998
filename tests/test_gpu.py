"""The engine on a CUDA GPU (marked `gpu`: skipped, visibly, without one; `make gpu-check` runs them).

Parity with transformers in float32 (exact tokens) and bfloat16 (logits within the measured half-precision
bound), with the Triton kernels (CUDA graphs on and off) and with the torch path; seeded sampling that does
not depend on the batch nor on the device; and a cluster on the GPU serving stories260K token for token.
The kernels themselves are checked on the GPU by tests/test_kernels.py, which runs there in bf16 too.
"""

from __future__ import annotations

import pytest
import torch

from baton.engine import LLM, SamplingParams

pytestmark = pytest.mark.gpu
transformers = pytest.importorskip("transformers")

from test_architectures import (  # noqa: E402
    HALF_TOL, PROMPTS as RANDOM_PROMPTS, VARIANTS, baton_last_logits, hf_greedy, load_hf, write_checkpoint,
)
from test_stories import PROMPTS, hf_greedy as hf_stories_greedy  # noqa: E402

KERNELS = [dict(kernels="triton"), dict(kernels="triton", enforce_eager=True), dict(kernels="torch")]
KERNEL_IDS = ["triton-graphs", "triton-eager", "torch"]


def _truncated_at_eos(ids: list[int], eos: set[int]) -> list[int]:
    return ids[: next(i for i, t in enumerate(ids) if t in eos) + 1] if any(t in eos for t in ids) else ids


@pytest.mark.parametrize("options", KERNELS, ids=KERNEL_IDS)
def test_stories_float32_on_cuda_matches_transformers(stories_path, hf_stories, options):
    llm = LLM(str(stories_path), device="cuda", **options)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=128, temperature=0))
    eos = set(hf_stories.generation_config.eos_token_id)
    for prompt, out in zip(PROMPTS, outs):
        want = _truncated_at_eos(hf_stories_greedy(hf_stories, out.prompt_token_ids, 128), eos)
        assert out.token_ids == want, prompt


@pytest.mark.parametrize("variant", ["llama-head-dim", "llama3-rope", "qwen2-tied", "mistral"])
@pytest.mark.parametrize("block_size", [8, 32])
def test_variants_float32_chunked_on_cuda_match_transformers(variant, block_size, tmp_path):
    folder = write_checkpoint(tmp_path / variant, VARIANTS[variant])
    hf = load_hf(folder)
    llm = LLM(str(folder), device="cuda", block_size=block_size, enable_chunked_prefill=True,
              max_num_batched_tokens=16, max_num_seqs=4)
    outs = llm.generate(RANDOM_PROMPTS, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    for prompt, out in zip(RANDOM_PROMPTS, outs):
        assert out.token_ids == hf_greedy(hf, prompt)[0]


@pytest.mark.parametrize("variant", ["llama-gqa4-tied", "qwen2-tied"])
@pytest.mark.parametrize("split", ["prefill", "chunked", "decode"])
def test_bfloat16_on_cuda_last_logits_within_half_precision_bound(variant, split, tmp_path):
    folder = write_checkpoint(tmp_path / variant, VARIANTS[variant])
    hf = load_hf(folder, torch.bfloat16).cuda()
    llm = LLM(str(folder), device="cuda", dtype="bfloat16")
    for prompt in RANDOM_PROMPTS:
        with torch.inference_mode():
            want = hf(torch.tensor([prompt], device="cuda")).logits[0, -1].float()
        got = baton_last_logits(llm, prompt, split)
        assert (got - want).abs().max().item() <= HALF_TOL["bfloat16"]


def test_seeded_sampling_on_cuda_ignores_the_batch_and_matches_the_cpu(stories_path, stories_llm):
    params = SamplingParams(max_tokens=40, temperature=0.8, top_p=0.95, top_k=40, seed=77)
    gpu = LLM(str(stories_path), device="cuda")
    alone = gpu.generate([PROMPTS[0]], params)[0].token_ids
    crowd = gpu.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]],
                         [SamplingParams(max_tokens=30, temperature=1.0, seed=5), params,
                          SamplingParams(max_tokens=50, temperature=0)])[1].token_ids
    assert alone == crowd
    assert alone == stories_llm.generate([PROMPTS[0]], params)[0].token_ids


def test_cuda_graphs_on_and_off_give_the_same_tokens(stories_path):
    """Batches of 1, 3, 5 and 9 (padded to 1, 4, 8 and 16), greedy and seeded."""
    graphs = LLM(str(stories_path), device="cuda", kernels="triton", max_num_seqs=16)
    eager = LLM(str(stories_path), device="cuda", kernels="triton", enforce_eager=True, max_num_seqs=16)
    assert graphs.engine.runner.graphs is not None and eager.engine.runner.graphs is None
    for n in (1, 3, 5, 9):
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
        params = [SamplingParams(max_tokens=40, temperature=0 if i % 2 else 0.9, seed=i) for i in range(n)]
        assert ([o.token_ids for o in graphs.generate(prompts, params)]
                == [o.token_ids for o in eager.generate(prompts, params)])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="tensor parallelism on GPUs needs two of them")
def test_two_ranks_on_two_gpus_give_one_ranks_tokens(stories_path, stories_llm):
    """NCCL between the ranks (the lent machine has one GPU: this runs only where there are two)."""
    params = [SamplingParams(max_tokens=64, temperature=0), SamplingParams(max_tokens=40, temperature=0.9, seed=3)]
    with LLM(str(stories_path), device="cuda", tensor_parallel_size=2) as llm:
        got = [o.token_ids for o in llm.generate(PROMPTS[:2], params)]
    assert got == [o.token_ids for o in stories_llm.generate(PROMPTS[:2], params)]


def test_colocated_cluster_on_the_gpu_serves_stories_token_for_token(stories_path, stories_llm, tmp_path):
    from baton.router.client import BatonClient
    from cluster_harness import BatonUp

    with BatonUp(tmp_path, "--model", str(stories_path), "--colocated", "1", "--device", "cuda") as up:
        with BatonClient(up.address, timeout=120) as client:
            for prompt in PROMPTS:
                want = stories_llm.generate([prompt], SamplingParams(max_tokens=64, temperature=0))[0]
                assert client.complete(prompt, max_tokens=64, temperature=0).token_ids == want.token_ids
    assert not up.hung and up.leftovers == [] and up.returncode == 0


def test_one_prefill_one_decode_on_one_gpu_through_the_same_device_path(stories_path, stories_llm, tmp_path):
    """NCCL refuses two ranks on one GPU: the prefill node writes into the decode node's pool through CUDA IPC."""
    from baton.router.client import BatonClient
    from cluster_harness import BatonUp

    with BatonUp(tmp_path, "--model", str(stories_path), "--device", "cuda") as up:
        [decode], [prefill] = up.nodes("decode"), up.nodes("prefill")
        with BatonClient(up.address, timeout=120) as client:
            for prompt in PROMPTS:
                want = stories_llm.generate([prompt], SamplingParams(max_tokens=64, temperature=0))[0]
                assert client.complete(prompt, max_tokens=64, temperature=0).token_ids == want.token_ids
        assert up.stats(prefill).kv_bytes_sent == up.stats(decode).kv_bytes_received > 0
        logs = "".join(p.read_text() for p in tmp_path.glob("*.log"))
        assert "kv path to decode-0: shared memory on cuda:" in logs
    assert not up.hung and up.leftovers == [] and up.returncode == 0


def _ipc_writer(desc, done) -> None:
    from baton.kvtransfer.shared import SharedWriter, open_shared

    target = open_shared(desc, "cuda")
    local = torch.arange(4 * 2 * 8 * 2 * 16, dtype=torch.float32, device="cuda").view(4, 2, 8, 2, 16)
    writer = SharedWriter([(target, 0, 2)], [3, 1], 2)
    writer.begin([0, 2], local)
    for layer in range(2):
        writer.send_layer(layer, local + layer)
    done.put(writer.wait(10.0))


def test_another_process_writes_into_a_cuda_pool_through_ipc():
    import multiprocessing as mp

    from baton.kvtransfer.shared import share

    storage = torch.full((2, 4, 2, 8, 2, 16), -1.0, device="cuda")
    ctx = mp.get_context("spawn")
    done = ctx.Queue()
    proc = ctx.Process(target=_ipc_writer, args=(share(storage), done))
    proc.start()
    try:
        assert done.get(timeout=120) == 2 * 2 * 2 * 8 * 2 * 16 * 4
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    local = torch.arange(4 * 2 * 8 * 2 * 16, dtype=torch.float32, device="cuda").view(4, 2, 8, 2, 16)
    for layer in range(2):
        assert torch.equal(storage[layer, [3, 1]], (local + layer)[[0, 2]])
        assert bool((storage[layer, [0, 2]] == -1).all())


def test_the_second_tier_in_pinned_host_memory_brings_blocks_back_exactly(stories_path):
    """`kv_offload_bytes` beside a GPU pool: blocks evicted from a 24-block pool go to pinned host memory and
    come back over PCIe for the prompts sent again, token for token what the uncached engine gives."""
    import random

    rng = random.Random(3)
    prompts = [[rng.randrange(3, 500) for _ in range(100)] for _ in range(6)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    want = [o.token_ids for o in LLM(str(stories_path), device="cuda", enable_prefix_caching=False).generate(
        prompts, params)]
    llm = LLM(str(stories_path), device="cuda", num_kv_blocks=24, max_num_seqs=2, kv_offload_bytes=64 << 20)
    assert llm.engine.blocks.tier.store_tensor.is_pinned()
    for p, w in zip(prompts, want):
        assert llm.generate([p], params)[0].token_ids == w
    assert [o.token_ids for o in llm.generate(prompts[:2], params)] == want[:2]
    assert llm.engine.prefix_cache()["offload_hits"] == 2 * 6 * 16
