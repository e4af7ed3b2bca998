"""Streaming detokenization: turn generated ids into text deltas as they arrive.

Only a short window of ids is ever decoded (the prefix_offset / read_offset technique): `_ids` holds
the ids from prefix_offset on, `_read` is read_offset relative to it, and `_prefix_text` is the
decode of `_ids[:_read]`, i.e. text already emitted. Each push decodes the window and emits what
extends past `_prefix_text`; once it emits, the window slides to start at the old read_offset.
Text that ends in byte-fallback tokens is emitted one token late (see `push`), or by `flush`.
"""

from __future__ import annotations

from collections.abc import Sequence

from .tokenizer import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._special = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        self._byte_ids = tokenizer.byte_token_ids
        # The window must start where decoding is context-free: at an id that is decoded (not a
        # skipped special) and is not a byte-fallback token. Such an id ends any byte run before it,
        # so nothing earlier can change, and its text is non-empty, so a decoder that strips the
        # leading space of a decode strips it from the prefix and from the whole window alike.
        prompt = list(prompt_ids)
        start = len(prompt) - 1
        while start > 0 and not self._is_anchor(prompt[start]):
            start -= 1
        self._ids = prompt[max(start, 0):]
        self._read = len(self._ids)
        self._prefix_text = tokenizer.decode(self._ids, skip_special_tokens=skip_special_tokens)
        self._sealed = True
        self._pieces: list[str] = []

    def _is_anchor(self, token_id: int) -> bool:
        return token_id not in self._special and token_id not in self._byte_ids

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    def push(self, new_ids: Sequence[int]) -> str:
        for token_id in new_ids:
            self._ids.append(token_id)
            if token_id not in self._special:
                self._sealed = token_id not in self._byte_ids
        # ByteFallback decodes a run of byte tokens all at once and turns the whole run into U+FFFD
        # if any byte is invalid, so a later byte can rewrite text that already decoded fine. Text
        # is therefore held back until a non-byte token closes the run, not only while it ends in U+FFFD.
        if not self._sealed:
            return ""
        text = self._tok.decode(self._ids, skip_special_tokens=self._skip)
        if len(text) <= len(self._prefix_text) or text.endswith("\ufffd"):
            return ""
        return self._emit(text, slide=True)

    def flush(self) -> str:
        text = self._tok.decode(self._ids, skip_special_tokens=self._skip)
        if len(text) <= len(self._prefix_text):
            return ""
        return self._emit(text, slide=False)

    def _emit(self, text: str, slide: bool) -> str:
        delta = text[len(self._prefix_text):]
        self._pieces.append(delta)
        if slide:
            self._ids = self._ids[self._read:]
            self._read = len(self._ids)
            self._prefix_text = self._tok.decode(self._ids, skip_special_tokens=self._skip)
        else:
            self._read = len(self._ids)
            self._prefix_text = text
        return delta

