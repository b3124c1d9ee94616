"""Gradient sums a sharding record asks for, and which gradient elements the global norm counts.

Both read only ``ShardingRecord``s, so a new kind of replication is a new record, not a
new case here.
"""
from __future__ import annotations

import torch

from megatron.core import comm
from megatron.core.parallel_state import Topology
from megatron.core.pieces import Box, flat_range_boxes, intersect
from megatron.core.sharding import ShardingRecord


def sum_row_partials(record: ShardingRecord, grad: torch.Tensor, topo: Topology) -> None:
    """Sum the rows whose gradient each member of a group has only in part (before the DP
    reduction, on the full local gradient ``grad``, param-shaped). Each member writes its rows
    into its slot of a shared buffer; after an all-reduce every member of a slot has the sum."""
    for part in record.partial_sums:
        if part.whole:
            continue
        (row_start, rows), (slot, num_slots) = part.rows, part.slot
        piece = grad[row_start:row_start + rows]
        buf = torch.zeros((num_slots, *piece.shape), dtype=grad.dtype, device=grad.device)
        buf[slot] = piece
        comm.all_reduce(buf, topo.group(part.group))
        piece.copy_(buf[slot])


def sum_whole_partials(record: ShardingRecord, grad: torch.Tensor, topo: Topology) -> None:
    """Sum whole-tensor partial gradients (tied embeddings) on any shard of the gradient,
    after the DP reduction: every holder then adds the same DP-reduced values in the same
    order, so the copies stay bit-identical."""
    for part in record.partial_sums:
        if part.whole:
            comm.all_reduce(grad, topo.group(part.group))


def counted_boxes(record: ShardingRecord, start: int, end: int) -> list[Box]:
    """The boxes of flat elements [start, end) of the local tensor that this rank counts in the
    global gradient norm: those in pieces it owns (replicas and padding count nowhere else)."""
    shape = record.local_shape
    out = []
    for box in flat_range_boxes(shape, start, end):
        for piece in record.piece_map.pieces:
            if piece.owner:
                overlap = intersect(box, (piece.local_offsets, piece.sizes))
                if overlap is not None:
                    out.append(overlap)
    return out
