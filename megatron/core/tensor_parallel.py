"""Tensor-parallel layers that declare their piece maps (DESIGN §3, Megatron-style).

Every parameter made here carries a ``ShardingRecord`` (``param.sharding``): where its
elements live in the canonical tensors, how those are initialised, and which groups
replicate, reduce and partition it. This is the one place where partition semantics live.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core import comm
from megatron.core.canonical_init import init_local
from megatron.core.parallel_state import Topology
from megatron.core.pieces import CanonicalSpec, Piece, PieceMap, slice_piece, whole_piece
from megatron.core.sharding import DENSE_REDUCE_GROUP, PartialSum, ShardingRecord
from megatron.core.tp_sequence_parallel import SequenceParallel


_ON_META = ContextVar("parameters_on_meta", default=False)


@contextmanager
def parameters_on_meta(enabled: bool = True) -> Iterator[None]:
    """Make parameters on the meta device (shape, dtype and record, no values) while
    ``enabled``: ZeRO-3 then initialises only the chunks a rank owns from the canonical init."""
    token = _ON_META.set(enabled)
    try:
        yield
    finally:
        _ON_META.reset(token)


def make_param(local_shape: tuple[int, ...], pieces: list[Piece], specs: list[CanonicalSpec],
               seed: int, replicated_over: tuple[str, ...] = ()) -> nn.Parameter:
    """A dense parameter initialised from the canonical tensors it holds pieces of (on the
    meta device under ``parameters_on_meta``); ``replicated_over`` names the model-parallel
    groups that hold copies of it (a norm: tp)."""
    piece_map = PieceMap(tuple(local_shape), pieces)
    by_name = {s.name: s for s in specs}
    value = torch.empty(piece_map.local_shape, device="meta") if _ON_META.get() else init_local(piece_map, by_name, seed)
    p = nn.Parameter(value)
    p.sharding = ShardingRecord(piece_map, by_name, (DENSE_REDUCE_GROUP, *replicated_over))
    return p


# --- communication with autograd -------------------------------------------------

class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the input gradient over TP backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return comm.all_reduce(g.contiguous(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce over TP forward; identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        return comm.all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFromTP(torch.autograd.Function):
    """All-gather along the last dim forward; keep this rank's slice backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.n = group, x.shape[-1]
        return comm.all_gather_dim(x, group)

    @staticmethod
    def backward(ctx, g):
        r = comm.group_rank(ctx.group)
        return g[..., r * ctx.n:(r + 1) * ctx.n].contiguous(), None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return x if comm.group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return x if comm.group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return x if comm.group_size(group) == 1 else _GatherFromTP.apply(x, group)


def column_parallel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group,
                           sp: SequenceParallel) -> torch.Tensor:
    """A matmul with output features split over TP, of the whole sequence (gathered from the
    sequence slices under SP); the input gradient is summed over TP."""
    if sp.enabled:
        return sp.gathered_linear(x, weight, bias)
    return F.linear(copy_to_tp(x, group), weight, bias)


def leave_tp(y: torch.Tensor, group, sp: SequenceParallel) -> torch.Tensor:
    """The sum over TP of partial outputs: whole, or this rank's sequence slice under SP."""
    return sp.reduce_scatter(y) if sp.enabled else reduce_from_tp(y, group)


# --- linear layers -----------------------------------------------------------------

@dataclass(frozen=True)
class OutputSegment:
    """Rows ``[start, start+length)`` of a canonical weight (and bias) held by a column-parallel layer."""

    weight: CanonicalSpec
    bias: CanonicalSpec | None
    start: int
    length: int
    owner: bool = True
    replica_slot: tuple[int, int] | None = None  # (slot, num_slots) when repeated over TP ranks


class ColumnParallelLinear(nn.Module):
    """Output features split over TP; several canonical outputs may be fused (QKV, gate/up).
    Under sequence parallelism the input arrives as sequence slices and is gathered first."""

    def __init__(self, in_features: int, segments: list[OutputSegment], topo: Topology, seed: int,
                 sp: SequenceParallel = SequenceParallel()) -> None:
        super().__init__()
        self.group, self.sp = topo.tp_group, sp
        out = sum(s.length for s in segments)
        w_pieces, b_pieces, offset = [], [], 0
        for s in segments:
            w_pieces.append(slice_piece(s.weight, 0, s.start, s.length, offset, s.owner))
            if s.bias is not None:
                b_pieces.append(slice_piece(s.bias, 0, s.start, s.length, offset, s.owner))
            offset += s.length
        self.weight = make_param((out, in_features), w_pieces, [s.weight for s in segments], seed)
        has_bias = segments[0].bias is not None
        self.bias = make_param((out,), b_pieces, [s.bias for s in segments], seed) if has_bias else None
        offset = 0
        for s in segments:
            if s.replica_slot is not None:  # repeated KV rows: each TP rank has part of their gradient
                for p in (self.weight, self.bias):
                    if p is not None:
                        p.sharding = p.sharding.with_partial_sum(PartialSum("tp", (offset, s.length), s.replica_slot),
                                                                 None if "tp" in p.sharding.replica_groups else "tp")
            offset += s.length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return column_parallel_linear(x, self.weight, self.bias, self.group, self.sp)


