"""Expert parallelism: expert parameters and the communication that moves tokens to experts.

An MoE layer's tokens come from the dense layout (replicated over TP); each TP rank takes
its equal share of the micro-batch's tokens (``tp_token_range``), so the ranks of an EP
group hold disjoint tokens. Tokens reach the rank holding their expert by all-to-all over
the ep group (``all_to_all``, split sizes exchanged first as a device tensor, so it runs on
NCCL) or, for debugging, by an all-gather of every token and a reduce-scatter of the outputs.
With expert-TP the etp group first pools its tokens (``gather_rows``) and finally sums its
partial outputs (``reduce_scatter_rows``). Expert parameters are replicated, gradient-reduced
and ZeRO-partitioned over edp.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from megatron.core import comm
from megatron.core.parallel_state import Topology
from megatron.core.pieces import CanonicalSpec, Piece
from megatron.core.tensor_parallel import make_param

EXPERT_GROUP = "edp"


def check_expert_layout(num_experts: int, topo: Topology) -> None:
    """Refuse expert layouts that do not divide the experts, naming the flags."""
    ep = topo.dims.ep
    if num_experts % ep:
        raise ValueError(f"--num-experts {num_experts} is not divisible by --expert-model-parallel-size {ep}; "
                         f"choose an expert-parallel size that divides the number of experts")
    if topo.dims.cp != 1 or topo.dims.sp != 1:
        raise ValueError("MoE layers with context or sequence parallelism are not supported; use "
                         "--context-parallel-size 1 and --ds-sequence-parallel-size 1")


def local_experts(num_experts: int, topo: Topology) -> range:
    """Global indices of the experts this rank holds: a contiguous block, by ep rank."""
    per_rank = num_experts // topo.dims.ep
    first = topo.expert_coords["ep"] * per_rank
    return range(first, first + per_rank)


def make_expert_param(local_shape: tuple[int, ...], pieces: list[Piece], specs: list[CanonicalSpec],
                      seed: int) -> nn.Parameter:
    """A parameter of one expert: initialised from its canonical tensors like any other, but
    replicated, reduced and partitioned over the expert-data-parallel group."""
    p = make_param(local_shape, pieces, specs, seed)
    p.sharding = dataclasses.replace(p.sharding, replica_groups=(EXPERT_GROUP,), grad_reduce_group=EXPERT_GROUP,
                                     zero_group=EXPERT_GROUP)
    return p


def tp_token_range(num_tokens: int, topo: Topology) -> tuple[int, int]:
    """(start, count) of this TP rank's share of a micro-batch's flattened tokens."""
    if num_tokens % topo.tp:
        raise ValueError(f"MoE layer: {num_tokens} tokens per micro-batch (--micro-batch-size x --seq-length) "
                         f"are not divisible by --tensor-model-parallel-size {topo.tp}")
    n = num_tokens // topo.tp
    return topo.tp_rank * n, n


# --- collectives with autograd ---------------------------------------------------------

class _AllToAll(torch.autograd.Function):
    """Rows to every member of ``group``: ``in_splits[i]`` rows go to member i,
    ``out_splits[i]`` come from it. Backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        back = g.new_empty((sum(in_splits), *g.shape[1:]))
        dist.all_to_all_single(back, g.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return x if comm.group_size(group) == 1 else _AllToAll.apply(x, out_splits, in_splits, group)


def exchange_counts(send: torch.Tensor, group) -> torch.Tensor:
    """``send[i]`` (int64 counts for member i) to every member; returns what each member sent us."""
    if comm.group_size(group) == 1:
        return send
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send.contiguous(), group=group)
    return recv


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0 (equal rows per member); backward sums the gradients over
    ``group`` and keeps this member's rows (``partial=True``) or just keeps them."""

    @staticmethod
    def forward(ctx, x, group, partial):
        ctx.group, ctx.n, ctx.partial = group, x.shape[0], partial
        out = x.new_empty((comm.group_size(group) * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        if ctx.partial:
            return _reduce_scatter_rows(g, ctx.group), None, None
        r = comm.group_rank(ctx.group)
        return g[r * ctx.n:(r + 1) * ctx.n].contiguous(), None, None


def _reduce_scatter_rows(x: torch.Tensor, group) -> torch.Tensor:
    out = x.new_empty((x.shape[0] // comm.group_size(group), *x.shape[1:]))
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


class _ReduceScatterRows(torch.autograd.Function):
    """Sum over ``group`` and keep this member's rows; backward all-gathers."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_rows(x, group)

    @staticmethod
    def backward(ctx, g):
        out = g.new_empty((comm.group_size(ctx.group) * g.shape[0], *g.shape[1:]))
        dist.all_gather_into_tensor(out, g.contiguous(), group=ctx.group)
        return out, None


def gather_rows(x: torch.Tensor, group, partial_grads: bool) -> torch.Tensor:
    """Every member's rows, in member order. ``partial_grads``: each member's gradient of the
    result is only its part (sum them in backward); else every member has the whole gradient."""
    return x if comm.group_size(group) == 1 else _GatherRows.apply(x, group, partial_grads)


def reduce_scatter_rows(x: torch.Tensor, group) -> torch.Tensor:
    return x if comm.group_size(group) == 1 else _ReduceScatterRows.apply(x, group)
