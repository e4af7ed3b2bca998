"""The processes of a tensor-parallel engine: rank 0 is the engine (scheduler, sampler, the node's service);
ranks 1..N-1 are workers that only execute. Each step, rank 0 broadcasts the step's flat inputs (a header and
one int64 array: `ModelRunner.flatten`) and every rank runs its shard of the forward pass; the row-parallel
layers' all-reduces and the logits' gather keep them in step. A step that computes prompts bound for a KV
transfer (a prefill node's) carries them too, so that each rank posts its own heads' sends as its layers are
done. The worker loop knows KV transfers only as a `KVSink`: the node's service hands the engine a
`RankKVService` (`LLMEngine(rank_kv=...)`, picklable), which each worker starts in its own process with its end of
a pipe to rank 0 (rank 0 drives the transfers through it) and which returns the rank's sink. A worker dies with
rank 0 (and rank 0's next collective fails when a worker dies), so no rank outlives the engine.
"""

from __future__ import annotations

import ctypes
import datetime
import multiprocessing as mp
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from .config import DTYPES, EngineConfig, ModelConfig, transfer_tokens
from .host_collectives import HostCollectives
from .parallel import TPGroup, make_group, shard

if TYPE_CHECKING:
    from .engine import KVSink

HEADER_LEN = 16
POOL_KEY = "tp/kv-pool"  # + "/rank": that rank's KV storage described for mapping ("" if not shareable)
HOST_SLOT_BYTES = 8 << 20  # per rank and call: larger tensors (long prompts' activations) go over gloo
KIND_STEP, KIND_STOP, KIND_STEP_KV = 1, 0, 2  # KIND_STEP_KV: the KV sink's prompts follow the inputs


def rank_device(device: str, rank: int) -> torch.device:
    """Rank r's device: the r-th GPU after the engine's own (each rank its own GPU), or the CPU."""
    d = torch.device(device)
    return torch.device("cuda", (d.index or 0) + rank) if d.type == "cuda" else d


@dataclass(frozen=True, slots=True)
class WorkerKV:
    """What a worker rank hands its node's KV transfers, in its own process."""

    conn: object  # its end of its pipe to rank 0
    pools: list[torch.Tensor]  # its KV pools, one per layer: [num_blocks, 2, block_size, its kv heads, head_dim]
    storage: torch.Tensor  # all of them, contiguous
    shm_path: str  # the /dev/shm file that holds the storage ("" if none)
    device: torch.device
    transfer_tokens: int  # the most prompt tokens one step's transfers carry: what send buffers are bounded by
    thread_setup: Callable[[], object]  # for each thread the transfers start: `omp.serial_torch`


# Started by each worker rank (pickled to it: a module-level function): the rank's KV sink, and its storage
# described for mapping by a process on the same device (b"" if it cannot be).
RankKVService = Callable[[WorkerKV], "tuple[KVSink, bytes]"]


@dataclass(frozen=True)
class WorkerArgs:
    config: EngineConfig
    folder: str
    rank: int
    size: int
    num_blocks: int
    max_model_len: int
    store_port: int
    parent_pid: int
    host_path: str  # rank 0's shared-memory collectives buffer ("" on CUDA)
    kv_conn: object = None  # this rank's end of its pipe to rank 0 (KV transfer commands)
    rank_kv: RankKVService | None = None  # None: this engine's ranks take no part in KV transfers


class TPWorkers:
    """Rank 0's side: starts the other ranks, joins them in one group, and sends each step to them."""

    def __init__(self, config: EngineConfig, folder: str, cfg: ModelConfig, num_blocks: int, max_model_len: int,
                 timeout: float = 300.0, rank_kv: RankKVService | None = None) -> None:
        size = config.tensor_parallel_size
        device = rank_device(config.device, 0)
        self.store = dist.TCPStore("127.0.0.1", 0, None, True, datetime.timedelta(seconds=timeout),
                                   wait_for_workers=False)
        host = HostCollectives(0, size, HOST_SLOT_BYTES) if device.type == "cpu" else None
        ctx = mp.get_context("spawn")  # torch's threads exist already: never fork
        pipes = [ctx.Pipe() if rank_kv is not None else (None, None) for _ in range(1, size)]
        self.links = [mine for mine, _ in pipes if mine is not None]  # rank 0's ends: the KV service drives them
        self.procs = [ctx.Process(target=worker_main, name=f"tp-rank-{rank}", daemon=True,
                                  args=(WorkerArgs(config, folder, rank, size, num_blocks, max_model_len,
                                                   self.store.port, os.getpid(), host.path if host else "",
                                                   theirs, rank_kv),))
                      for rank, (_, theirs) in zip(range(1, size), pipes)]
        for p in self.procs:
            p.start()
        for _, theirs in pipes:
            if theirs is not None:
                theirs.close()  # the worker's copy only: its death then closes rank 0's end
        self.group: TPGroup | None = None  # None until every rank has joined, and again once stopped
        try:
            self.group = make_group(0, size, self.store, device, vocab_sizes(cfg, size), timeout, host)
            # The other ranks' KV storages, described for mapping by a prefill node on the same device.
            self.pools = [p for p in (self.store.get(f"{POOL_KEY}/{rank}") for rank in range(1, size)) if p]
        except BaseException:
            self.close()
            raise

    def send_step(self, header: np.ndarray, flat: np.ndarray, kv_prompts: list[tuple[str, list[int]]]) -> None:
        if kv_prompts:
            header = header.copy()
            header[0] = KIND_STEP_KV
        self.group.broadcast(torch.from_numpy(header))
        self.group.broadcast(torch.from_numpy(flat))
        if kv_prompts:
            encoded = encode_prompts(kv_prompts)
            self.group.broadcast(torch.tensor([len(encoded)], dtype=torch.int64))
            self.group.broadcast(torch.from_numpy(encoded))

    def close(self) -> None:
        """Tells the workers to stop (if the group still works) and makes sure they are gone."""
        group, self.group = self.group, None
        if group is not None:
            stop = np.zeros(HEADER_LEN, np.int64)
            stop[0] = KIND_STOP
            try:
                group.broadcast(torch.from_numpy(stop))
            except Exception:  # noqa: BLE001 - a dead worker: the kill below
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()


