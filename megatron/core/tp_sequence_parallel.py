"""Megatron sequence parallelism (``--sequence-parallel``): outside the tensor-parallel matmuls
(norms, dropout, residual adds) each TP rank holds only its slice of the sequence.

The model's hidden states are ``[batch, sequence, hidden]`` (Megatron's are ``[s, b, h]``), so
the slices are cut along dim 1, ``SEQ_DIM``; the collectives move the sequence to the leading
dimension for the copy they make anyway. Entering a column-parallel matmul the slices are
all-gathered (backward: reduce-scattered, since the input gradient of a TP-sharded matmul is a
partial sum over TP); the matmul keeps only this rank's slice for backward and gathers it again
there, as Megatron does, so the whole-sequence input is never stored. Leaving a row-parallel
matmul the partial outputs are reduce-scattered instead of all-reduced (backward:
all-gathered). The bytes moved in forward equal those of TP's all-reduces, while the
activations between the matmuls shrink by the TP size.

A parameter replicated over TP that is applied to a sequence slice (norms, row-parallel
biases, the position table) gets only its slice's share of the gradient on each TP rank:
``mark_partial_sum`` records that in its ``ShardingRecord``, and the gradient sync sums the
shares over TP so the replicas stay identical. Pieces, owners and the checkpoint do not change.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core import comm
from megatron.core.parallel_state import Topology
from megatron.core.sharding import PartialSum

SEQ_DIM = 1


def check_divisible(seq: int, tp: int) -> None:
    """Refuse a sequence the TP ranks cannot split evenly."""
    if seq % tp:
        raise ValueError(f"--sequence-parallel: sequence length {seq} is not divisible by "
                         f"--tensor-model-parallel-size {tp} (each TP rank holds an equal slice of the "
                         f"sequence); choose --seq-length a multiple of {tp}, or drop --sequence-parallel")


class _GatheredLinear(torch.autograd.Function):
    """``F.linear(all-gathered x, weight, bias)`` that saves only ``x``, this rank's slice, and
    gathers it again in backward for the weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.group, ctx.has_bias = group, bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(comm.all_gather_dim(x, group, SEQ_DIM), weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        whole = comm.all_gather_dim(x, ctx.group, SEQ_DIM).reshape(-1, weight.shape[1])
        grad_x = comm.reduce_scatter_dim(g @ weight, ctx.group, SEQ_DIM)
        g2 = g.reshape(-1, weight.shape[0])
        return grad_x, g2.t() @ whole, g2.sum(0) if ctx.has_bias else None, None


class _ReduceScatterSequence(torch.autograd.Function):
    """Sum partial outputs over TP and keep this rank's sequence slice forward; all-gather backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.reduce_scatter_dim(x, group, SEQ_DIM)

    @staticmethod
    def backward(ctx, g):
        return comm.all_gather_dim(g, ctx.group, SEQ_DIM), None


@dataclass(frozen=True)
class SequenceParallel:
    """Whether, and over which TP group, this model's hidden states are split along the
    sequence. ``size`` 1 is off: with TP 1 ``--sequence-parallel`` changes nothing (as in Megatron)."""

    group: object = None
    rank: int = 0
    size: int = 1

    @staticmethod
    def of(topo: Topology, requested: bool) -> "SequenceParallel":
        return SequenceParallel(topo.tp_group, topo.tp_rank, topo.tp) if requested and topo.tp > 1 \
            else SequenceParallel()

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def gathered_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """A column-parallel matmul of the whole sequence, from every TP rank's slice ``x``."""
        return _GatheredLinear.apply(x, weight, bias, self.group)

    def reduce_scatter(self, y: torch.Tensor) -> torch.Tensor:
        """This rank's sequence slice of the sum over TP of ``y``."""
        check_divisible(y.shape[SEQ_DIM], self.size)
        return _ReduceScatterSequence.apply(y, self.group)

    def seq_start(self, local: int) -> int:
        """Global position of the first of this rank's ``local`` sequence positions."""
        return self.rank * local

    def seq_length(self, local: int) -> int:
        """The whole sequence's length, from the ``local`` positions this rank holds."""
        return local * self.size

    def dropout_window(self, local: int) -> tuple[int, int] | tuple[()]:
        """``DropoutRNG.hidden``'s (first position, sequence length) for this rank's slice; nothing when
        off, so the masks follow the model's Ulysses / ring sequence layout instead."""
        return (self.seq_start(local), self.seq_length(local)) if self.enabled else ()

    def mark_partial_sum(self, p: nn.Parameter | None) -> None:
        """``p`` is replicated over TP and sees one sequence slice: its TP gradients add up."""
        if p is not None and self.enabled:
            p.sharding = p.sharding.with_partial_sum(PartialSum("tp"))
