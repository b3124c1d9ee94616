"""Thin wrappers over torch.distributed collectives that skip groups of one rank.

The same code runs single-process (no process group at all), on gloo and on NCCL.
"""
from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist

# torch 2.10+ renamed the *_tensor collectives; the old names still work everywhere we run.
warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use.*", category=FutureWarning)


def group_size(group) -> int:
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group) -> int:
    if group is None or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def world_all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t


def all_gather_flat(out: torch.Tensor, shard: torch.Tensor, group, async_op: bool = False):
    """Concatenate equal-sized 1-D shards of every rank of ``group`` into ``out``. With
    ``async_op`` returns the collective's work handle (None for a group of one: done already);
    ``out`` holds the result once it is waited."""
    if group_size(group) == 1:
        out.copy_(shard)
        return None if async_op else out
    if dist.get_backend(group) == "gloo":
        work = _gather_by_broadcasts(out, shard.contiguous(), group)
        if not async_op:
            work.wait()
        return work if async_op else out
    work = dist.all_gather_into_tensor(out, shard.contiguous(), group=group, async_op=async_op)
    return work if async_op else out


class _Works:
    """Several collectives' work handles waited as one."""

    def __init__(self, works: list) -> None:
        self.works = works

    def wait(self) -> bool:
        for work in self.works:
            work.wait()
        return True


def _gather_by_broadcasts(out: torch.Tensor, shard: torch.Tensor, group) -> _Works:
    """``all_gather_flat`` on gloo as one broadcast per rank into its slice of ``out``: gloo's
    all-gather moves the same bytes 1.7-3x slower (256 MiB to 1 GiB over 2 and 4 CPU ranks here;
    ``benchmarks/gloo_collectives.py``)."""
    n, me = shard.numel(), dist.get_rank(group)
    out[me * n:(me + 1) * n].copy_(shard)
    return _Works([dist.broadcast(out[r * n:(r + 1) * n], src=dist.get_global_rank(group, r), group=group,
                                  async_op=True) for r in range(dist.get_world_size(group))])


def reduce_scatter_flat(out: torch.Tensor, full: torch.Tensor, group) -> torch.Tensor:
    """Sum ``full`` over ``group`` and keep this rank's equal 1-D share in ``out``."""
    if group_size(group) == 1:
        out.copy_(full)
    else:
        dist.reduce_scatter_tensor(out, full.contiguous(), group=group)
    return out


def all_gather_dim(t: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's ``t`` along ``dim``, in group-rank order."""
    n = group_size(group)
    if n == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def reduce_scatter_dim(t: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Sum ``t`` over ``group`` and keep this rank's equal slice along ``dim`` (slices in
    group-rank order; the size along ``dim`` must divide by the group size)."""
    n = group_size(group)
    if n == 1:
        return t
    full = t.movedim(dim, 0).contiguous()  # the collective cuts the leading dimension
    out = full.new_empty((full.shape[0] // n, *full.shape[1:]))
    dist.reduce_scatter_tensor(out, full, group=group)
    return out.movedim(0, dim)


class WaitClock:
    """Time the computation spent blocked on communication (the *exposed* communication time).
    On CPU the host blocks in ``wait()``; on CUDA the compute stream does, so a pair of events
    around the wait measures the stream's stall, read with a synchronisation by ``take``."""

    FOLD_EVERY = 1024  # event pairs kept before they are summed (bounds their number)

    def __init__(self) -> None:
        self._seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._paused = False

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Count nothing inside (a validation pass is no part of the training step's figure)."""
        self._paused, before = True, self._paused
        try:
            yield
        finally:
            self._paused = before

    @contextmanager
    def blocked(self, device: torch.device) -> Iterator[None]:
        """Count the time of the enclosed wait or synchronous collective."""
        if self._paused:
            yield
            return
        if device.type != "cuda":
            start = time.perf_counter()
            try:
                yield
            finally:
                self._seconds += time.perf_counter() - start
            return
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            yield
        finally:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((start, end))
            if len(self._events) >= self.FOLD_EVERY:
                self._fold()

    def _fold(self) -> None:
        for start, end in self._events:
            end.synchronize()
            self._seconds += start.elapsed_time(end) / 1000
        self._events = []

    def take(self) -> float:
        """Seconds blocked since the last ``take``; starts counting afresh."""
        self._fold()
        seconds, self._seconds = self._seconds, 0.0
        return seconds


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
