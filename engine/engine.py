"""The engine loop: admit requests, schedule a step, run the model, sample, detokenize, finish and free.

`LLMEngine` is synchronous and single-threaded; a server runs it on its own thread and talks to it through
queues. Every request error is raised by `add_request` before the request holds anything.
"""

from __future__ import annotations

import random
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .block_manager import BlockManager
from .config import DTYPES, EngineConfig, ModelConfig
from .cuda_graphs import DecodeGraphs
from .detokenizer import IncrementalDetokenizer
from .errors import ConfigError, InvalidRequest, NoCapacity
from .checkpoint import resolve_model_path
from .loader import load_model
from .model_runner import KVCache, ModelRunner
from .ops import make_ops
from .parallel import shard
from .tp_runtime import RankKVService, TPWorkers, rank_device
from .request import FinishReason, RequestOutput, Resumed, SamplingParams
from .sampler import sample, top_alternatives
from .scheduler import ScheduledStep, Scheduler, SchedulerConfig
from .sequence import Sequence
from .tokenizer import Tokenizer


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
        self.config = config
        folder = resolve_model_path(config.model)
        self.model_config = cfg = ModelConfig.from_folder(folder)
        self.tokenizer = Tokenizer.from_folder(folder)
        self.max_model_len = min(config.max_model_len or cfg.max_model_len, cfg.max_model_len)
        batched = config.max_num_batched_tokens or max(4096, self.max_model_len)
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
        self.blocks = BlockManager(num_blocks, config.block_size)
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
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, batched, config.enable_chunked_prefill), self.blocks
        )
        self._seqs: dict[str, Sequence] = {}
        self._rng = random.Random(config.seed)
        self._kv_sink: KVSink | None = None
        self._step_observer: Callable[[StepShape], None] | None = None

    def rank_pools(self) -> list[bytes]:
        """The other ranks' KV storages, as they describe them for mapping (`kvtransfer.shared.encode`): ranks
        1, 2, ... of a tensor-parallel engine whose pools are shareable (CUDA, or `share_kv_cache`)."""
        return [] if self._workers is None else self._workers.pools

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

    # -- requests -------------------------------------------------------------------------------------

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
        self._check_new_id(request_id)
        if isinstance(prompt, str) and not prompt:
            raise InvalidRequest("prompt", "is empty")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._check_prompt(ids)
        seq = self._new_sequence(request_id, ids, params)
        self._replay(seq, resumed)
        seq.prefill_only = prefill_only
        self._seqs[request_id] = seq
        self.scheduler.add(seq)
        return ids

    def _check_new_id(self, request_id: str) -> None:
        if request_id in self._seqs or self.blocks.table(request_id):
            raise InvalidRequest("request_id", f"{request_id!r} is already in use on this engine")

    def _new_sequence(self, request_id: str, ids: list[int], params: SamplingParams) -> Sequence:
        max_len = self._check_fits(len(ids), params.max_tokens)
        seed = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        seq = Sequence(request_id, list(ids), len(ids), params, max_len, seed)
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, ids)
        return seq

    def _replay(self, seq: Sequence, resumed: Resumed | None) -> None:
        """Puts a resumed stream's delivered tokens back into a new sequence: its text, as the first engine
        built it (the same detokenizer, fed the same tokens), and what of it was emitted."""
        if not resumed or not resumed.token_ids:
            return
        ids = list(resumed.token_ids)
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise InvalidRequest("resumed.token_ids", f"token ids must be integers in [0, {vocab})")
        if len(ids) >= seq.params.max_tokens or seq.num_tokens + len(ids) >= seq.max_len:
            raise InvalidRequest("resumed.token_ids", f"{len(ids)} tokens delivered: the stream has no room left "
                                 f"(max_tokens {seq.params.max_tokens})")
        for token in ids:
            seq.token_ids.append(token)
            seq.logprobs.append(0.0)  # delivered already: never emitted again
            if seq.params.top_logprobs:
                seq.top_logprobs.append(None)
            seq.text += seq.detokenizer.push([token])
        if not 0 <= resumed.text_chars <= len(seq.text):
            raise InvalidRequest("resumed.text_chars", f"{resumed.text_chars} characters delivered, the tokens "
                                 f"make {len(seq.text)}")
        seq.num_text_emitted = resumed.text_chars
        seq.num_tokens_emitted = len(ids)

    def _check_fits(self, prompt_len: int, max_tokens: int) -> int:
        """The sequence's longest length; refuses what could not run even alone in the whole cache."""
        max_len = min(prompt_len + max_tokens, self.max_model_len)
        if self.blocks.blocks_for(max_len) > self.blocks.num_blocks:
            capacity = self.blocks.num_blocks * self.blocks.block_size
            field = "prompt" if self.blocks.blocks_for(prompt_len + 1) > self.blocks.num_blocks else "max_tokens"
            raise InvalidRequest(
                field, f"{prompt_len} prompt + {max_tokens} new tokens exceed the KV cache ({capacity} tokens)"
            )
        return max_len

    # -- disaggregation: a decode node reserves blocks, another node fills them, this engine goes on ---

    def reserve(self, request_id: str, prompt_len: int, max_tokens: int) -> list[int]:
        """Allocates the blocks a prompt's K/V will be written into; returns their ids in order."""
        self._check_new_id(request_id)
        if prompt_len < 1 or prompt_len >= self.max_model_len:
            raise InvalidRequest("prompt", f"{prompt_len} tokens, the model's context is {self.max_model_len}")
        self._check_fits(prompt_len, max_tokens)
        if not self.blocks.can_hold(request_id, prompt_len):
            raise NoCapacity(f"{self.blocks.blocks_for(prompt_len)} KV blocks needed, {self.blocks.num_free} free")
        self.blocks.grow(request_id, prompt_len)
        return list(self.blocks.table(request_id))

    def adopt(
        self, request_id: str, prompt: Seq[int], first_token: int, first_logprob: float, params: SamplingParams,
        resumed: Resumed | None = None,
    ) -> RequestOutput:
        """Continues a sequence whose prompt K/V are already in its reserved blocks and whose first token was
        sampled elsewhere. Replays that token through the stop checks and text emission, so the outputs that
        follow carry on exactly where the prefill node's left off. `resumed`: the tokens the stream had
        delivered before (their K/V came with the prompt's); `first_token` is the one after them. Returns the
        first token's output (delivered already by the prefill node; finished if that token ended it)."""
        if not self.blocks.table(request_id):
            raise InvalidRequest("request_id", f"{request_id!r} holds no reservation on this engine")
        ids = list(prompt)
        seq = self._new_sequence(request_id, ids, params)  # the first token's index was 0: the next is 1
        self._replay(seq, resumed)
        seq.num_computed = seq.num_tokens
        seq.token_ids.append(first_token)
        seq.logprobs.append(first_logprob)
        if params.top_logprobs:
            seq.top_logprobs.append(None)  # the prefill node sent them with the first token
        self._seqs[request_id] = seq
        self.scheduler.add(seq)
        self._check_finished(seq, first_token)
        return self._emit(seq)  # already delivered by the prefill node

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
        self._check_new_id(child_id)
        ids = list(prompt)
        self._check_prompt(ids)
        table = self.blocks.table(parent_id)
        if len(table) < self.blocks.blocks_for(len(ids)):
            raise InvalidRequest("request_id", f"{parent_id!r} holds {len(table)} KV blocks on this engine, "
                                 f"a {len(ids)}-token prompt fills {self.blocks.blocks_for(len(ids))}")
        parent = self._seqs.get(parent_id)
        if parent is not None:  # a sequence here: its K/V must be of this prompt, and computed
            if parent.token_ids[: len(ids)] != ids:
                raise InvalidRequest("prompt", f"is not the start of {parent_id!r}'s tokens")
            if parent.num_computed < len(ids):
                raise InvalidRequest("request_id", f"{parent_id!r} has not computed the prompt yet")
        seq = self._new_sequence(child_id, ids, params)
        self._replay(seq, resumed)
        shared = (len(ids) - 1) // self.blocks.block_size
        self.blocks.fork(parent_id, child_id, shared)
        seq.num_computed = shared * self.blocks.block_size  # the scheduler grows its table past the shared blocks
        self._seqs[child_id] = seq
        self.scheduler.add(seq)
        return seq.num_computed

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise InvalidRequest("prompt", "is empty")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise InvalidRequest("prompt", f"token ids must be integers in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise InvalidRequest(
                "prompt", f"{len(ids)} tokens, the model's context is {self.max_model_len} (room for 1 new token)"
            )

    def release(self, request_id: str) -> tuple[int, RequestOutput | None]:
        """Frees whatever this engine holds for a request, whatever its state: a waiting or running sequence
        is aborted (the output that says so is returned, for its stream), a reservation nobody adopted is
        freed. Returns (blocks freed, the abort output or None). Harmless if nothing is held."""
        before = self.blocks.num_free
        out = self.abort_request(request_id)
        self.blocks.free(request_id)
        return self.blocks.num_free - before, out

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

    def load(self) -> tuple[int, int, int, int]:
        """(total blocks, free blocks, running, waiting)."""
        s = self.scheduler
        return self.blocks.num_blocks, self.blocks.num_free, len(s.running), len(s.waiting)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stops a request and frees its blocks at once; None if it is unknown or already finished."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq)
        seq.finish_reason = FinishReason.ABORT
        return RequestOutput(request_id, seq.num_tokens_emitted, [], [], "", FinishReason.ABORT)

    def abort_all(self) -> None:
        """Aborts every waiting and running sequence (their blocks are freed at once)."""
        for request_id in list(self._seqs):
            self.abort_request(request_id)

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
        chosen = [step.seqs[i] for i in sampled]
        tokens, logprobs = sample(logits, [s.params for s in chosen], [s.seed for s in chosen],
                                  [s.num_output_tokens for s in chosen], [s.token_ids for s in chosen],
                                  self.eos_token_ids)
        wanted = [i for i, s in enumerate(chosen) if s.params.top_logprobs]
        if wanted:
            tops = top_alternatives(logits, wanted, [chosen[i].params.top_logprobs for i in wanted])
            for i, top in zip(wanted, tops):
                chosen[i].top_logprobs.append(top)
        outputs = []
        for seq, token, logprob in zip(chosen, tokens, logprobs):
            seq.token_ids.append(token)
            seq.logprobs.append(logprob)
            self._check_finished(seq, token)
            outputs.append(self._emit(seq))
            if seq.prefill_only and seq.finish_reason is None:
                # Handed over: the decode node holds the request from here. The KV sink copied the blocks.
                self.scheduler.finish(seq)
                del self._seqs[seq.request_id]
        return outputs

    def _sink_hook(self, step: ScheduledStep):
        """(the per-layer callback that feeds the KV sink this step's prompts, those prompts), or (None, [])."""
        sink = self._kv_sink
        if sink is None:
            return None, []
        prompts = [(seq.request_id, self.blocks.table(seq.request_id))
                   for seq, n in zip(step.seqs, step.num_tokens) if seq.prefill_only and seq.num_computed == 0]
        if not prompts:
            return None, []
        pools = self.runner.kv.pools
        sink.step_started(prompts, pools[0])
        return (lambda layer: sink.layer_done(layer, pools[layer], prompts)), prompts

    def _check_finished(self, seq: Sequence, token: int) -> None:
        p = seq.params
        delta = seq.detokenizer.push([token])
        if not p.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = FinishReason.EOS
        elif token in p.stop_token_ids:
            seq.finish_reason = FinishReason.STOP
        elif seq.num_tokens >= seq.max_len:
            seq.finish_reason = FinishReason.LENGTH
        if seq.finish_reason is not None:
            delta += seq.detokenizer.flush()
        seq.text += delta
        # Before min_tokens tokens, stop strings are not looked for (vLLM's stop checker returns early too).
        if p.stop and seq.num_output_tokens >= p.min_tokens and self._cut_at_stop_string(seq, len(delta)):
            seq.finish_reason = FinishReason.STOP
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)
            del self._seqs[seq.request_id]

    def _cut_at_stop_string(self, seq: Sequence, added: int) -> bool:
        # Only a match that ends in the new text can be new; search from where it could start.
        longest = max(map(len, seq.params.stop))
        start = max(0, len(seq.text) - added - longest + 1)
        hits = [i for i in (seq.text.find(s, start) for s in seq.params.stop) if i >= 0]
        if not hits:
            return False
        cut = min(hits)
        if seq.params.include_stop_str_in_output:
            cut += next(len(s) for s in seq.params.stop if seq.text.find(s, start) == cut)
        seq.text = seq.text[:cut]
        return True

    def _emit(self, seq: Sequence) -> RequestOutput:
        # While a stop string could still be completing, hold back as many characters as it could span.
        hold = 0 if seq.finish_reason or not seq.params.stop else max(map(len, seq.params.stop)) - 1
        end = max(seq.num_text_emitted, len(seq.text) - hold)
        text = seq.text[seq.num_text_emitted : end]
        seq.num_text_emitted = end
        first = seq.num_tokens_emitted
        new_ids = seq.output_ids[first:]
        out = RequestOutput(seq.request_id, first, new_ids, seq.logprobs[first:], text, seq.finish_reason,
                            seq.top_logprobs[first:] if seq.params.top_logprobs else [])
        seq.num_tokens_emitted = seq.num_output_tokens
        return out
