"""The checks a request passes before the engine holds anything for it.

Each refusal is an `InvalidRequest` naming the field (or `NoCapacity`: a reservation the free blocks cannot
take now, which may pass later). Stateless: it reads the model's limits and the block manager's size and
tables, and changes nothing, so a refused request leaves the engine as it was.
"""

from __future__ import annotations

from collections.abc import Container, Sequence as Seq
from dataclasses import dataclass

from .block_manager import NO_MATCH, BlockManager, Match
from .errors import InvalidRequest, NoCapacity
from .request import SamplingParams
from .sequence import Sequence


@dataclass(frozen=True, slots=True)
class RequestChecks:
    vocab_size: int
    max_model_len: int
    blocks: BlockManager

    def new_id(self, request_id: str, live: Container[str]) -> None:
        """Refuses an id a live sequence or a block table (a reservation, a handed-over prompt) still uses."""
        if request_id in live or self.blocks.table(request_id):
            raise InvalidRequest("request_id", f"{request_id!r} is already in use on this engine")

    def prompt(self, ids: list[int]) -> None:
        if not ids:
            raise InvalidRequest("prompt", "is empty")
        self._token_ids("prompt", ids)
        if len(ids) >= self.max_model_len:
            raise InvalidRequest(
                "prompt", f"{len(ids)} tokens, the model's context is {self.max_model_len} (room for 1 new token)"
            )

    def fits(self, prompt_len: int, max_tokens: int) -> int:
        """The sequence's longest length; refuses what could not run even alone in the whole cache."""
        max_len = min(prompt_len + max_tokens, self.max_model_len)
        if self.blocks.blocks_for(max_len) > self.blocks.num_blocks:
            capacity = self.blocks.num_blocks * self.blocks.block_size
            field = "prompt" if self.blocks.blocks_for(prompt_len + 1) > self.blocks.num_blocks else "max_tokens"
            raise InvalidRequest(
                field, f"{prompt_len} prompt + {max_tokens} new tokens exceed the KV cache ({capacity} tokens)"
            )
        return max_len

    def reservation(self, request_id: str, prompt_len: int, max_tokens: int, match: Match = NO_MATCH) -> None:
        """A decode node's reservation for a prompt another node computes: its length, and room for it now (after
        attaching `match`, its cached blocks)."""
        if prompt_len < 1 or prompt_len >= self.max_model_len:
            raise InvalidRequest("prompt", f"{prompt_len} tokens, the model's context is {self.max_model_len}")
        self.fits(prompt_len, max_tokens)
        if not self.blocks.can_hold(request_id, prompt_len, match):
            needed = self.blocks.blocks_for(prompt_len) - len(match.blocks)
            raise NoCapacity(f"{needed} KV blocks needed, {self.blocks.num_free - match.reclaimed} free")

    def reserved_tokens(self, ids: list[int], prompt_len: int) -> None:
        """The token ids a reservation is looked up by: real ids, as many as it reserves for."""
        self._token_ids("token_ids", ids)
        if len(ids) != prompt_len:
            raise InvalidRequest("token_ids", f"{len(ids)} token ids for a {prompt_len}-token reservation")

    def resumed(self, ids: Seq[int], params: SamplingParams, prompt_len: int, max_len: int) -> None:
        """A resumed stream's delivered tokens: real ids, and room for at least one more token after them."""
        self._token_ids("resumed.token_ids", ids)
        if len(ids) >= params.max_tokens or prompt_len + len(ids) >= max_len:
            raise InvalidRequest("resumed.token_ids", f"{len(ids)} tokens delivered: the stream has no room left "
                                 f"(max_tokens {params.max_tokens})")

    def fork_parent(self, parent_id: str, ids: list[int], parent: Sequence | None) -> None:
        """A parent whose blocks hold `ids`' K/V: enough of them, and (a sequence here) of this prompt, computed."""
        table = self.blocks.table(parent_id)
        if len(table) < self.blocks.blocks_for(len(ids)):
            raise InvalidRequest("request_id", f"{parent_id!r} holds {len(table)} KV blocks on this engine, "
                                 f"a {len(ids)}-token prompt fills {self.blocks.blocks_for(len(ids))}")
        if parent is not None:
            if parent.token_ids[: len(ids)] != ids:
                raise InvalidRequest("prompt", f"is not the start of {parent_id!r}'s tokens")
            if parent.num_computed < len(ids):
                raise InvalidRequest("request_id", f"{parent_id!r} has not computed the prompt yet")

    def _token_ids(self, field: str, ids: Seq[int]) -> None:
        if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in ids):
            raise InvalidRequest(field, f"token ids must be integers in [0, {self.vocab_size})")
