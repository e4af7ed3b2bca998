"""Decode steps replayed from CUDA graphs: one graph per padded batch size, captured once at start.

A decode step launches a few kernels per layer, each for microseconds of work: at small batches the GPU
waits for the host to launch them. A graph records the whole forward pass (embedding to logits) once and
replays it with one launch. It reads its inputs from fixed buffers, so a step copies its flat inputs into
them first: the real rows, then padding rows up to the graph's size (token 0 at position 0, K/V stored
nowhere: block -1, which `store_kv` skips; attention over one token of block 0, whose output is dropped).

Only steps of decodes alone run from a graph (a prompt span's length varies, and a prefill node's layer hooks
must run between layers); steps larger than the largest graph, and every step with `enforce_eager`, run
eagerly. Graphs need the Triton kernels: the torch path reads host-side lengths at every step.

`capture=False` runs the same padded, fixed-buffer path eagerly: the CPU tests check the padding with it.
"""

from __future__ import annotations

import bisect

import torch

from .attention import AttentionMetadata
from .model import CausalLM

def graph_sizes(max_batch: int) -> list[int]:
    """The padded batch sizes that get a graph: 1, 2, 4, then every 8 up to `max_batch` (and it)."""
    sizes = [s for s in (1, 2, 4) if s < max_batch] + list(range(8, max_batch + 1, 8))
    return sorted(set(sizes + [max_batch]))


class DecodeGraphs:
    def __init__(self, model: CausalLM, pools: list[torch.Tensor], max_batch: int, max_blocks: int,
                 device: str, capture: bool = True) -> None:
        self.model = model
        self.pools = pools
        self.sizes = graph_sizes(max_batch)
        self.max_blocks = max_blocks
        self.capture_graphs = capture
        b = self.sizes[-1]
        i64 = dict(dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(b, **i64)
        self.positions = torch.zeros(b, **i64)
        self.slot_blocks = torch.full((b,), -1, **i64)
        self.slot_offsets = torch.zeros(b, **i64)
        self.block_tables = torch.zeros((b, max_blocks), **i64)
        self.seq_lens = torch.ones(b, **i64)
        self._empty = torch.zeros(0, **i64)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None]] = {}

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_blocks=self.slot_blocks[:b], slot_offsets=self.slot_offsets[:b], num_decodes=b,
            decode_block_tables=self.block_tables[:b], decode_seq_lens=self.seq_lens[:b],
            prefill_query_start_loc=self._empty[:1], prefill_seq_lens=self._empty,
            prefill_block_tables=self._empty.view(0, 0), max_query_len=0,
            decode_seq_lens_host=[], prefill_query_start_host=[], prefill_seq_lens_host=[],
        )

    def _forward(self, b: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:b], self.positions[:b], self.pools, self._meta(b))
        return self.model.compute_logits(hidden)

    def capture(self) -> None:
        """Records a graph per size, largest first, all in one memory pool (a smaller graph reuses the
        larger ones' activations: only one replays at a time)."""
        if not self.capture_graphs:
            return
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        for b in reversed(self.sizes):
            # Warm-up off the capture: Triton compiles its kernels and the allocator settles.
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._forward(b)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(b)
            self._graphs[b] = (graph, out)
        torch.cuda.synchronize()

    def fits(self, num_decodes: int, width: int) -> bool:
        return 0 < num_decodes <= self.sizes[-1] and width <= self.max_blocks

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Logits [n, vocab] of a step of n decodes (`fits`), from the smallest graph that holds them. The
        result is a view of the graph's output: read it before the next step."""
        n = meta.num_decodes
        b = self.sizes[bisect.bisect_left(self.sizes, n)]
        width = meta.decode_block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_blocks[:n].copy_(meta.slot_blocks)
        self.slot_offsets[:n].copy_(meta.slot_offsets)
        self.block_tables[:n, :width].copy_(meta.decode_block_tables)
        self.seq_lens[:n].copy_(meta.decode_seq_lens)
        if n < b:  # padding rows; blocks past a row's length are never read, so stale entries are harmless
            self.input_ids[n:b].zero_()
            self.positions[n:b].zero_()
            self.slot_blocks[n:b].fill_(-1)
            self.block_tables[n:b, 0].zero_()
            self.seq_lens[n:b].fill_(1)
        graph, out = self._graphs.get(b, (None, None))
        if graph is None:
            return self._forward(b)[:n]
        graph.replay()
        return out[:n]
