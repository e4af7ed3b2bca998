"""Turns a scheduled step into tensors, runs the model over the paged KV cache, returns logits to sample."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .attention import AttentionMetadata
from .block_manager import BlockManager
from .cuda_graphs import DecodeGraphs
from .config import ModelConfig
from .model import CausalLM
from .sequence import Sequence
from .shm import allocate_shm
from .tp_runtime import TPWorkers


class KVCache:
    """One pool per layer, `[num_blocks, 2, block_size, num_kv_heads, head_dim]`: a block of one layer is one
    contiguous slice, so it can be sent to another process as it is."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: str,
                 shared: bool = False, num_kv_heads: int | None = None):
        # A tensor-parallel rank's pool holds its KV heads only.
        shape = (cfg.num_layers, num_blocks, 2, block_size, num_kv_heads or cfg.num_kv_heads, cfg.head_dim)
        self.shm_path = ""  # on a CPU with `shared`: the /dev/shm file another process maps the storage from
        if shared and torch.device(device).type == "cpu":
            self.storage, self.shm_path = allocate_shm(shape, dtype, "kv")
        else:  # a CUDA allocation is shareable as it is (an IPC handle)
            self.storage = torch.zeros(shape, dtype=dtype, device=device)
        self.pools = list(self.storage.unbind(0))

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, num_kv_heads: int | None = None) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return cfg.num_layers * 2 * block_size * (num_kv_heads or cfg.num_kv_heads) * cfg.head_dim * elem


