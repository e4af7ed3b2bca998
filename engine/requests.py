"""The engine's requests: one owner for the sequences it runs and for the KV blocks it holds for requests.

A request here goes, in order:
    reserved  (`reserve`: blocks for a prompt another node computes; no sequence yet)
      → queued  (`add`, `adopt`, `fork`: a sequence in the scheduler: waiting, running, or preempted)
      → gone    (`finish`: it ended, or a prefill node handed it over; `abort` / `release`: its caller gave it up)
A reservation may go straight to gone (`release`). A request's blocks are freed when it goes, unless a forked
sibling still shares them (the block manager counts holders). Every entry point checks first
(`validation.py`), so a refused request leaves nothing held. The step loop (`engine.py`) only reads the
sequences the scheduler gives it and hands each one back here through `finish`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from .block_manager import NO_MATCH, BlockManager
from .errors import InvalidRequest
from .output import SequenceOutput
from .request import FinishReason, RequestOutput, Resumed, SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence
from .tokenizer import Tokenizer
from .validation import RequestChecks


@dataclass(frozen=True, slots=True)
class Reserved:
    """A reservation's blocks, in order; the first `cached` of them hold the prompt's K/V already (cached)."""

    blocks: list[int]
    cached: int = 0


class Requests:
    def __init__(self, checks: RequestChecks, blocks: BlockManager, scheduler: Scheduler, tokenizer: Tokenizer,
                 seed: int | None) -> None:
        self._checks = checks
        self._blocks = blocks
        self._scheduler = scheduler
        self._tokenizer = tokenizer
        self._seqs: dict[str, Sequence] = {}  # the queued requests
        self._rng = random.Random(seed)  # seeds of sampled requests that bring none

    def add(self, request_id: str, prompt: str | Seq[int], params: SamplingParams, prefill_only: bool,
            resumed: Resumed | None) -> list[int]:
        """Queues a request computed here from its prompt; returns the prompt's token ids."""
        self._checks.new_id(request_id, self._seqs)
        if isinstance(prompt, str) and not prompt:
            raise InvalidRequest("prompt", "is empty")
        ids = self._tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._checks.prompt(ids)
        seq = self._sequence(request_id, ids, params, resumed)
        seq.prefill_only = prefill_only
        self._queue(seq)
        return ids

    def reserve(self, request_id: str, prompt_len: int, max_tokens: int,
                token_ids: Seq[int] | None = None) -> Reserved:
        """Allocates the blocks a prompt's K/V will be written into. `token_ids`, the prompt's (`prompt_len` of
        them), are looked up in the prefix cache: the cached blocks they start with are held for the reservation
        and only the K/V of the rest is to be written (`Reserved.cached`)."""
        self._checks.new_id(request_id, self._seqs)
        match = NO_MATCH
        if token_ids:
            ids = list(token_ids)
            self._checks.reserved_tokens(ids, prompt_len)
            match = self._blocks.match(ids)
        self._checks.reservation(request_id, prompt_len, max_tokens, match)
        if token_ids and self._blocks.caching:
            self._blocks.attach(request_id, match, prompt_len)
        self._blocks.grow(request_id, prompt_len)
        return Reserved(list(self._blocks.table(request_id)), len(match.blocks))

    def hold_prefix(self, request_id: str, token_ids: Seq[int], num_blocks: int) -> Reserved:
        """Holds blocks for the first `num_blocks` full blocks of `token_ids` under `request_id`: the cached ones
        they start with, then fresh ones whose K/V are to be written from elsewhere (the pull path: a decode node
        sends them). `commit_held` names them once they are in; `release` lets go either way. Not counted as a
        prefix-cache lookup (the request that follows is)."""
        self._checks.new_id(request_id, self._seqs)
        tokens = num_blocks * self._blocks.block_size
        ids = list(token_ids)
        if not 0 < tokens < len(ids):
            raise InvalidRequest("num_blocks", f"{num_blocks} blocks of a {len(ids)}-token prompt (its last block "
                                 "is always computed)")
        self._checks.reserved_tokens(ids[:tokens], tokens)
        match = self._blocks.match(ids, limit=num_blocks)
        self._checks.reservation(request_id, tokens, 0, match)
        self._blocks.attach(request_id, match, tokens, count=False)
        self._blocks.grow(request_id, tokens)
        return Reserved(list(self._blocks.table(request_id)), len(match.blocks))

    def commit_held(self, request_id: str, token_ids: Seq[int]) -> None:
        """The K/V of every block `hold_prefix` holds are in: they are named, for the request that follows (and
        any other) to attach."""
        table = self._blocks.table(request_id)
        self._blocks.commit(request_id, list(token_ids), len(table) * self._blocks.block_size)

    def adopt(self, request_id: str, prompt: Seq[int], params: SamplingParams, resumed: Resumed | None) -> Sequence:
        """Queues the sequence of a reservation whose prompt K/V (and `resumed` tokens' K/V) are in its blocks;
        its first token, sampled elsewhere, is the caller's to add."""
        if not self._blocks.table(request_id):
            raise InvalidRequest("request_id", f"{request_id!r} holds no reservation on this engine")
        seq = self._sequence(request_id, list(prompt), params, resumed)  # the first token's index was 0
        if not self._blocks.holds_prefix(request_id, seq.token_ids):
            raise InvalidRequest("prompt_token_ids", "differ from the tokens reserved for them (the reservation's "
                                 "cached blocks hold another prompt's K/V)")
        seq.num_computed = seq.num_tokens
        # Their K/V are final: named now, so a request that ends with its first token leaves them cached too.
        self._blocks.commit(request_id, seq.token_ids, seq.num_computed)
        self._queue(seq)
        return seq

    def compute_rest(self, request_id: str, prompt: Seq[int], params: SamplingParams,
                     resumed: Resumed | None) -> Sequence:
        """Queues the sequence of a reservation whose cached blocks hold the K/V of its first tokens: the rest of
        its prompt (and `resumed` tokens) is computed here, into the reserved blocks, and its first token sampled
        here (conditional disaggregation: no prefill node involved)."""
        if not self._blocks.table(request_id):
            raise InvalidRequest("request_id", f"{request_id!r} holds no reservation on this engine")
        seq = self._sequence(request_id, list(prompt), params, resumed)
        if not self._blocks.holds_prefix(request_id, seq.token_ids):
            raise InvalidRequest("prompt_token_ids", "differ from the tokens reserved for them (the reservation's "
                                 "cached blocks hold another prompt's K/V)")
        seq.num_computed = min(self._blocks.cached_tokens(request_id), seq.num_tokens - 1)
        self._queue(seq)
        return seq

    def fork(self, parent_id: str, child_id: str, prompt: Seq[int], params: SamplingParams,
             resumed: Resumed | None) -> int:
        """Queues a request that shares the full blocks of `prompt` a parent holds below its last prompt token;
        returns how many tokens it shares (see `LLMEngine.fork`)."""
        self._checks.new_id(child_id, self._seqs)
        ids = list(prompt)
        self._checks.prompt(ids)
        self._checks.fork_parent(parent_id, ids, self._seqs.get(parent_id))
        seq = self._sequence(child_id, ids, params, resumed)
        # It computes its last prompt token itself (its logits give its first token) and never writes into a
        # shared block: the scheduler grows its table past the shared ones.
        shared = (len(ids) - 1) // self._blocks.block_size
        self._blocks.fork(parent_id, child_id, shared)
        seq.num_computed = shared * self._blocks.block_size
        self._queue(seq)
        return seq.num_computed

    def finish(self, seq: Sequence) -> None:
        """A queued sequence goes: it ended, or was handed over (the KV sink copied its blocks)."""
        self._scheduler.finish(seq)
        del self._seqs[seq.request_id]

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stops a queued request and frees its blocks at once; its last output, or None if it is not queued."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return None
        self._scheduler.finish(seq)
        seq.finish_reason = FinishReason.ABORT
        return RequestOutput(request_id, seq.output.num_tokens, [], [], "", FinishReason.ABORT)

    def release(self, request_id: str) -> tuple[int, RequestOutput | None]:
        """Frees whatever is held for a request, queued or reserved: (blocks freed, the abort output or None)."""
        before = self._blocks.num_free
        out = self.abort(request_id)
        self._blocks.free(request_id)
        return self._blocks.num_free - before, out

    def abort_all(self) -> None:
        for request_id in list(self._seqs):
            self.abort(request_id)

    def _sequence(self, request_id: str, ids: list[int], params: SamplingParams, resumed: Resumed | None) -> Sequence:
        max_len = self._checks.fits(len(ids), params.max_tokens)
        seed = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        seq = Sequence(request_id, list(ids), len(ids), params, max_len, seed)
        seq.output = SequenceOutput(self._tokenizer, ids, params)
        if resumed and resumed.token_ids:
            self._replay(seq, resumed)
        return seq

    def _replay(self, seq: Sequence, resumed: Resumed) -> None:
        """A resumed stream's delivered tokens, put back: computed with the prompt, never emitted again, and
        counted by the sampler as generated ones (penalties, the index of the next token)."""
        ids = list(resumed.token_ids)
        self._checks.resumed(ids, seq.params, seq.num_tokens, seq.max_len)
        seq.token_ids.extend(ids)
        seq.logprobs.extend([0.0] * len(ids))
        if seq.params.top_logprobs:
            seq.top_logprobs.extend([None] * len(ids))
        seq.output.replay(ids, resumed.text_chars)

    def _queue(self, seq: Sequence) -> None:
        self._seqs[seq.request_id] = seq
        self._scheduler.add(seq)
