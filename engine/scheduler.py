"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Each step has a token budget (`max_num_batched_tokens`). Running sequences go first, oldest first: a
decoding sequence needs one token, a sequence in chunked prefill the rest of its prompt (or what the budget
leaves). Waiting sequences are then admitted in arrival order while the budget, `max_num_seqs` and the free
KV blocks allow. When a running sequence needs a block and none is free, the newest running sequence is
preempted: its blocks are freed and it waits at the front of the queue, to be recomputed later.

Admission refuses any sequence that could not run even alone, so the oldest sequence can always proceed and
the loop never stalls.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import NO_MATCH, BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    chunked_prefill: bool


@dataclass(slots=True)
class ScheduledStep:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens to compute for each of `seqs`
    preempted: list[Sequence] = field(default_factory=list)

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_tokens.append(n)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            if not self._make_room(seq, seq.num_computed + n, step):
                break  # `seq` itself was preempted; everything after it too
            self.blocks.grow(seq.request_id, seq.num_computed + n)
            step.add(seq, n)
            budget -= n
            i += 1
        while self.waiting and budget > 0 and not step.preempted:
            if len(self.running) >= self.config.max_num_seqs:
                break
            seq = self.waiting[0]
            # An adopted or forked sequence arrives with K/V in its blocks already (num_computed); any other
            # starts after the cached blocks its tokens begin with (prefix caching; a preempted one too).
            looked_up = self.blocks.caching and not seq.num_computed
            match = self.blocks.match(seq.token_ids) if looked_up else NO_MATCH
            start = seq.num_computed or len(match.blocks) * self.blocks.block_size
            n = seq.num_tokens - start
            if n > budget:
                if not self.config.chunked_prefill:
                    break
                n = budget
            if not self.blocks.can_hold(seq.request_id, start + n, match):
                break
            self.waiting.popleft()
            if looked_up:
                self.blocks.attach(seq.request_id, match, seq.num_tokens)
                seq.num_computed = start
            self.blocks.grow(seq.request_id, seq.num_computed + n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            step.add(seq, n)
            budget -= n
        return step

    def _make_room(self, seq: Sequence, num_tokens: int, step: ScheduledStep) -> bool:
        """Preempts the newest running sequences until `seq` can hold `num_tokens`; False if `seq` went."""
        while not self.blocks.can_hold(seq.request_id, num_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            step.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.request_id)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Removes a finished or aborted sequence wherever it is and frees its blocks at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.blocks.free(seq.request_id)
