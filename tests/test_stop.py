"""Stop strings, stop token ids, EOS and streaming text deltas, on stories260K's real outputs."""

from __future__ import annotations

from baton.engine import FinishReason, SamplingParams

PROMPT = "Once upon a time"


def greedy(llm, **kw):
    return llm.generate([PROMPT], SamplingParams(temperature=0, **kw))[0]


def test_stop_string_cuts_the_text_and_stops(stories_llm):
    full = greedy(stories_llm, max_tokens=60, ignore_eos=True)
    assert "Lily" in full.text
    out = greedy(stories_llm, max_tokens=60, ignore_eos=True, stop=["Lily"])
    assert out.finish_reason is FinishReason.STOP
    assert out.text == full.text[: full.text.index("Lily")]
    assert out.token_ids == full.token_ids[: len(out.token_ids)]  # stopped at the token completing "Lily"
    assert len(out.token_ids) < len(full.token_ids)
    kept = greedy(stories_llm, max_tokens=60, ignore_eos=True, stop=["Lily"], include_stop_str_in_output=True)
    assert kept.text == full.text[: full.text.index("Lily") + len("Lily")]


def test_earliest_of_several_stop_strings_wins(stories_llm):
    full = greedy(stories_llm, max_tokens=60, ignore_eos=True)
    out = greedy(stories_llm, max_tokens=60, ignore_eos=True, stop=["park", "girl"])
    assert out.text == full.text[: full.text.index("girl")]


def test_stop_token_ids(stories_llm):
    full = greedy(stories_llm, max_tokens=40, ignore_eos=True)
    target = full.token_ids[10]
    out = greedy(stories_llm, max_tokens=40, ignore_eos=True, stop_token_ids=[target])
    assert out.finish_reason is FinishReason.STOP
    assert out.token_ids == full.token_ids[: full.token_ids.index(target) + 1]


def test_eos_ends_with_eos_reason_unless_ignored(stories_llm):
    out = greedy(stories_llm, max_tokens=400)
    assert out.finish_reason is FinishReason.EOS and out.token_ids[-1] in (1, 2)
    assert "</s>" not in out.text and "<s>" not in out.text
    longer = greedy(stories_llm, max_tokens=len(out.token_ids) + 20, ignore_eos=True)
    assert longer.finish_reason is FinishReason.LENGTH
    assert longer.token_ids[: len(out.token_ids)] == out.token_ids


def test_stream_deltas_add_up_and_never_show_part_of_a_stop_string(stories_llm):
    full = greedy(stories_llm, max_tokens=80, ignore_eos=True)
    stop = "to play"
    deltas = list(stories_llm.stream(PROMPT, SamplingParams(temperature=0, max_tokens=80, ignore_eos=True,
                                                            stop=[stop])))
    text = "".join(d.text for d in deltas)
    assert text == full.text[: full.text.index(stop)]
    shown = ""
    for d in deltas:
        shown += d.text
        assert stop not in shown
    assert deltas[-1].finish_reason is FinishReason.STOP
    ids = [t for d in deltas for t in d.token_ids]
    assert [d.first_index for d in deltas] == [sum(len(x.token_ids) for x in deltas[:i]) for i in range(len(deltas))]
    assert ids == full.token_ids[: len(ids)]


def test_stream_without_stop_strings_emits_text_as_tokens_arrive(stories_llm):
    deltas = list(stories_llm.stream(PROMPT, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)))
    assert len(deltas) == 30  # one engine step, one token, one delta each
    assert sum(1 for d in deltas if d.text) >= 20  # most tokens complete text at once
    assert "".join(d.text for d in deltas) == greedy(stories_llm, max_tokens=30, ignore_eos=True).text
