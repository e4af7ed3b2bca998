"""Owns every KV block: a free list and one block table per sequence. Nothing else allocates or frees."""

from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, seq_id: str) -> list[int]:
        return self._tables.get(seq_id, [])

    def can_hold(self, seq_id: str, num_tokens: int) -> bool:
        """Whether the sequence could grow to hold `num_tokens` tokens with the blocks free now."""
        return self.blocks_for(num_tokens) - len(self.table(seq_id)) <= len(self._free)

    def grow(self, seq_id: str, num_tokens: int) -> None:
        table = self._tables.setdefault(seq_id, [])
        missing = self.blocks_for(num_tokens) - len(table)
        if missing > len(self._free):
            raise RuntimeError(f"{seq_id}: {missing} blocks needed, {len(self._free)} free (check can_hold first)")
        for _ in range(missing):
            table.append(self._free.popleft())

    def free(self, seq_id: str) -> int:
        """Returns the sequence's blocks to the pool; freeing twice is harmless. Returns how many were freed."""
        table = self._tables.pop(seq_id, [])
        self._free.extend(table)
        return len(table)
