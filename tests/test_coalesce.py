"""Outputs that queue up while a node's event loop is busy go out as one message (`async_engine._coalesced`):
the tokens that are ready, together, in order, with nothing lost, on a real engine and event loop."""

from __future__ import annotations

import asyncio

from test_stories import PROMPTS

from baton.engine import LLM, FinishReason, SamplingParams
from baton.engine.async_engine import AsyncEngine, EngineFailed, _coalesced
from baton.engine.request import RequestOutput


def test_a_reader_that_fell_behind_gets_every_ready_token_in_one_output(stories_path, stories_llm: LLM):
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    [want] = stories_llm.generate([PROMPTS[0]], params)
    engine = LLM(str(stories_path), num_kv_blocks=32).engine

    async def run():
        ae = AsyncEngine(engine, asyncio.get_running_loop())
        try:
            outputs = ae.generate("r", PROMPTS[0], params)
            got = [await outputs.__anext__()]
            assert not got[0].finished  # (64 steps cannot all have run before the first read was served)
            while (await ae.load())[2]:  # the reader is busy elsewhere until the engine has done the request
                await asyncio.sleep(0.01)
            got += [out async for out in outputs]
            return got
        finally:
            await ae.close()

    got = asyncio.run(asyncio.wait_for(run(), 60))
    # The first read (one token, or more if the engine was quicker), then everything that had queued up behind
    # it: two outputs for 64 steps.
    assert len(got) == 2, [len(o.token_ids) for o in got]
    rest = got[1]
    assert rest.first_index == len(got[0].token_ids) and rest.finish_reason is FinishReason.LENGTH
    assert [t for out in got for t in out.token_ids] == want.token_ids
    assert "".join(out.text for out in got) == want.text
    assert len(rest.logprobs) == len(rest.token_ids)


def test_queued_outputs_merge_per_request_and_stop_at_an_engine_failure():
    def out(rid: str, index: int, tokens: list[int], finish=None) -> RequestOutput:
        return RequestOutput(rid, index, tokens, [-1.0] * len(tokens), "".join(f"<{t}>" for t in tokens), finish)

    queue: asyncio.Queue = asyncio.Queue()
    for item in (out("a", 1, [2]), out("b", 0, [7]), out("a", 2, [3, 4], FinishReason.STOP), out("b", 1, [8])):
        queue.put_nowait(item)
    a, b = _coalesced(out("a", 0, [1]), queue)
    assert (a.request_id, a.first_index, a.token_ids, a.text, a.finish_reason) == \
        ("a", 0, [1, 2, 3, 4], "<1><2><3><4>", FinishReason.STOP)
    assert (b.first_index, b.token_ids, b.logprobs, b.finish_reason) == (0, [7, 8], [-1.0, -1.0], None)
    failure = EngineFailed("step failed")
    queue.put_nowait(failure)
    queue.put_nowait(out("a", 5, [9]))  # after the failure: left for the next read, never merged past it
    assert _coalesced(out("a", 4, [5]), queue)[-1] is failure and queue.qsize() == 1