class RowParallelLinear(nn.Module):
    """Input features split over TP; the partial outputs are summed over TP (reduce-scattered
    along the sequence under sequence parallelism, where the bias then sees one slice)."""

    def __init__(self, weight: CanonicalSpec, bias: CanonicalSpec | None, topo: Topology, seed: int,
                 sp: SequenceParallel = SequenceParallel()) -> None:
        super().__init__()
        self.group, self.sp = topo.tp_group, sp
        out_f, in_f = weight.shape
        start, length = shard_or_raise(in_f, topo, weight.name)
        self.weight = make_param((out_f, length), [slice_piece(weight, 1, start, length)], [weight], seed)
        self.bias = None
        if bias is not None:
            self.bias = make_param((out_f,), [whole_piece(bias, owner=topo.tp_rank == 0)], [bias], seed,
                                   replicated_over=("tp",))
            sp.mark_partial_sum(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = leave_tp(F.linear(x, self.weight), self.group, self.sp)
        return y if self.bias is None else y + self.bias


def shard_or_raise(size: int, topo: Topology, what: str) -> tuple[int, int]:
    if size % topo.tp:
        raise ValueError(f"{what}: size {size} is not divisible by tensor-model-parallel size {topo.tp}")
    n = size // topo.tp
    return topo.tp_rank * n, n


# --- vocabulary-parallel embedding and cross-entropy -----------------------------

def vocab_piece(spec: CanonicalSpec, padded_vocab: int, topo: Topology, owner: bool = True) -> tuple[int, int, list[Piece]]:
    """This rank's rows of a padded vocab matrix; rows past the real vocab map to nothing."""
    per_rank = padded_vocab // topo.tp
    start = topo.tp_rank * per_rank
    real = max(0, min(spec.shape[0], start + per_rank) - start)
    pieces = [slice_piece(spec, 0, start, real, 0, owner)] if real else []
    return start, per_rank, pieces


class VocabParallelEmbedding(nn.Module):
    """Rows of the (padded) vocabulary split over TP; lookups outside the shard give zero.
    Under sequence parallelism the sum over TP is reduce-scattered into sequence slices."""

    def __init__(self, spec: CanonicalSpec, padded_vocab: int, topo: Topology, seed: int, owner: bool = True,
                 sp: SequenceParallel = SequenceParallel()) -> None:
        super().__init__()
        self.group, self.sp = topo.tp_group, sp
        self.start, self.per_rank, pieces = vocab_piece(spec, padded_vocab, topo, owner)
        self.weight = make_param((self.per_rank, spec.shape[1]), pieces, [spec], seed)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return leave_tp(out, self.group, self.sp)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Megatron's memory-light form: the ``[tokens, vocab]`` buffer is the logits themselves
    (fp32 logits are consumed: shifted, exponentiated and normalised in place, as Megatron
    does; autograd's version check would catch a caller that still needed them), and the
    backward reuses it, so no other ``[tokens, vocab]`` tensor is made."""

    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_size, group):
        logits = logits.float()  # bf16/fp16: the one fp32 copy
        n_local = logits.shape[-1]
        if vocab_start + n_local > vocab_size:  # padding rows never compete
            valid = torch.arange(vocab_start, vocab_start + n_local, device=logits.device) < vocab_size
            logits.masked_fill_(~valid, float("-inf"))
        max_logit = logits.amax(dim=-1)  # the values of max(dim), without its indices
        comm.all_reduce(max_logit, group, op=torch.distributed.ReduceOp.MAX)
        shifted = logits.sub_(max_logit.unsqueeze(-1))
        local_t = target - vocab_start
        in_range = (local_t >= 0) & (local_t < n_local)
        idx = local_t.clamp(0, n_local - 1).unsqueeze(-1)
        target_logit = shifted.gather(-1, idx).squeeze(-1).masked_fill(~in_range, 0.0)
        comm.all_reduce(target_logit, group)
        softmax = shifted.exp_()
        sum_exp = softmax.sum(dim=-1)
        comm.all_reduce(sum_exp, group)
        loss = sum_exp.log() - target_logit
        softmax.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, idx, in_range)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        softmax, idx, in_range = ctx.saved_tensors
        grad = softmax  # the buffer is ours alone: turn it into the gradient in place
        grad.scatter_add_(-1, idx, -in_range.unsqueeze(-1).to(grad.dtype))
        return grad.mul_(g.unsqueeze(-1)), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_start: int,
                                 vocab_size: int, group) -> torch.Tensor:
    """Per-token loss from vocab-sharded logits; padded vocab entries are excluded from softmax."""
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, vocab_size, group)
