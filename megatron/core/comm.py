"""Thin wrappers over torch.distributed collectives that skip groups of one rank.

The same code runs single-process (no process group at all), on gloo and on NCCL.
"""
from __future__ import annotations

import warnings

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


def all_gather_flat(out: torch.Tensor, shard: torch.Tensor, group) -> torch.Tensor:
    """Concatenate equal-sized 1-D shards of every rank of ``group`` into ``out``."""
    if group_size(group) == 1:
        out.copy_(shard)
    else:
        dist.all_gather_into_tensor(out, shard.contiguous(), group=group)
    return out


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


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
