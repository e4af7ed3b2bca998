"""The block manager and the scheduler on made-up sequences: no model, no torch compute."""

from __future__ import annotations

from baton.engine.block_manager import BlockManager
from baton.engine.request import SamplingParams
from baton.engine.scheduler import Scheduler, SchedulerConfig
from baton.engine.sequence import Sequence, SequenceStatus


def seq(rid: str, prompt_len: int) -> Sequence:
    return Sequence(rid, list(range(prompt_len)), prompt_len, SamplingParams(), 10_000, None)


def run_step(sched: Scheduler) -> dict[str, int]:
    """Schedules one step and pretends the model ran it (one new token for each finished prefill)."""
    step = sched.schedule()
    for s, n in zip(step.seqs, step.num_tokens):
        s.num_computed += n
        if s.num_computed == s.num_tokens:
            s.token_ids.append(0)
    return {s.request_id: n for s, n in zip(step.seqs, step.num_tokens)}


def test_block_manager_accounting():
    bm = BlockManager(num_blocks=10, block_size=4)
    assert bm.blocks_for(0) == 0 and bm.blocks_for(4) == 1 and bm.blocks_for(5) == 2
    bm.grow("a", 9)
    assert len(bm.table("a")) == 3 and bm.num_free == 7
    bm.grow("a", 12)  # still fits in 3 blocks
    assert bm.num_free == 7
    assert bm.can_hold("b", 28) and not bm.can_hold("b", 29)
    assert bm.free("a") == 3 and bm.free("a") == 0
    assert bm.num_free == 10 and len(set(bm._free)) == 10


def test_admission_respects_max_num_seqs_and_token_budget():
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=20, chunked_prefill=False),
                      BlockManager(100, 4))
    for rid, n in (("a", 8), ("b", 8), ("c", 3)):
        sched.add(seq(rid, n))
    assert run_step(sched) == {"a": 8, "b": 8}  # c waits: max_num_seqs
    assert run_step(sched) == {"a": 1, "b": 1}
    sched.finish(sched.running[0])
    assert run_step(sched) == {"b": 1, "c": 3}


def test_prompt_waits_for_budget_without_chunking_and_is_split_with_it():
    plain = Scheduler(SchedulerConfig(8, 10, chunked_prefill=False), BlockManager(100, 4))
    plain.add(seq("a", 4))
    plain.add(seq("b", 9))
    assert run_step(plain) == {"a": 4}  # b's 9 tokens do not fit the 6 left
    assert run_step(plain) == {"a": 1, "b": 9}

    chunked = Scheduler(SchedulerConfig(8, 10, chunked_prefill=True), BlockManager(100, 4))
    chunked.add(seq("a", 4))
    chunked.add(seq("b", 9))
    assert run_step(chunked) == {"a": 4, "b": 6}
    assert run_step(chunked) == {"a": 1, "b": 3}  # decodes first, then the rest of b's prompt
    assert run_step(chunked) == {"a": 1, "b": 1}


def test_preemption_frees_the_newest_and_requeues_it_first():
    bm = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(SchedulerConfig(8, 100, chunked_prefill=False), bm)
    a, b = seq("a", 8), seq("b", 8)
    sched.add(a)
    sched.add(b)
    assert run_step(sched) == {"a": 8, "b": 8} and bm.num_free == 0
    step = sched.schedule()  # a needs a third block: b is preempted
    assert [s.request_id for s in step.preempted] == ["b"]
    assert [s.request_id for s in step.seqs] == ["a"]
    assert b.status is SequenceStatus.WAITING and b.num_computed == 0 and sched.waiting[0] is b
    assert bm.table("b") == [] and len(bm.table("a")) == 3


def test_finish_frees_and_is_idempotent():
    bm = BlockManager(8, 4)
    sched = Scheduler(SchedulerConfig(8, 100, chunked_prefill=False), bm)
    a = seq("a", 10)
    sched.add(a)
    run_step(sched)
    sched.finish(a)
    sched.finish(a)
    assert bm.num_free == 8 and not sched.has_unfinished()
