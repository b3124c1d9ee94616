"""DeepSpeed-Ulysses: attention trades sequence sharding for head sharding over the ``sp`` group.

Before attention each rank holds ``[batch, heads, seq/S, head_dim]``; one all-to-all gives it
``[batch, heads/S, seq, head_dim]`` (its heads, the whole sequence of the sp group), attention is
local, and the inverse all-to-all restores the sequence shards. Each direction's backward is the
other direction.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.core import comm


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """``x[j]`` goes to rank ``j`` of ``group``; the result's ``[j]`` came from rank ``j``."""
    x = x.contiguous()
    out = torch.empty_like(x)  # after contiguous(): empty_like keeps strides, the collective writes raw memory
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    n = comm.group_size(group)
    b, h, s, d = x.shape
    parts = x.view(b, n, h // n, s, d).transpose(0, 1)  # [rank, b, h/n, s, d]: head group j to rank j
    got = _all_to_all(parts, group)  # [rank, b, h/n, s, d]: rank j's sequence slice of my heads
    return got.permute(1, 2, 0, 3, 4).reshape(b, h // n, n * s, d)


def _heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    n = comm.group_size(group)
    b, h, s, d = x.shape
    parts = x.view(b, h, n, s // n, d).permute(2, 0, 1, 3, 4)  # sequence slice j to rank j
    got = _all_to_all(parts, group)  # [rank, b, h, s/n, d]: rank j's heads of my slice
    return got.transpose(0, 1).reshape(b, n * h, s // n, d)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, g):
        return _heads_to_seq(g, ctx.group), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, g):
        return _seq_to_heads(g, ctx.group), None


def seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """``[b, heads, seq/S, d]`` sequence-sharded -> ``[b, heads/S, seq, d]`` head-sharded."""
    return x if comm.group_size(group) == 1 else _SeqToHeads.apply(x, group)


def heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """The inverse of ``seq_to_heads``."""
    return x if comm.group_size(group) == 1 else _HeadsToSeq.apply(x, group)
