"""The engine on a CUDA GPU: decode throughput against transformers, a decode step against its bandwidth
floor, and the host time of a decode step with and without CUDA graphs.

A random-weight Llama of about 1.1B parameters (hidden 2048, 16 layers, 32 query / 8 KV heads, MLP 8192,
vocabulary 32000) in bfloat16, written by transformers into a temporary folder:
- throughput: `batch` requests (prompts of 128 tokens, 256 new tokens each, EOS ignored, greedy) through
  `LLM.generate` against transformers `generate` on the same padded batch, same GPU, same run;
- the decode step at batch 1: its median time against (every weight read once + the KV read) / the copy
  bandwidth measured in the same run;
- host overhead: a decode step's wall time minus the time its kernels ran on the GPU (torch.profiler), at
  batch 1 and `batch`, with CUDA graphs and with `enforce_eager`.

    python bench/engine_cuda.py [--batch 64] [--json PATH] [--small]

`--small` shrinks the model (hidden 512, 4 layers) for a quick check of the script itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from baton.bench.engine_throughput import machine, start_decodes, step_times_s
from baton.bench.runner import git_commit
from baton.engine import LLM, SamplingParams

MODEL_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
MODEL_SMALL = MODEL_1B | dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                              num_key_value_heads=2)
PROMPT_LEN, NEW_TOKENS = 128, 256


def write_checkpoint(folder: Path, shape: dict) -> None:
    """Random weights, initialised on the GPU (a 1B model's CPU init would take longer than the benchmark)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, dtype="bfloat16"))
    model.to(torch.bfloat16).save_pretrained(folder)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, shape["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))


def prompts(batch: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (batch, PROMPT_LEN), generator=g).tolist()


def baton_throughput(llm: LLM, work: list[list[int]]) -> tuple[float, list[list[int]]]:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    llm.generate(work[:2], SamplingParams(max_tokens=4, temperature=0))  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(work, params)
    return time.perf_counter() - t0, [o.token_ids for o in outs]


def transformers_throughput(folder: Path, work: list[list[int]]) -> tuple[float, list[list[int]]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).cuda().eval()
    ids = torch.tensor(work, device="cuda")  # equal lengths: no padding needed
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(ids[:2, :8], max_new_tokens=4, **kw)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **kw)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    del model
    torch.cuda.empty_cache()
    return elapsed, out[:, PROMPT_LEN:].tolist()


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device copy, read and write counted (best of 10)."""
    src = torch.ones(256 << 20, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * 4 / best


def decode_steps(llm: LLM, batch: int, context: int, steps: int = 30, profile: bool = False) -> dict:
    """Median wall time of a decode-only step for `batch` sequences at ~`context` tokens; with `profile`,
    also the GPU kernel time per step (the rest of the wall time is the host's)."""
    engine = llm.engine
    start_decodes(llm, batch, context, 3 * steps + 3)
    step_times_s(llm, 3)  # warm-up
    row = dict(batch=batch, context=context, step_ms=statistics.median(step_times_s(llm, steps)) * 1e3)
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                engine.step()
            wall = (time.perf_counter() - t0) / steps
        device_us = sum(e.self_device_time_total for e in prof.key_averages()) / steps
        row |= dict(profiled_step_ms=wall * 1e3, device_ms=device_us / 1e3, host_ms=wall * 1e3 - device_us / 1e3)
    for i in range(batch):
        engine.abort_request(f"d{i}")
    return row


def step_floor_ms(llm: LLM, batch: int, context: int, bandwidth: float) -> float:
    cfg = llm.engine.model_config
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size
    weight_bytes = (cfg.num_layers * per_layer + cfg.vocab_size * h) * 2  # bf16, lm_head included
    kv_bytes = batch * context * cfg.num_layers * 2 * kv * 2
    return (weight_bytes + kv_bytes) / bandwidth * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--small", action="store_true", help="a small model: checks the script, not the engine")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/engine_cuda.py needs a CUDA GPU")
    shape = MODEL_SMALL if args.small else MODEL_1B
    bandwidth = copy_bandwidth()
    result: dict = dict(machine=machine(), device=torch.cuda.get_device_name(), commit=git_commit(),
                        model=shape, batch=args.batch, copy_gb_s=bandwidth / 1e9)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_checkpoint(folder, shape)
        work = prompts(args.batch, shape["vocab_size"])
        common = dict(dtype="bfloat16", device="cuda", max_num_seqs=args.batch, max_num_batched_tokens=8192)
        llm = LLM(str(folder), **common)
        result["params"] = sum(p.numel() for p in llm.engine.runner.model.parameters())
        baton_s, ours = baton_throughput(llm, work)
        one = decode_steps(llm, 1, 512, profile=True)
        many = decode_steps(llm, args.batch, 512, profile=True)
        one["floor_ms"] = step_floor_ms(llm, 1, 512, bandwidth)
        del llm
        torch.cuda.empty_cache()
        eager = LLM(str(folder), enforce_eager=True, **common)
        eager_rows = [decode_steps(eager, 1, 512, profile=True), decode_steps(eager, args.batch, 512, profile=True)]
        del eager
        torch.cuda.empty_cache()
        hf_s, theirs = transformers_throughput(folder, work)
    asked = args.batch * NEW_TOKENS
    same = sum(a == b for a, b in zip(ours, theirs))
    result |= dict(baton_s=baton_s, transformers_s=hf_s, ratio=hf_s / baton_s, identical_outputs=same,
                   graphs=[one, many], eager=eager_rows)
    print(f"machine: {result['machine']}, {result['device']}")
    print(f"model: random Llama, {result['params'] / 1e9:.2f}B parameters, bfloat16; {args.batch} requests x "
          f"{PROMPT_LEN} prompt + {NEW_TOKENS} new tokens")
    print(f"decode throughput: baton {asked / baton_s:.0f} tok/s, transformers {asked / hf_s:.0f} tok/s -> "
          f"{hf_s / baton_s:.2f}x (target >= 5x); greedy outputs identical: {same}/{args.batch} (bf16: near-ties "
          f"may split)")
    print(f"decode step, batch 1 at 512 tokens: {one['step_ms']:.3f} ms; floor {one['floor_ms']:.3f} ms at "
          f"{bandwidth / 1e9:.0f} GB/s -> {one['step_ms'] / one['floor_ms']:.2f}x the floor (target <= 1.5x)")
    for name, rows in (("graphs", [one, many]), ("eager", eager_rows)):
        for r in rows:
            print(f"{name:6} batch {r['batch']:3d}: step {r['step_ms']:.3f} ms, profiled {r['profiled_step_ms']:.3f}"
                  f" ms = GPU kernels {r['device_ms']:.3f} + host {r['host_ms']:.3f} ms")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