class ModelRunner:
    def __init__(self, model: CausalLM, kv: KVCache, blocks: BlockManager | None, device: str,
                 graphs: DecodeGraphs | None = None, workers: TPWorkers | None = None) -> None:
        self.model = model
        self.kv = kv
        self.blocks = blocks  # None on a tensor-parallel worker rank: rank 0 schedules
        self.device = device
        self.graphs = graphs  # decode-only steps replay a CUDA graph when they fit one
        self.workers = workers  # rank 0 of a tensor-parallel engine: each step's inputs go to the other ranks

    @torch.inference_mode()
    def run(
        self, seqs: list[Sequence], num_tokens: list[int], after_layer: Callable[[int], None] | None = None,
        kv_prompts: list[tuple[str, list[int]]] | None = None,
    ) -> tuple[torch.Tensor, list[int]]:
        """Computes `num_tokens[i]` tokens of each sequence (decodes, with one token, first).

        Returns logits `[S, vocab]` for the sequences whose last token was computed, and their indices.
        `after_layer(i)` runs as soon as layer i's K/V of this step are in the pools (KV transfer hooks here);
        `kv_prompts` (the KV sink's prompts) go to the other ranks, whose own sinks post their heads' sends.
        """
        inputs = self.prepare(seqs, num_tokens, kv_prompts or [])
        meta = inputs.meta
        if (self.graphs is not None and after_layer is None and not meta.num_prefills
                and self.graphs.fits(meta.num_decodes, meta.decode_block_tables.shape[1])):
            logits = self.graphs.run(inputs.input_ids, inputs.positions, meta)[inputs.sample_rows]
            return logits, inputs.sample_seqs
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv.pools, meta, after_layer)
        logits = self.model.compute_logits(hidden[inputs.sample_rows])
        return logits, inputs.sample_seqs

    def prepare(self, seqs: list[Sequence], num_tokens: list[int],
                kv_prompts: list[tuple[str, list[int]]] = ()) -> StepInputs:
        """The step's inputs as flat tensors (sent to the other ranks first, in a tensor-parallel engine)."""
        header, flat, sample_seqs = self.flatten(seqs, num_tokens)
        if self.workers is not None:
            self.workers.send_step(header, flat, list(kv_prompts))
        return self.assemble(header, flat, sample_seqs)

    @torch.inference_mode()
    def execute(self, header: np.ndarray, flat: np.ndarray, after_layer: Callable[[int], None] | None = None
                ) -> None:
        """A worker rank's step: its shard of the forward pass on rank 0's inputs (the logits are rank 0's)."""
        inputs = self.assemble(header, flat, [])
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv.pools, inputs.meta, after_layer)
        self.model.compute_logits(hidden[inputs.sample_rows])

    def flatten(self, seqs: list[Sequence], num_tokens: list[int]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(header, one int64 array of every part, the sampled sequences): per sequence a few Python operations
        (its tokens, its block table), per token none (numpy builds positions and slots)."""
        # Decode rows first, longest context first (the torch path groups decodes of similar length).
        def rank(i: int) -> tuple[bool, int]:
            is_decode = num_tokens[i] == 1 and seqs[i].num_computed > 0
            return (not is_decode, -seqs[i].num_computed if is_decode else 0)

        order = sorted(range(len(seqs)), key=rank)
        starts = np.fromiter((seqs[i].num_computed for i in order), np.int64, len(order))
        lens = np.fromiter((num_tokens[i] for i in order), np.int64, len(order))
        ends = starts + lens
        num_decodes = int(np.count_nonzero((lens == 1) & (starts > 0)))
        ids: list[int] = []
        for i, start, end in zip(order, starts.tolist(), ends.tolist()):
            ids.extend(seqs[i].token_ids[start:end])
        bs = self.blocks.block_size
        used = (ends + bs - 1) // bs
        tables = np.zeros((len(order), int(used.max())), np.int64)
        for row, (i, n) in enumerate(zip(order, used.tolist())):
            tables[row, :n] = self.blocks.table(seqs[i].request_id)[:n]
        row_start = np.cumsum(lens) - lens
        owner = np.repeat(np.arange(len(order)), lens)  # the sequence (row of `tables`) of each token
        positions = np.arange(len(ids), dtype=np.int64) - np.repeat(row_start - starts, lens)
        last = row_start + lens - 1
        samples = [r for r, (i, end) in enumerate(zip(order, ends.tolist())) if end == seqs[i].num_tokens]
        dwidth = int(used[0]) if num_decodes else 0
        pwidth = int(used[num_decodes:].max()) if num_decodes < len(order) else 0
        parts = [
            np.asarray(ids, np.int64),  # input_ids
            positions,
            tables[owner, positions // bs],  # slot_blocks
            positions % bs,  # slot_offsets
            tables[:num_decodes, :dwidth].ravel(),  # decode_tables
            ends[:num_decodes],  # decode_lens
            np.append(row_start[num_decodes:], len(ids)),  # query_start
            ends[num_decodes:],  # prefill_lens
            tables[num_decodes:, :pwidth].ravel(),  # prefill_tables
            last[samples],  # sample_rows
        ]
        max_query_len = int(lens[num_decodes:].max()) if num_decodes < len(order) else 0
        header = np.array([1, num_decodes, len(order), dwidth, pwidth, max_query_len] + [len(p) for p in parts],
                          np.int64)
        return header, np.concatenate(parts), [order[r] for r in samples]

    def assemble(self, header: np.ndarray, flat: np.ndarray, sample_seqs: list[int]) -> StepInputs:
        """The tensors of `flatten`'s output, on the device in one copy; the host lists the torch path reads."""
        num_decodes, num_seqs, dwidth, pwidth, max_query_len = (int(v) for v in header[1:6])
        sizes = header[6:].tolist()
        host = np.split(flat, np.cumsum(sizes)[:-1])
        tensor = torch.from_numpy(flat)
        if self.device != "cpu":
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        t = tensor.split(sizes)
        meta = AttentionMetadata(
            slot_blocks=t[2],
            slot_offsets=t[3],
            num_decodes=num_decodes,
            decode_block_tables=t[4].view(num_decodes, dwidth),
            decode_seq_lens=t[5],
            prefill_query_start_loc=t[6],
            prefill_seq_lens=t[7],
            prefill_block_tables=t[8].view(num_seqs - num_decodes, pwidth),
            max_query_len=max_query_len,
            decode_seq_lens_host=host[5].tolist(),
            prefill_query_start_host=host[6].tolist(),
            prefill_seq_lens_host=host[7].tolist(),
        )
        return StepInputs(t[0], t[1], meta, t[9], sample_seqs)


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # [N] the rows whose logits are sampled (each such sequence's last token)
    sample_seqs: list[int]  # their sequences, as indices into the step's list
