"""Content rules: what prompts and generated text may not contain, kept in etcd and applied live by every router
(router/rules.py); `baton rules` writes them.

A rule is a regular expression or a list of terms (matched as words, case-insensitive unless said), on prompts,
on output or both, for every key or for keys named. Output is screened as it streams: a router holds back the
last `window` characters, so any match up to `window` characters long is seen whole before any of it is sent.
A pattern's longest match is worked out from the pattern itself; a pattern without a bound (`.*`, `+`) counts
as `window` characters, and a longer match of it can slip out (set `window` to what it should cover).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from re import _parser as sre_parse  # the width of a pattern's matches (stdlib; no public API for it)

from .membership import record_from_json

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
TARGETS = ("prompt", "output")
DEFAULT_WINDOW = 256  # characters held back for an unbounded pattern
MAX_WINDOW = 4096


def rules_prefix(cluster: str) -> str:
    return f"/baton/{cluster}/rules/"


@dataclass(frozen=True, slots=True)
class RuleRecord:
    name: str
    regex: str = ""  # one of regex or terms
    terms: list[str] = field(default_factory=list)
    on: list[str] = field(default_factory=lambda: list(TARGETS))  # what it screens
    keys: list[str] = field(default_factory=list)  # the key names it applies to; empty: every caller
    case_sensitive: bool = False
    window: int = 0  # characters a match may span at most; 0: the pattern's own longest match

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME.fullmatch(self.name):
            raise ValueError(f"RuleRecord.name must be letters, digits, '_', '.', '-' (64 at most), got "
                             f"{self.name!r}")
        if bool(self.regex) == bool(self.terms):
            raise ValueError("RuleRecord: give a regex or terms, not both or neither")
        if not isinstance(self.regex, str):
            raise ValueError(f"RuleRecord.regex must be a string, got {self.regex!r}")
        if not isinstance(self.terms, list) or not all(isinstance(t, str) and t.strip() for t in self.terms):
            raise ValueError(f"RuleRecord.terms must be a list of non-empty strings, got {self.terms!r}")
        if not isinstance(self.on, list) or not self.on or not set(self.on) <= set(TARGETS):
            raise ValueError(f"RuleRecord.on must list some of {TARGETS}, got {self.on!r}")
        if not isinstance(self.keys, list) or not all(isinstance(k, str) and k for k in self.keys):
            raise ValueError(f"RuleRecord.keys must be a list of key names, got {self.keys!r}")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or not 0 <= self.window <= MAX_WINDOW:
            raise ValueError(f"RuleRecord.window must be an integer in [0, {MAX_WINDOW}], got {self.window!r}")
        self.compiled()  # a pattern that does not compile is refused here

    def pattern(self) -> str:
        if self.regex:
            return self.regex
        # Terms match as whole words (a term that starts or ends with a non-word character, as written).
        return "|".join(rf"(?<!\w){re.escape(t.strip())}(?!\w)" for t in sorted(self.terms, key=len, reverse=True))

    def compiled(self) -> re.Pattern:
        try:
            return re.compile(self.pattern(), 0 if self.case_sensitive else re.IGNORECASE)
        except re.error as e:
            raise ValueError(f"RuleRecord.regex does not compile: {e}") from None

    def span(self) -> int:
        """The most characters one match can span: `window`, else the pattern's longest match (capped)."""
        if self.window:
            return self.window
        longest = sre_parse.parse(self.pattern()).getwidth()[1]
        return min(longest, DEFAULT_WINDOW) if longest < sre_parse.MAXREPEAT else DEFAULT_WINDOW

    def applies(self, target: str, key_name: str | None) -> bool:
        return target in self.on and (not self.keys or key_name in self.keys)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> RuleRecord:
        return record_from_json(cls, data)