def encode_prompts(prompts: list[tuple[str, list[int]]]) -> np.ndarray:
    """(request id, block table) pairs as one int64 array: per prompt, the id's UTF-8 length and bytes, then
    the table's length and ids."""
    parts: list[int] = []
    for rid, table in prompts:
        name = rid.encode()
        parts += [len(name), *name, len(table), *table]
    return np.asarray(parts, np.int64)


def decode_prompts(encoded: np.ndarray) -> list[tuple[str, list[int]]]:
    values, prompts, i = encoded.tolist(), [], 0
    while i < len(values):
        n = values[i]
        rid = bytes(values[i + 1:i + 1 + n]).decode()
        i += 1 + n
        m = values[i]
        prompts.append((rid, values[i + 1:i + 1 + m]))
        i += 1 + m
    return prompts


def vocab_sizes(cfg: ModelConfig, size: int) -> list[int]:
    return [s.vocab_end - s.vocab_start for s in (shard(cfg, size, r) for r in range(size))]


def _die_with_parent(parent_pid: int) -> None:
    # Linux: SIGKILL this process when the thread that started it exits (rank 0's death ends its workers).
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent_pid:  # it died before the line above
        os._exit(1)


def worker_main(args: WorkerArgs) -> None:
    """Rank `args.rank`: loads its shard, joins the group, then executes the steps rank 0 broadcasts."""
    _die_with_parent(args.parent_pid)
    from pathlib import Path

    from .allocator import keep_large_allocations
    from .loader import load_model
    from .omp import serial_torch
    from .model_runner import KVCache, ModelRunner
    from .ops import make_ops

    keep_large_allocations()  # as rank 0's engine does
    config = args.config
    device = rank_device(config.device, args.rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cfg = ModelConfig.from_folder(Path(args.folder))
    mine = shard(cfg, args.size, args.rank)
    dtype = config.dtype or cfg.dtype
    model = load_model(Path(args.folder), cfg, dtype, str(device), args.max_model_len, config.pack_cpu_weights,
                       shard=mine)
    model.ops = make_ops(config.kernels, model.rotary, config.block_size)
    kv = KVCache(cfg, args.num_blocks, config.block_size, DTYPES[dtype], str(device), config.share_kv_cache,
                 num_kv_heads=mine.num_kv_heads)
    store = dist.TCPStore("127.0.0.1", args.store_port, None, False, datetime.timedelta(seconds=300),
                          wait_for_workers=False)
    sink: KVSink | None = None
    description = b""
    if args.rank_kv is not None:
        sink, description = args.rank_kv(WorkerKV(args.kv_conn, kv.pools, kv.storage, kv.shm_path, device,
                                                  transfer_tokens(config, args.max_model_len), serial_torch))
    store.set(f"{POOL_KEY}/{args.rank}", description)  # before joining the group: rank 0 reads it after
    host = HostCollectives(args.rank, args.size, HOST_SLOT_BYTES, args.host_path) if args.host_path else None
    group: TPGroup = make_group(args.rank, args.size, store, device, vocab_sizes(cfg, args.size), host=host)
    model.set_tp(group)
    runner = ModelRunner(model, kv, None, str(device))
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    length = torch.zeros(1, dtype=torch.int64)
    while True:
        group.broadcast(header)
        if int(header[0]) == KIND_STOP:
            return
        flat = torch.empty(int(header[6:].sum()), dtype=torch.int64)
        group.broadcast(flat)
        after_layer = None
        if int(header[0]) == KIND_STEP_KV:
            group.broadcast(length)
            encoded = torch.empty(int(length[0]), dtype=torch.int64)
            group.broadcast(encoded)
            if sink is not None:
                prompts = decode_prompts(encoded.numpy())
                sink.step_started(prompts, kv.pools[0])
                after_layer = lambda layer: sink.layer_done(layer, kv.pools[layer], prompts)  # noqa: E731
        runner.execute(header.numpy(), flat.numpy(), after_layer)
