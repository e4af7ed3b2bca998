"""The stop-string rule (`engine/stops.py`) that the engine and the router's resume both follow, on plain text:
each token is the text it adds, fed as the engine feeds it."""

from __future__ import annotations

from baton.engine.request import SamplingParams
from baton.engine.stops import held_back, stop_at


def run(pieces: list[str], **params) -> tuple[list[str], int | None]:
    """The engine's loop over tokens that add `pieces`: what each step shows, and the token (its index) that
    a stop string ended the text at, or None."""
    p = SamplingParams(max_tokens=len(pieces), **params)
    text, shown, out = "", 0, []
    for i, piece in enumerate(pieces):
        text += piece
        cut = stop_at(text, len(text) - len(piece), p, i + 1)
        if cut is not None:
            text = text[:cut]
        end = len(text) if cut is not None or i == len(pieces) - 1 else max(shown, len(text) - held_back(p))
        out.append(text[shown:end])
        shown = end
        if cut is not None:
            return out, i
    return out, None


def test_the_text_ends_where_the_stop_string_starts_or_after_it_with_include_stop_str_in_output():
    assert run(["Once", " upon", " a", " time"], stop=[" a"]) == (["Onc", "e upo", "n"], 2)
    assert run(["Once", " upon", " a", " time"], stop=[" a"], include_stop_str_in_output=True) == \
        (["Onc", "e upo", "n a"], 2)


def test_a_stop_string_split_across_tokens_ends_the_text_at_the_token_that_completes_it():
    assert run(["The", " pa", "rk", " was"], stop=["park"]) == (["", "The", " "], 2)
    assert run(["The", " pa", "rk", " was"], stop=["park"], include_stop_str_in_output=True) == \
        (["", "The", " park"], 2)


def test_text_that_could_start_a_stop_string_is_held_back_until_the_next_token_decides():
    # Each step holds back the last len("lily") - 1 characters; "lil" turns out to be "lilac".
    assert run(["a", " lil", "ac", " tree"], stop=["lily"]) == (["", "a ", "li", "lac tree"], None)
    assert held_back(SamplingParams(stop=["lily", "ab"])) == 3
    assert held_back(SamplingParams()) == 0
    assert run(["a", " lil", "ac"]) == (["a", " lil", "ac"], None)  # no stop strings: nothing waits


def test_the_earliest_stop_string_wins_and_on_a_tie_the_first_listed():
    assert run(["girl in the park"], stop=["park", "girl"]) == ([""], 0)
    assert stop_at("xabcd", 0, SamplingParams(stop=["abcd", "ab"], include_stop_str_in_output=True), 1) == 5
    assert stop_at("xabcd", 0, SamplingParams(stop=["ab", "abcd"], include_stop_str_in_output=True), 1) == 3


def test_only_a_stop_string_that_ends_in_the_new_text_counts():
    params = SamplingParams(stop=["ab", "wxyz"])
    # "ab" lies within the last len("wxyz") - 1 characters of the old text, but it ended there: not new.
    assert stop_at("..ab", 4, params, 1) is None
    assert stop_at("..ab", 3, params, 1) == 2
    assert stop_at("..abwxyz", 4, params, 1) == 4
    assert stop_at("abcd", 4, SamplingParams(stop=["a", "d"]), 1) is None  # a token that added no text


def test_before_min_tokens_nothing_is_looked_for_and_what_came_before_is_let_be():
    assert run(["x", "stop", "y", "z"], stop=["stop"]) == (["", "x"], 1)
    assert run(["x", "stop", "y", "z"], stop=["stop"], min_tokens=3) == (["", "xs", "t", "opyz"], None)
    # Completed by the token that reaches min_tokens: it counts.
    assert run(["x", "st", "op", "z"], stop=["stop"], min_tokens=3) == (["", "", "x"], 2)


def test_the_router_ends_a_stream_where_the_engine_did(stories_llm):
    """`router/resume.end` (a stream whose tokens were delivered but whose Finish was lost) works out the end
    from the tokens alone: at every length, with stop strings split across tokens, the engine's text and reason."""
    from baton.router import resume
    from baton.v1 import baton_pb2 as pb

    prompt = "Once upon a time"
    [full] = stories_llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    tokenizer = stories_llm.engine.tokenizer
    base = len(tokenizer.decode(full.prompt_token_ids))
    ends = [len(tokenizer.decode(full.prompt_token_ids + full.token_ids[:i + 1])) - base for i in range(40)]
    split = full.text[ends[5] - 2:ends[5] + 2]  # two characters either side of where token 6 starts
    stops = ["Lily", split, "park. One", "zz"]
    reasons = {"length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP}
    all_params = [SamplingParams(max_tokens=k, temperature=0, ignore_eos=True, stop=stops,
                                 include_stop_str_in_output=include) for include in (False, True) for k in range(1, 41)]
    outs = stories_llm.generate([prompt] * len(all_params), all_params)
    assert {out.finish_reason.value for out in outs} == {"length", "stop"}
    for params, out in zip(all_params, outs):
        # The stream's tokens reached the client, none of its text (all of it held back): the router's rest.
        eos = stories_llm.engine.model_config.eos_token_ids
        responses = resume.end(tokenizer, full.prompt_token_ids, out.token_ids, 0, params, eos, "r")
        # One token short, a stream ended by a stop string or max_tokens goes on.
        assert resume.end(tokenizer, full.prompt_token_ids, out.token_ids[:-1], 0, params, eos, "r") is None
        assert "".join(r.chunk.text for r in responses if r.HasField("chunk")) == out.text, params
        assert responses[-1].finish.reason == reasons[out.finish_reason.value], params
