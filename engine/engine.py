"""The engine loop: schedule a step, run the model, sample, and take each sampled token (its end, its output).

`LLMEngine` is synchronous and single-threaded; a server runs it on its own thread and talks to it through
queues. The rest is in units of their own: the checks a request passes (`validation.py`), the requests and
their blocks from reservation to release (`requests.py`, resumed streams' replay included), where a request
ends (`stops.py`), and the text and tokens it hands out (`output.py`). Every request error is raised before
the request holds anything.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Callable, NamedTuple, Protocol

import torch

from .allocator import keep_large_allocations
from .block_manager import BlockManager
from .config import DTYPES, EngineConfig, ModelConfig, step_tokens, transfer_tokens
from .cuda_graphs import DecodeGraphs
from .errors import ConfigError
from .checkpoint import resolve_model_path
from .loader import load_model
from .model_runner import KVCache, ModelRunner
from .offload import OffloadTier
from .ops import make_ops
from .parallel import shard
from .prefix import model_seed
from .tp_runtime import RankKVService, TPWorkers, rank_device
from .request import FinishReason, RequestOutput, Resumed, SamplingParams
from .requests import Requests, Reserved
from .sampler import sample, top_alternatives
from .scheduler import ScheduledStep, Scheduler, SchedulerConfig
from .sequence import Sequence
from .stops import token_finish
from .tokenizer import Tokenizer
from .validation import RequestChecks


@dataclass(frozen=True, slots=True)
class KVSpec:
    """The KV cache as a transfer sees it: one pool per layer, `[num_blocks, 2, block_size, kv_heads, head_dim]`."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int  # in this rank's pool
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    model_kv_heads: int = 0  # the model's, split between the ranks
    tensor_parallel_size: int = 1


class Load(NamedTuple):
    """What the engine holds now (what a node reports, for routing)."""

    total_blocks: int
    free_blocks: int  # cached blocks nobody holds count as free
    running: int
    waiting: int
    queued_tokens: int  # prompt tokens still to compute, of waiting and running sequences


@dataclass(frozen=True, slots=True)
class StepShape:
    """What one step computes (for a node's batch-size metrics): tokens of sequences in prefill (prompts, their
    chunks, or a preempted sequence recomputed), and sequences decoding (each one token, its last sampled)."""

    prefill_tokens: int
    decode_seqs: int

    @classmethod
    def of(cls, step: ScheduledStep) -> StepShape:
        decode = sum(n == 1 and seq.num_output_tokens > 0 and seq.num_computed == seq.num_tokens - 1
                     for seq, n in zip(step.seqs, step.num_tokens))
        return cls(sum(step.num_tokens) - decode, decode)


class KVSink(Protocol):
    """Where a prefill node's KV transfer takes a step's prompt K/V from (engine thread, inside the step).

    `prompts`: (request id, block table) of each prefill-only sequence whose prompt this step computes. The
    blocks are the engine's and are freed when the step ends: `layer_done` must copy what it needs."""

    def step_started(self, prompts: list[tuple[str, list[int]]], pool: torch.Tensor) -> None: ...

    def layer_done(self, layer: int, pool: torch.Tensor, prompts: list[tuple[str, list[int]]]) -> None: ...


