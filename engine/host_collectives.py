"""All-reduce and all-gather between the CPU ranks of one host through shared memory.

gloo takes about 1 ms per all-reduce of a few KiB between two processes on this machine (../shared/STACK.md),
and a decode step of a tensor-parallel model makes two per layer: at batch 1 that is most of the step. Here
each rank copies its tensor into its slot of a /dev/shm buffer, publishes a sequence number, waits until every
rank has published it, and reads all the slots: every rank sums them in rank order, so all get the same bits.
Two sets of slots alternate between calls, so a rank never overwrites a slot that a slower rank still reads:
writing call k+2's slot needs everyone's call k+1 flag, which they publish only after they have read call k.
x86 keeps stores in order and loads in order, which is what the flag protocol needs (not for weaker CPUs).
A peer that dies is noticed within a fraction of a second (RuntimeError), as gloo would fail.
"""

from __future__ import annotations

import os
import time

import torch

from .shm import allocate_shm

_FLAG_STRIDE = 8  # int64s between two ranks' flags: one cache line each
_HEADER = 256  # int64s: flags, then each rank's pid


class HostCollectives:
    def __init__(self, rank: int, size: int, slot_bytes: int, path: str | None = None,
                 timeout: float = 300.0) -> None:
        """Rank 0 creates the buffer (`path` None), the others map it (`path` = rank 0's `.path`)."""
        if size * _FLAG_STRIDE + size > _HEADER:
            raise ValueError(f"{size} ranks: at most {_HEADER // (_FLAG_STRIDE + 1)}")
        self.rank, self.size, self.slot_bytes, self.timeout = rank, size, slot_bytes, timeout
        total = _HEADER * 8 + 2 * size * slot_bytes
        if path is None:
            self.buffer, self.path = allocate_shm((total,), torch.uint8, "tp")
        else:
            self.buffer, self.path = torch.from_file(path, shared=True, size=total, dtype=torch.uint8), path
        self._header = self.buffer[: _HEADER * 8].view(torch.int64).numpy()
        self._slots = self.buffer[_HEADER * 8:].view(2, size, slot_bytes)
        self._header[_FLAG_STRIDE * size + rank] = os.getpid()
        self._seq = 0

    def fits(self, t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and t.numel() * t.element_size() <= self.slot_bytes

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums `x` over the ranks, in place (it must `fit`)."""
        parts = self._exchange(x)
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        x.copy_(total.view_as(x))
        return x

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `x` (same shape and dtype on every rank), in rank order (copies)."""
        return [p.clone().view_as(x) for p in self._exchange(x)]

    def _exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._seq += 1
        slots = self._slots[self._seq % 2]
        n = x.numel() * x.element_size()
        slots[self.rank, :n].copy_(x.contiguous().view(-1).view(torch.uint8))
        self._header[self.rank * _FLAG_STRIDE] = self._seq  # after the data: x86 keeps the order
        self._wait_for_all()
        return [slots[r, :n].view(x.dtype) for r in range(self.size)]

    def _wait_for_all(self) -> None:
        deadline = time.monotonic() + self.timeout
        flags = self._header[: self.size * _FLAG_STRIDE: _FLAG_STRIDE]
        spins = 0
        while int(flags.min()) < self._seq:
            spins += 1
            if spins % 4096 == 0:  # now and then: is everyone still there?
                self._check_peers(deadline)
                time.sleep(0)  # let a rank sharing this core run

    def _check_peers(self, deadline: float) -> None:
        for r in range(self.size):
            pid = int(self._header[_FLAG_STRIDE * self.size + r])
            if pid and not _running(pid):
                raise RuntimeError(f"tensor-parallel rank {r} (pid {pid}) is gone")
        if time.monotonic() > deadline:
            raise RuntimeError(f"tensor-parallel ranks did not meet within {self.timeout:.0f} s")


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
