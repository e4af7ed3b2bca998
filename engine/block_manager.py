"""Owns every KV block: a free list, one block table per sequence, and a reference count per block (a forked
sequence shares its parent's prompt blocks). Nothing else allocates or frees."""

from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[str, list[int]] = {}
        self._refs = [0] * num_blocks  # how many tables hold each block; a block is free when it is 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, seq_id: str) -> list[int]:
        return self._tables.get(seq_id, [])

    def refs(self, block: int) -> int:
        """How many sequences (or reservations) hold `block`."""
        return self._refs[block]

    def can_hold(self, seq_id: str, num_tokens: int) -> bool:
        """Whether the sequence could grow to hold `num_tokens` tokens with the blocks free now (a forked
        sequence's shared blocks are in its table, so they count as held)."""
        return self.blocks_for(num_tokens) - len(self.table(seq_id)) <= len(self._free)

    def grow(self, seq_id: str, num_tokens: int) -> None:
        table = self._tables.setdefault(seq_id, [])
        missing = self.blocks_for(num_tokens) - len(table)
        if missing > len(self._free):
            raise RuntimeError(f"{seq_id}: {missing} blocks needed, {len(self._free)} free (check can_hold first)")
        for _ in range(missing):
            block = self._free.popleft()
            self._refs[block] = 1
            table.append(block)

    def fork(self, parent_id: str, child_id: str, num_blocks: int) -> None:
        """Starts `child_id`'s table with the parent's first `num_blocks` blocks, shared: neither may write
        into them afterwards (the caller shares only full blocks whose K/V are final)."""
        if self._tables.get(child_id):
            raise ValueError(f"{child_id}: already holds blocks")
        parent = self._tables.get(parent_id, [])
        if not 0 <= num_blocks <= len(parent):
            raise ValueError(f"{parent_id}: holds {len(parent)} blocks, {num_blocks} to share")
        shared = parent[:num_blocks]
        for block in shared:
            self._refs[block] += 1
        self._tables[child_id] = shared

    def free(self, seq_id: str) -> int:
        """Drops the sequence's hold on its blocks; freeing twice is harmless. Blocks no one else holds go back
        to the pool. Returns how many did."""
        table = self._tables.pop(seq_id, [])
        before = len(self._free)
        for block in table:
            self._refs[block] -= 1
            if not self._refs[block]:
                self._free.append(block)
        return len(self._free) - before
