"""Turns a scheduled step into tensors, runs the model over the paged KV cache, returns logits to sample."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .attention import AttentionMetadata, DecodeGroup, PrefillSpan
from .block_manager import BlockManager
from .config import ModelConfig
from .model import CausalLM
from .sequence import Sequence


class KVCache:
    """One pool per layer, `[num_blocks, 2, block_size, num_kv_heads, head_dim]`: a block of one layer is one
    contiguous slice, so it can be sent to another process as it is."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: str):
        shape = (cfg.num_layers, num_blocks, 2, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.storage = torch.zeros(shape, dtype=dtype, device=device)
        self.pools = list(self.storage.unbind(0))

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * elem


class ModelRunner:
    def __init__(self, model: CausalLM, kv: KVCache, blocks: BlockManager, device: str) -> None:
        self.model = model
        self.kv = kv
        self.blocks = blocks
        self.device = device

    @torch.inference_mode()
    def run(
        self, seqs: list[Sequence], num_tokens: list[int], after_layer: Callable[[int], None] | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """Computes `num_tokens[i]` tokens of each sequence (decodes, with one token, first).

        Returns logits `[S, vocab]` for the sequences whose last token was computed, and their indices.
        `after_layer(i)` runs as soon as layer i's K/V of this step are in the pools (KV transfer hooks here).
        """
        # Decode rows first (longest context first, for `_decode_groups`), then the prompt spans.
        def rank(i: int) -> tuple[bool, int]:
            is_decode = num_tokens[i] == 1 and seqs[i].num_computed > 0
            return (not is_decode, -seqs[i].num_computed if is_decode else 0)

        order = sorted(range(len(seqs)), key=rank)
        ids: list[int] = []
        positions: list[int] = []
        slot_blocks: list[int] = []
        slot_offsets: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillSpan] = []
        sample_rows: list[int] = []
        sample_seqs: list[int] = []
        bs = self.blocks.block_size
        for i in order:
            seq, n = seqs[i], num_tokens[i]
            start, end = seq.num_computed, seq.num_computed + n
            table = self.blocks.table(seq.request_id)
            row = len(ids)
            ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slot_blocks.extend(table[p // bs] for p in range(start, end))
            slot_offsets.extend(p % bs for p in range(start, end))
            if n == 1 and start > 0:
                decode_tables.append(table)
                decode_lens.append(end)
            else:
                used = table[: self.blocks.blocks_for(end)]
                prefills.append(PrefillSpan(row, n, end, torch.tensor(used, device=self.device)))
            if end == seq.num_tokens:
                sample_rows.append(row + n - 1)
                sample_seqs.append(i)

        meta = AttentionMetadata(
            slot_blocks=self._tensor(slot_blocks),
            slot_offsets=self._tensor(slot_offsets),
            decode_groups=self._decode_groups(decode_tables, decode_lens),
            prefills=prefills,
        )
        hidden = self.model(self._tensor(ids), self._tensor(positions), self.kv.pools, meta, after_layer)
        logits = self.model.compute_logits(hidden[self._tensor(sample_rows)])
        return logits, sample_seqs

    def _decode_groups(self, tables: list[list[int]], lens: list[int]) -> list[DecodeGroup]:
        """Splits the decode rows (longest context first) where padding to the group's longest would waste
        more than a quarter of the gathered K/V."""
        groups = []
        start = 0
        bs = self.blocks.block_size
        while start < len(tables):
            width = self.blocks.blocks_for(lens[start])
            end = start + 1
            while end < len(tables) and self.blocks.blocks_for(lens[end]) * 4 >= width * 3:
                end += 1
            padded = [t[:width] + [0] * (width - min(len(t), width)) for t in tables[start:end]]
            positions = torch.arange(width * bs, device=self.device)
            valid = positions[None, :] < self._tensor(lens[start:end])[:, None]
            groups.append(DecodeGroup(slice(start, end), self._tensor(padded), valid))
            start = end
        return groups

    def _tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)
