"""What a sequence hands out: its text, built token by token, and how much of it and of its tokens went out.

States: streaming (each generated token's text is added; the last `stops.held_back` characters wait, since a
stop string could start there) → finished (the detokenizer flushed, the text cut at a stop string, and all of
it handed out by the last `emit`). A resumed stream starts streaming from what its client already has
(`replay`). One `SequenceOutput` per sequence, written only by the engine's thread; the router replays a
stream's end through one too (`router/resume.py`), so that both build the text the same way. Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

from .detokenizer import IncrementalDetokenizer
from .errors import InvalidRequest
from .request import RequestOutput, SamplingParams
from .stops import held_back, stop_at
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .sequence import Sequence


class SequenceOutput:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: Seq[int], params: SamplingParams) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._params = params
        self.text = ""  # the generated text so far (cut at a stop string)
        self.num_chars = 0  # characters of `text` handed out
        self.num_tokens = 0  # generated tokens handed out

    def replay(self, token_ids: Seq[int], text_chars: int) -> None:
        """A resumed stream's delivered tokens and the characters of their text its client has: the text as
        the first engine built it (the same detokenizer, fed the same tokens one by one)."""
        for token in token_ids:
            self.text += self._detokenizer.push([token])
        if not 0 <= text_chars <= len(self.text):
            raise InvalidRequest("resumed.text_chars", f"{text_chars} characters delivered, the tokens make "
                                 f"{len(self.text)}")
        self.num_chars = text_chars
        self.num_tokens = len(token_ids)

    def add(self, token: int, num_output_tokens: int, finishing: bool) -> bool:
        """Adds a generated token's text (and, when it ends the request, whatever the detokenizer still holds);
        True if a stop string ends the text there (the text is cut). `num_output_tokens`: this one included."""
        delta = self._detokenizer.push([token])
        if finishing:
            delta += self._detokenizer.flush()
        self.text += delta
        cut = stop_at(self.text, len(self.text) - len(delta), self._params, num_output_tokens)
        if cut is None:
            return False
        self.text = self.text[:cut]
        return True

    def emit(self, seq: Sequence) -> RequestOutput:
        """The sequence's tokens and text not handed out yet (text that could start a stop string waits)."""
        hold = 0 if seq.finish_reason is not None else held_back(self._params)
        end = max(self.num_chars, len(self.text) - hold)
        text = self.text[self.num_chars:end]
        self.num_chars = end
        first = self.num_tokens
        out = RequestOutput(seq.request_id, first, seq.output_ids[first:], seq.logprobs[first:], text,
                            seq.finish_reason, seq.top_logprobs[first:] if self._params.top_logprobs else [])
        self.num_tokens = seq.num_output_tokens
        return out