class LLMEngine:
    def __init__(self, config: EngineConfig, rank_kv: RankKVService | None = None) -> None:
        """`rank_kv`: a tensor-parallel engine's other ranks start it to take part in KV transfers (a prefill or
        decode node's: `kvtransfer.ranks.serve_rank`); without it they only compute."""
        keep_large_allocations()  # every step's activations from the allocator's heaps, not fresh pages
        self.config = config
        folder = resolve_model_path(config.model)
        self.model_config = cfg = ModelConfig.from_folder(folder)
        self.tokenizer = Tokenizer.from_folder(folder)
        self.max_model_len = min(config.max_model_len or cfg.max_model_len, cfg.max_model_len)
        batched = step_tokens(config, self.max_model_len)
        self.transfer_tokens = transfer_tokens(config, self.max_model_len)  # what bounds the send buffers
        if not config.enable_chunked_prefill and batched < self.max_model_len:
            raise ConfigError(
                "max_num_batched_tokens",
                f"{batched} < max_model_len {self.max_model_len}: a long prompt could never be scheduled "
                "(raise it, or enable chunked prefill)",
            )
        if batched < config.max_num_seqs:
            raise ConfigError("max_num_batched_tokens", f"{batched} < max_num_seqs {config.max_num_seqs}")
        dtype = config.dtype or cfg.dtype
        self.eos_token_ids = frozenset(cfg.eos_token_ids)

        tp = config.tensor_parallel_size
        self.shard = shard(cfg, tp, 0)  # refuses a degree the model cannot take, naming the numbers
        device = str(rank_device(config.device, 0))
        model = load_model(folder, cfg, dtype, device, self.max_model_len, config.pack_cpu_weights, self.shard)
        model.ops = make_ops(config.kernels, model.rotary, config.block_size)
        num_blocks = config.num_kv_blocks or self._default_num_blocks(DTYPES[dtype])
        seed = model_seed(folder) if config.enable_prefix_caching else None
        self.blocks = BlockManager(num_blocks, config.block_size, seed)
        kv = KVCache(cfg, num_blocks, config.block_size, DTYPES[dtype], device, config.share_kv_cache,
                     self.shard.num_kv_heads)
        self._workers = None
        if tp > 1:  # the other ranks: their own processes, each with its shard and its own pool
            self._workers = TPWorkers(config, str(folder), cfg, num_blocks, self.max_model_len, rank_kv=rank_kv)
            model.set_tp(self._workers.group)
        graphs = None
        if device.startswith("cuda") and config.kernels == "triton" and not config.enforce_eager and tp == 1:
            graphs = DecodeGraphs(model, kv.pools, config.max_num_seqs, self.blocks.blocks_for(self.max_model_len),
                                  device)
            graphs.capture()
        self.runner = ModelRunner(model, kv, self.blocks, device, graphs, self._workers)
        if config.kv_offload_bytes:
            self.blocks.tier = OffloadTier(kv.pools, config.kv_offload_bytes)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, batched, config.enable_chunked_prefill), self.blocks
        )
        checks = RequestChecks(cfg.vocab_size, self.max_model_len, self.blocks)
        self.requests = Requests(checks, self.blocks, self.scheduler, self.tokenizer, config.seed)
        self._kv_sink: KVSink | None = None
        self._step_observer: Callable[[StepShape], None] | None = None

    def rank_pools(self) -> list[bytes]:
        """The other ranks' KV storages, as they describe them for mapping (`kvtransfer.shared.encode`): ranks
        1, 2, ... of a tensor-parallel engine whose pools are shareable (CUDA, or `share_kv_cache`)."""
        return [] if self._workers is None else self._workers.pools

    def rank_pids(self) -> list[int]:
        """The process ids of ranks 1, 2, ... (none on one rank)."""
        return [] if self._workers is None else [p.pid for p in self._workers.procs]

    def rank_links(self) -> list:
        """Rank 0's ends of the pipes to ranks 1, 2, ... (`kvtransfer.ranks.NodeRanks` drives their KV transfers
        through them); none without `rank_kv`."""
        return [] if self._workers is None else self._workers.links

    def ranks_alive(self) -> bool:
        """Whether every other rank of a tensor-parallel engine still runs (without one, it cannot step)."""
        return self._workers is None or all(p.is_alive() for p in self._workers.procs)

    def close(self) -> None:
        """Stops the other ranks of a tensor-parallel engine (nothing to do otherwise)."""
        if self._workers is not None:
            self._workers.close()

    def _default_num_blocks(self, dtype: torch.dtype) -> int:
        per_block = KVCache.bytes_per_block(self.model_config, self.config.block_size, dtype, self.shard.num_kv_heads)
        enough = self.config.max_num_seqs * -(-self.max_model_len // self.config.block_size)
        return max(1, min(self.config.kv_cache_bytes // per_block, enough))

    # -- requests: `Requests` holds them; see requests.py for their life ------------------------------

    def add_request(
        self, request_id: str, prompt: str | Seq[int], params: SamplingParams, prefill_only: bool = False,
        resumed: Resumed | None = None,
    ) -> list[int]:
        """Queues a request; returns its prompt token ids. Raises `InvalidRequest` naming the bad field.

        `prefill_only`: compute the prompt and sample the first token, then let the sequence go (a prefill
        node); its output then has no finish reason unless the first token ended the request. Its K/V reach
        the KV sink (`set_kv_sink`) during its step; its blocks are freed when the step ends.
        `resumed`: the stream's tokens so far (`Resumed`): they are computed with the prompt, and the next
        token sampled is the stream's next.
        """
        return self.requests.add(request_id, prompt, params, prefill_only, resumed)

    # -- disaggregation: a decode node reserves blocks, another node fills them, this engine goes on ---

    def reserve(self, request_id: str, prompt_len: int, max_tokens: int,
                token_ids: Seq[int] | None = None) -> Reserved:
        """Allocates the blocks a prompt's K/V will be written into: their ids in order. With the prompt's
        `token_ids`, its cached blocks come first and are held for it (`Reserved.cached`: their K/V need not
        be written)."""
        return self.requests.reserve(request_id, prompt_len, max_tokens, token_ids)

    def hold_prefix(self, request_id: str, token_ids: Seq[int], num_blocks: int) -> Reserved:
        """Holds the blocks of the first `num_blocks` full blocks of `token_ids`, cached or fresh (the pull path:
        `Requests.hold_prefix`); `commit_held` once the fresh ones' K/V are in, `release` to let go."""
        return self.requests.hold_prefix(request_id, token_ids, num_blocks)

    def commit_held(self, request_id: str, token_ids: Seq[int]) -> None:
        self.requests.commit_held(request_id, token_ids)

    def adopt(
        self, request_id: str, prompt: Seq[int], first_token: int, first_logprob: float, params: SamplingParams,
        resumed: Resumed | None = None,
    ) -> RequestOutput:
        """Continues a sequence whose prompt K/V are already in its reserved blocks and whose first token was
        sampled elsewhere. Takes that token as a step takes a sampled one (its end, its text), so the outputs
        that follow carry on exactly where the prefill node's left off. `resumed`: the tokens the stream had
        delivered before (their K/V came with the prompt's); `first_token` is the one after them. Returns the
        first token's output (delivered already by the prefill node; finished if that token ended it)."""
        seq = self.requests.adopt(request_id, prompt, params, resumed)
        return self._take(seq, first_token, first_logprob, None)  # its top_logprobs came from the prefill node

    def compute_rest(self, request_id: str, prompt: Seq[int], params: SamplingParams,
                     resumed: Resumed | None = None) -> None:
        """Continues a reservation whose cached blocks hold the start of `prompt` by computing the rest of it
        here: its first token comes out of this engine's steps like any other (conditional disaggregation)."""
        self.requests.compute_rest(request_id, prompt, params, resumed)

    def fork(
        self, parent_id: str, child_id: str, prompt: Seq[int], params: SamplingParams,
        resumed: Resumed | None = None,
    ) -> int:
        """Queues a new request for `prompt` that reuses the prompt K/V a parent already holds here (a
        reservation another node filled, or a sequence adopted or computed here): OpenAI's n > 1 with one
        prefill. Returns how many prompt tokens it shares (their K/V are not computed again).

        The child shares the parent's full blocks below its last prompt token and computes the rest itself:
        it needs that position's logits for its first token, and it never writes into a shared block. It has
        its own `params` (and seed: its first token is its index 0) and is independent of the parent from here
        on: either may finish, be aborted or be preempted first; a block goes back only when neither holds it.
        `resumed` as in `add_request`."""
        return self.requests.fork(parent_id, child_id, prompt, params, resumed)

    def release(self, request_id: str) -> tuple[int, RequestOutput | None]:
        """Frees whatever this engine holds for a request, whatever its state: a waiting or running sequence
        is aborted (the output that says so is returned, for its stream), a reservation nobody adopted is
        freed. Returns (blocks freed, the abort output or None). Harmless if nothing is held."""
        return self.requests.release(request_id)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stops a request and frees its blocks at once; None if it is unknown or already finished."""
        return self.requests.abort(request_id)

    def abort_all(self) -> None:
        """Aborts every waiting and running sequence (their blocks are freed at once)."""
        self.requests.abort_all()

    def reset_prefix_cache(self) -> int:
        """Forgets every cached block no request holds (vLLM's name); returns how many."""
        return self.blocks.flush()

    def set_kv_sink(self, sink: KVSink | None) -> None:
        self._kv_sink = sink

    def set_step_observer(self, observer: Callable[[StepShape], None] | None) -> None:
        """`observer(shape)` is called with each step's `StepShape`, on the thread that steps, before it runs."""
        self._step_observer = observer

    @property
    def kv_spec(self) -> KVSpec:
        cfg, kv = self.model_config, self.runner.kv
        return KVSpec(cfg.num_layers, self.blocks.num_blocks, self.blocks.block_size, self.shard.num_kv_heads,
                      cfg.head_dim, kv.storage.dtype, kv.storage.device, cfg.num_kv_heads, self.shard.size)

    @property
    def kv_pools(self) -> list[torch.Tensor]:
        return self.runner.kv.pools

    @property
    def kv_storage(self) -> tuple[torch.Tensor, str]:
        """Every layer's pool as one tensor `[layers, blocks, 2, block_size, kv_heads, head_dim]`, and the
        /dev/shm file that holds it ("" unless `share_kv_cache` on a CPU)."""
        return self.runner.kv.storage, self.runner.kv.shm_path

    def blocks_for(self, num_tokens: int) -> int:
        return self.blocks.blocks_for(num_tokens)

    def load(self) -> Load:
        s = self.scheduler
        queued = sum(seq.num_uncomputed for seq in s.waiting) + sum(seq.num_uncomputed for seq in s.running)
        return Load(self.blocks.num_blocks, self.blocks.num_free, len(s.running), len(s.waiting), queued)

    def prefix_cache(self) -> dict[str, int]:
        """What prefix caching did: cached_blocks (named, held or not), and since the start, queries and hits
        (prompt tokens looked up, and found cached) and evictions (cached blocks taken for other contents)."""
        c, tier = self.blocks.counters, self.blocks.tier
        return dict(cached_blocks=self.blocks.num_cached, queries=c.queries, hits=c.hits, evictions=c.evictions,
                    offloaded_blocks=len(tier) if tier is not None else 0, offload_hits=c.restored)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free

    # -- the loop -------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        step = self.scheduler.schedule()
        if not step:
            return []
        if self._step_observer is not None:
            self._step_observer(StepShape.of(step))
        after_layer, kv_prompts = self._sink_hook(step)
        logits, sampled = self.runner.run(step.seqs, step.num_tokens, after_layer, kv_prompts)
        for seq, n in zip(step.seqs, step.num_tokens):
            seq.num_computed += n
            self.blocks.commit(seq.request_id, seq.token_ids, seq.num_computed)  # its full blocks are final
        chosen = [step.seqs[i] for i in sampled]
        tokens, logprobs = sample(logits, [s.params for s in chosen], [s.seed for s in chosen],
                                  [s.num_output_tokens for s in chosen], [s.token_ids for s in chosen],
                                  self.eos_token_ids)
        tops: list[tuple[list[int], list[float]] | None] = [None] * len(chosen)
        wanted = [i for i, s in enumerate(chosen) if s.params.top_logprobs]
        if wanted:
            alternatives = top_alternatives(logits, wanted, [chosen[i].params.top_logprobs for i in wanted])
            for i, top in zip(wanted, alternatives):
                tops[i] = top
        outputs = [self._take(*taken) for taken in zip(chosen, tokens, logprobs, tops)]
        for seq in chosen:
            if seq.prefill_only and seq.finish_reason is None:
                # Handed over: the decode node holds the request from here. The KV sink copied the blocks.
                self.requests.finish(seq)
        return outputs

    def _sink_hook(self, step: ScheduledStep):
        """(the per-layer callback that feeds the KV sink this step's prompts, those prompts), or (None, [])."""
        sink = self._kv_sink
        if sink is None:
            return None, []
        # A prompt goes whole, cached blocks included, in the step that computes its (uncached) rest.
        prompts = [(seq.request_id, self.blocks.table(seq.request_id)) for seq, n in zip(step.seqs, step.num_tokens)
                   if seq.prefill_only and seq.num_computed + n == seq.num_tokens]
        if not prompts:
            return None, []
        pools = self.runner.kv.pools
        sink.step_started(prompts, pools[0])
        return (lambda layer: sink.layer_done(layer, pools[layer], prompts)), prompts

    def _take(self, seq: Sequence, token: int, logprob: float, top: tuple[list[int], list[float]] | None) -> \
            RequestOutput:
        """A token sampled for `seq` (here, or by the prefill node it was adopted from): added, checked for the
        request's end (which lets the sequence go), and handed out with the text it completes."""
        seq.token_ids.append(token)
        seq.logprobs.append(logprob)
        if seq.params.top_logprobs:
            seq.top_logprobs.append(top)
        seq.finish_reason = token_finish(token, seq.params, self.eos_token_ids, seq.num_tokens >= seq.max_len)
        if seq.output.add(token, seq.num_output_tokens, finishing=seq.finish_reason is not None):
            seq.finish_reason = FinishReason.STOP
        if seq.finish_reason is not None:
            self.requests.finish(seq)
        return seq.output.emit(seq)
