"""Tensor parallelism, Megatron-style: what each rank holds, and the collectives between ranks.

A degree `tp` splits the query heads evenly (it must divide them), the KV heads evenly when it divides them and
by replication when it exceeds them (rank r holds KV head r * num_kv_heads // tp, and the degree must then be a
multiple of the KV-head count), the MLP's intermediate dimension and the vocabulary in contiguous ranges.
Column-parallel layers (fused QKV, gate/up, the LM head) keep their rank's output rows; row-parallel ones (the
attention output and down projections) keep their rank's input columns and are followed by one all-reduce.
Anything else is refused at start, naming the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .errors import ConfigError
from .host_collectives import HostCollectives


def _ranges(total: int, parts: int, index: int) -> tuple[int, int]:
    """Part `index` of `total` split into `parts` contiguous ranges as equal as possible (the first ones
    longer by one)."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


@dataclass(frozen=True, slots=True)
class Shard:
    """What rank `rank` of `size` holds of a model."""

    rank: int
    size: int
    head_start: int  # its query heads: [head_start, head_start + num_heads)
    num_heads: int
    kv_head_start: int  # its KV heads: [kv_head_start, kv_head_start + num_kv_heads)
    num_kv_heads: int
    inter_start: int  # its slice of the MLP's intermediate dimension
    inter_end: int
    vocab_start: int  # its rows of the embedding and the LM head
    vocab_end: int

    @property
    def intermediate(self) -> int:
        return self.inter_end - self.inter_start


def check_degree(cfg: ModelConfig, tp: int) -> None:
    """Refuses a degree the model cannot take, naming the numbers."""
    if tp < 1:
        raise ConfigError("tensor_parallel_size", f"must be >= 1, got {tp}")
    if cfg.num_heads % tp:
        raise ConfigError("tensor_parallel_size", f"{tp} does not divide the model's {cfg.num_heads} query heads")
    if tp > cfg.num_kv_heads and tp % cfg.num_kv_heads:
        raise ConfigError("tensor_parallel_size", f"{tp} ranks cannot share the model's {cfg.num_kv_heads} KV heads "
                                                  f"(above the KV-head count, the degree must be a multiple of it)")
    if tp <= cfg.num_kv_heads and cfg.num_kv_heads % tp:
        raise ConfigError("tensor_parallel_size", f"{tp} does not divide the model's {cfg.num_kv_heads} KV heads")
    if cfg.intermediate_size < tp or cfg.vocab_size < tp:
        raise ConfigError("tensor_parallel_size", f"{tp} ranks for an intermediate size of {cfg.intermediate_size} "
                                                  f"and a vocabulary of {cfg.vocab_size}")


def shard(cfg: ModelConfig, tp: int, rank: int) -> Shard:
    check_degree(cfg, tp)
    if not 0 <= rank < tp:
        raise ValueError(f"rank {rank} of {tp}")
    heads = cfg.num_heads // tp
    if tp <= cfg.num_kv_heads:
        kv_heads, kv_start = cfg.num_kv_heads // tp, rank * (cfg.num_kv_heads // tp)
    else:  # replicated: each KV head serves tp / num_kv_heads consecutive ranks
        kv_heads, kv_start = 1, rank * cfg.num_kv_heads // tp
    inter = _ranges(cfg.intermediate_size, tp, rank)
    vocab = _ranges(cfg.vocab_size, tp, rank)
    return Shard(rank, tp, rank * heads, heads, kv_start, kv_heads, inter[0], inter[1], vocab[0], vocab[1])


@dataclass(frozen=True, slots=True)
class KVRoute:
    """One piece of a KV transfer between layouts: prefill rank `src` sends KV heads [head_start, head_end)
    (global indices) to decode rank `dst`."""

    src: int
    dst: int
    head_start: int
    head_end: int


def kv_routes(cfg: ModelConfig, prefill_tp: int, decode_tp: int) -> list[KVRoute]:
    """Which prefill rank sends which KV heads to which decode rank, for any two degrees the model takes.

    Each decode rank receives exactly its heads, each head from one prefill rank that holds it (among the ones
    that do, replicas included, the lowest-numbered), so a receiver waits for `len` of its routes senders.
    Routes are whole runs of consecutive heads."""
    prefill = [shard(cfg, prefill_tp, r) for r in range(prefill_tp)]
    decode = [shard(cfg, decode_tp, r) for r in range(decode_tp)]
    routes: list[KVRoute] = []
    for d in decode:
        head = d.kv_head_start
        end = d.kv_head_start + d.num_kv_heads
        while head < end:
            p = next(p for p in prefill if p.kv_head_start <= head < p.kv_head_start + p.num_kv_heads)
            stop = min(end, p.kv_head_start + p.num_kv_heads)
            routes.append(KVRoute(p.rank, d.rank, head, stop))
            head = stop
    return routes


def whole(cfg: ModelConfig) -> Shard:
    """Everything: the one rank of an engine without tensor parallelism."""
    return shard(cfg, 1, 0)


class TPGroup:
    """The ranks of one tensor-parallel engine: `pg` carries the activations' collectives (gloo for CPU
    tensors, NCCL for CUDA ones), `control` (always gloo, CPU tensors) the step inputs rank 0 broadcasts.
    `vocab_sizes`: each rank's rows of the vocabulary, for gathering logits."""

    def __init__(self, rank: int, size: int, pg, control, vocab_sizes: list[int],
                 host: HostCollectives | None = None) -> None:
        self.rank, self.size = rank, size
        self.pg, self.control = pg, control
        self.vocab_sizes = vocab_sizes
        self.host = host  # CPU ranks of one host: shared memory instead of gloo where a tensor fits

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.host is not None and self.host.fits(x):
            return self.host.all_reduce(x)
        self.pg.allreduce([x]).wait()
        return x

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """[N, this rank's vocabulary] on every rank -> [N, vocab] (all-gather; ranges may differ by one)."""
        width = max(self.vocab_sizes)
        padded = F.pad(logits, (0, width - logits.shape[1])).contiguous()
        if self.host is not None and self.host.fits(padded):
            parts = self.host.all_gather(padded)
        else:
            parts = [torch.empty_like(padded) for _ in range(self.size)]
            self.pg.allgather([parts], [padded]).wait()
        return torch.cat([p[:, :n] for p, n in zip(parts, self.vocab_sizes)], dim=1)

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's `t` into every rank's `t` (same shape and dtype, CPU)."""
        self.control.broadcast(t, 0).wait()
        return t


def all_reduce(x: torch.Tensor, tp: TPGroup | None) -> torch.Tensor:
    return x if tp is None else tp.all_reduce(x)


def make_group(rank: int, size: int, store, device: torch.device, vocab_sizes: list[int],
               timeout: float = 300.0, host: HostCollectives | None = None) -> TPGroup:
    """Joins the engine's ranks over `store` (rank 0 hosts it): blocks until all of them have."""
    import datetime

    import torch.distributed as dist

    def gloo(prefix: str):
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = datetime.timedelta(seconds=timeout)
        opts._devices = [dist.ProcessGroupGloo.create_default_device()]
        return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, size, opts)

    control = gloo("tp/control")
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = datetime.timedelta(seconds=timeout)
        pg = dist.ProcessGroupNCCL(dist.PrefixStore("tp/nccl", store), rank, size, opts)
    else:
        pg = gloo("tp/activations")
    return TPGroup(rank, size, pg, control, vocab_sizes, host)
