"""Content rules in the router (common/rules.py): a prompt a rule matches is refused (INVALID_ARGUMENT naming
the rule); output is screened as it streams, and a match ends the stream with finish reason `content_filter`
before any of the matched text is sent.

Every screen has the same interface (`ContentFilter`): `check_prompt` and `screen` (a per-stream `OutputScreen`).
`RuleStore` is the built-in one, the rules etcd holds, followed live: a change counts from the next request,
and a stream in flight keeps the rules it started with. An external moderation service would plug in as
another `ContentFilter`, with its own fail policy.

The output screen holds back responses until the text after them is at least `span` characters long (`span`: the
longest match of the rules that apply), so a match is seen whole, wherever token and chunk boundaries fall,
before any response that carries part of it is relayed. That costs latency: a token waits for `span` characters
of text after it (bench/traffic.py measures it).
"""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Callable
from typing import Protocol

import aetcd

from baton.common.keys import KeyRecord
from baton.common.membership import PrefixFollower
from baton.common.rules import RuleRecord, rules_prefix
from baton.v1 import baton_pb2 as pb

log = logging.getLogger(__name__)


class Blocked(Exception):
    """A prompt a content rule matched (INVALID_ARGUMENT)."""

    def __init__(self, rule: str, detail: str = "") -> None:
        super().__init__(f"blocked by content rule {rule!r}" + (f" ({detail})" if detail else ""))
        self.rule = rule


class FilterUnavailable(Exception):
    """A filter that cannot decide now, and fails closed (UNAVAILABLE)."""


class OutputScreen:
    """One stream's screen: `push(response)` gives the responses that may be relayed now; `finish()` the rest
    (at the stream's end). Once a rule matches, `blocked` names it and nothing more is let through.

    A match that reaches the end of the text seen so far waits for the next text (a term "bad" at the end may
    yet be "badge"): `span` characters are held back, so it is still held when that text comes. The character
    before the held text is kept as context (a term must not match in the middle of a word)."""

    def __init__(self, rules: list[tuple[str, re.Pattern]], span: int) -> None:
        self._rules = rules
        self._keep = span  # characters held back after the last relayed response
        self._held: deque[pb.GenerateResponse] = deque()
        self._text = ""  # the held responses' text
        self._before = ""  # the last character relayed
        self.blocked: str | None = None

    def push(self, response: pb.GenerateResponse) -> list[pb.GenerateResponse]:
        if self.blocked is not None:
            return []
        self._held.append(response)
        self._text += response.chunk.text
        if (found := self._scan(final=False)) is not None:
            return self._block(*found)
        out = []
        while self._held and len(self._text) - len(self._held[0].chunk.text) >= self._keep:
            first = self._held.popleft()
            if first.chunk.text:
                self._before = first.chunk.text[-1]
                self._text = self._text[len(first.chunk.text):]
            out.append(first)
        return out

    def finish(self) -> list[pb.GenerateResponse]:
        """The held responses, once the stream has ended (those before a match, if one is found now)."""
        if self.blocked is not None:
            return []
        if (found := self._scan(final=True)) is not None:
            return self._block(*found)
        out, self._held, self._text = list(self._held), deque(), ""
        return out

    def _scan(self, final: bool) -> tuple[str, int] | None:
        """The first rule that matches the held text, and where in it the match starts."""
        text, offset = self._before + self._text, len(self._before)
        for name, pattern in self._rules:
            for match in pattern.finditer(text, offset):
                if final or match.end() < len(text):
                    return name, match.start() - offset
        return None

    def _block(self, name: str, start: int) -> list[pb.GenerateResponse]:
        """The held responses wholly before the match; the others are dropped."""
        self.blocked = name
        out, end = [], 0
        for response in self._held:
            end += len(response.chunk.text)
            if end > start:
                break
            out.append(response)
        self._held.clear()
        self._text = ""
        return out


class ContentFilter(Protocol):
    async def check_prompt(self, text: Callable[[], str], key: KeyRecord | None) -> None:
        """Raises Blocked if the prompt (its text: `text()`, called only if needed) may not be one for `key`,
        FilterUnavailable if it cannot tell now."""

    def screen(self, key: KeyRecord | None) -> OutputScreen | None:
        """A screen for one stream's output (None: nothing to screen)."""


class RuleStore(PrefixFollower):
    """The cluster's content rules as etcd holds them (`rules = await RuleStore.start(url, cluster)`)."""

    def __init__(self, etcd_url: str, cluster: str, *, rpc_timeout: float = 5.0) -> None:
        super().__init__(etcd_url, rules_prefix(cluster), rpc_timeout=rpc_timeout)
        self._records: dict[str, RuleRecord] = {}
        self._compiled: dict[str, tuple[re.Pattern, int]] = {}  # by rule name: pattern, span

    @classmethod
    async def start(cls, etcd_url: str, cluster: str, *, rpc_timeout: float = 5.0) -> RuleStore:
        store = cls(etcd_url, cluster, rpc_timeout=rpc_timeout)
        await store._follow()
        return store

    def _applying(self, target: str, key: KeyRecord | None) -> list[str]:
        name = key.name if key is not None else None
        return [r.name for r in self._records.values() if r.applies(target, name)]

    async def check_prompt(self, text: Callable[[], str], key: KeyRecord | None) -> None:
        for name in self._applying("prompt", key):
            if self._compiled[name][0].search(text()):
                raise Blocked(name)

    def screen(self, key: KeyRecord | None) -> OutputScreen | None:
        names = self._applying("output", key)
        if not names:
            return None
        return OutputScreen([(n, self._compiled[n][0]) for n in names], max(self._compiled[n][1] for n in names))

    def _load(self, kvs) -> None:
        self._records, self._compiled = {}, {}
        for kv in kvs:
            self._put(kv.key, kv.value)

    def _event(self, event: aetcd.Event) -> None:
        if event.kind == aetcd.EventKind.PUT:
            self._put(event.kv.key, event.kv.value)
        else:
            name = event.kv.key.decode(errors="replace").removeprefix(self._prefix)
            self._records.pop(name, None)
            self._compiled.pop(name, None)

    def _put(self, key: bytes, value: bytes) -> None:
        # A rule that does not parse (hand-made, another version) is skipped, and said: it screens nothing.
        try:
            record = RuleRecord.from_json(value)
        except ValueError as e:
            log.warning("ignoring the content rule at %r: %s", key, e)
            return
        if key.decode(errors="replace") != f"{self._prefix}{record.name}":
            log.warning("ignoring the content rule at %r: it names rule %s", key, record.name)
            return
        self._records[record.name] = record
        self._compiled[record.name] = (record.compiled(), record.span())
