"""`baton profile`: measures what one node's engine costs per step, and fits the cost models of
engine/profile.py to it.

Prefill: one prompt of `tokens` new tokens after `cached` cached ones, computed in one step (the cached part
computed first, so that the prefix cache holds it); the step's median over `repeats` prompts of fresh tokens.
Decode: `batch` sequences of `context` prompt tokens, prefilled, then the median of decode-only steps. The
engine is the one a node runs (same config: device, dtype, kernels, degree), offline: no gRPC, no transfer.
"""

from __future__ import annotations

import itertools
import platform
import statistics
import time
from collections.abc import Sequence

import torch

from baton.engine.profile import DecodePoint, Grid, PrefillPoint, Profile, least_squares
from baton.engine.checkpoint import resolve_model_path, served_name
from baton.engine.config import EngineConfig, step_tokens
from baton.engine.engine import LLMEngine
from baton.engine.request import SamplingParams


class Profiler:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.engine = LLMEngine(config)
        self._fresh = itertools.count(3)  # token ids never used before in this run: no prefix cache hits
        self._ids = itertools.count()
        self.vocab = self.engine.model_config.vocab_size

    def close(self) -> None:
        self.engine.close()

    def _tokens(self, n: int) -> list[int]:
        return [3 + (next(self._fresh) % (self.vocab - 3)) for _ in range(n)]

    def _run_to_end(self, prompt: list[int]) -> None:
        rid = f"c{next(self._ids)}"
        self.engine.add_request(rid, prompt, SamplingParams(max_tokens=1, ignore_eos=True, temperature=0))
        while self.engine.has_unfinished():
            self.engine.step()

    def prefill_s(self, tokens: int, cached: int, repeats: int) -> float:
        times = []
        for _ in range(repeats):
            prefix = self._tokens(cached)
            if cached:
                self._run_to_end(prefix + self._tokens(1))  # its full blocks stay in the prefix cache
            rid = f"p{next(self._ids)}"
            self.engine.add_request(rid, prefix + self._tokens(tokens),
                                    SamplingParams(max_tokens=1, ignore_eos=True, temperature=0))
            start = time.perf_counter()
            self.engine.step()
            times.append(time.perf_counter() - start)
            while self.engine.has_unfinished():
                self.engine.step()
        self.engine.reset_prefix_cache()
        return statistics.median(times)

    def decode_step_s(self, batch: int, context: int, steps: int) -> float:
        ids = [f"d{next(self._ids)}" for _ in range(batch)]
        for rid in ids:
            self.engine.add_request(rid, self._tokens(context),
                                    SamplingParams(max_tokens=steps + 2, ignore_eos=True, temperature=0))
        while self.engine.scheduler.waiting:  # the prompts, in as few steps as the token budget allows
            self.engine.step()
        self.engine.step()  # the last prompts' step may have been mixed: one more before the decode-only ones
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            self.engine.step()
            times.append(time.perf_counter() - start)
        for rid in ids:
            self.engine.abort_request(rid)
        self.engine.reset_prefix_cache()
        return statistics.median(times)

    def run(self, grid: Grid, progress=lambda text: None) -> Profile:
        engine, cfg = self.engine, self.config
        spec, mc = engine.kv_spec, engine.model_config
        block, max_len = cfg.block_size, engine.max_model_len
        self._run_to_end(self._tokens(8))  # warm-up: first-call costs out of the figures
        prefill: list[PrefillPoint] = []
        for tokens, fraction in itertools.product(grid.prompt_lens, grid.cached_fractions):
            cached = int(tokens * fraction) // block * block
            if cached + tokens + 1 > max_len or tokens > step_tokens(cfg, max_len) or \
                    any((p.tokens, p.cached) == (tokens, cached) for p in prefill):
                continue
            prefill.append(PrefillPoint(tokens, cached, self.prefill_s(tokens, cached, grid.repeats)))
            progress(f"prefill {tokens} tokens after {cached} cached: {prefill[-1].seconds * 1e3:.2f} ms")
        decode = []
        for batch, context in itertools.product(grid.batches, grid.contexts):
            if batch > cfg.max_num_seqs or context + 4 * grid.repeats + 2 > max_len or \
                    batch * engine.blocks_for(context + 4 * grid.repeats + 2) > engine.num_free_blocks:
                continue
            seconds = self.decode_step_s(batch, context, 4 * grid.repeats)
            decode.append(DecodePoint(batch, context + 2 * grid.repeats, seconds))
            progress(f"decode step, batch {batch} at {decode[-1].context} tokens: {seconds * 1e3:.2f} ms")
        if len(prefill) < 3 or len(decode) < 3:
            raise ValueError("grid: fewer than 3 prefill or decode points fit this model and cache: give longer or "
                             "more prompt lengths, batches or contexts")
        prefill_fit = least_squares([[1.0, p.tokens, p.tokens * (p.cached + p.tokens)] for p in prefill],
                                    [p.seconds for p in prefill])
        decode_fit = least_squares([[1.0, d.batch, d.batch * d.context] for d in decode], [d.seconds for d in decode])
        return Profile(
            model=served_name(resolve_model_path(cfg.model)), device=spec.device.type,
            dtype=str(spec.dtype).removeprefix("torch."), tp=cfg.tensor_parallel_size, machine=machine(),
            block_size=block, num_kv_blocks=spec.num_blocks, max_num_seqs=cfg.max_num_seqs, max_model_len=max_len,
            kv_bytes_per_token=2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * spec.dtype.itemsize,
            prefill=tuple(prefill), decode=tuple(decode), prefill_fit=tuple(prefill_fit),  # type: ignore[arg-type]
            decode_fit=tuple(decode_fit), threads=torch.get_num_threads())  # type: ignore[arg-type]


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    return f"{platform.node()}: {gpu + ', ' if gpu else ''}{cpu}, torch {torch.__version__}"


def profile(config: EngineConfig, grid: Grid = Grid(), progress=lambda text: None) -> Profile:
    profiler = Profiler(config)
    try:
        return profiler.run(grid, progress)
    finally:
        profiler.close()


__all__: Sequence[str] = ("Profiler", "profile")
