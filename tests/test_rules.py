"""Content rules (common/rules.py, router/rules.py) on their own: records refuse what cannot work, and the output
screen never lets a match through, wherever token and chunk boundaries cut it, without blocking text that only
looks like a match until the next character."""

from __future__ import annotations

import itertools

import pytest

from baton.common.rules import DEFAULT_WINDOW, RuleRecord
from baton.router.rules import OutputScreen
from baton.v1 import baton_pb2 as pb


def screen(*records: RuleRecord) -> OutputScreen:
    return OutputScreen([(r.name, r.compiled()) for r in records], max(r.span() for r in records))


def relay(s: OutputScreen, pieces: list[str]) -> tuple[str, str | None]:
    """The text a client gets when the stream's chunks carry `pieces`, and the rule that ended it."""
    out = []
    for i, piece in enumerate(pieces):
        out += s.push(pb.GenerateResponse(chunk=pb.TokenChunk(index=i, token_ids=[i], text=piece)))
    out += s.finish()
    return "".join(r.chunk.text for r in out), s.blocked


def splits(text: str, cuts: int):
    """Every way to cut `text` into `cuts + 1` pieces (empty pieces included: tokens that add no text yet)."""
    for points in itertools.combinations_with_replacement(range(len(text) + 1), cuts):
        bounds = (0, *points, len(text))
        yield [text[a:b] for a, b in zip(bounds, bounds[1:])]


def test_records_refuse_what_cannot_work():
    for bad in ({"name": "x", "regex": "(", "on": ["output"]}, {"name": "x"}, {"name": "x", "regex": "a",
                "terms": ["b"]}, {"name": "x y", "regex": "a"}, {"name": "x", "terms": ["a"], "on": ["input"]},
                {"name": "x", "terms": ["a"], "window": -1}, {"name": "x", "terms": [" "]}):
        with pytest.raises(ValueError):
            RuleRecord(**bad)
    assert RuleRecord("t", terms=["secret plan"]).span() == len("secret plan")
    assert RuleRecord("r", regex=r"\d{3}-\d{4}").span() == 8
    assert RuleRecord("u", regex=r"key=\w+").span() == DEFAULT_WINDOW
    assert RuleRecord("w", regex=r"key=\w+", window=40).span() == 40


def test_a_match_never_reaches_the_client_wherever_the_chunks_cut_it():
    rule = RuleRecord("plan", terms=["secret plan"])
    text = "We met. The Secret Plan was here. Then more."
    cut_at = text.index("The") + len("The ")  # what may be relayed: the text wholly before the match
    for pieces in itertools.chain(splits(text, 2), ([c for c in text],)):
        got, blocked = relay(screen(rule), pieces)
        assert blocked == "plan", pieces
        assert text.startswith(got) and len(got) <= cut_at, pieces  # so no part of the match either


def test_text_that_only_starts_like_a_match_goes_through():
    rule = RuleRecord("bad", terms=["bad"])
    for text in ("a badge and a badly made", "abad ones", "ba"):
        for pieces in splits(text, 2):
            assert relay(screen(rule), pieces) == (text, None), pieces
    got, blocked = relay(screen(rule), ["it is ", "ba", "d"])  # a match at the very end: found at the finish
    assert (got, blocked) == ("it is ", "bad")


def test_a_regex_across_chunks_and_the_held_back_text_is_bounded():
    rule = RuleRecord("phone", regex=r"\d{3}-\d{4}")
    for pieces in splits("call 555-1234 now", 3):
        got, blocked = relay(screen(rule), pieces)
        assert blocked == "phone" and "555" not in got, pieces
    s = screen(rule)
    released = []
    for i, ch in enumerate("x" * 100):
        released += s.push(pb.GenerateResponse(chunk=pb.TokenChunk(index=i, token_ids=[i], text=ch)))
        assert i + 1 - len(released) <= rule.span() + 1  # never more than the span held back
