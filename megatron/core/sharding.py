"""The sharding record: how one local parameter relates to the canonical tensors and the mesh.

Layers attach one ``ShardingRecord`` to every parameter they make (``param.sharding``).
The gradient sync, the gradient norm, ZeRO and save / convert / load read it and
nothing else, so none of them needs to know a layer type. Groups are named as in
``megatron.core.parallel_state.GROUPS``. Pure data: no torch.distributed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from megatron.core.pieces import CanonicalSpec, PieceMap

DENSE_REDUCE_GROUP = "dp-cp-sp"
REDUCE_OPS = ("sum", "avg")


@dataclass(frozen=True)
class PartialSum:
    """The local gradient is only part of the true one: sum it over ``group`` first.

    ``rows`` (local ``start, count``) limits the sum to some rows; ``slot`` = ``(slot,
    num_slots)`` says those rows are shared by only the members of ``group`` with the same
    slot (a KV head repeated on some TP ranks). A whole-tensor partial sum (a tied
    embedding on the first and last stage) commutes with any partition, so it is applied
    after the data-parallel reduction, on whatever shard this rank keeps.
    """

    group: str
    rows: tuple[int, int] | None = None
    slot: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if (self.rows is None) != (self.slot is None):
            raise ValueError(f"PartialSum over {self.group}: give rows and slot together, got {self}")

    @property
    def whole(self) -> bool:
        return self.rows is None


@dataclass(frozen=True)
class ShardingRecord:
    """One local parameter: its canonical pieces, and the groups that replicate, reduce and
    partition it.

    ``replica_groups``: groups whose members hold the same values (a norm on every TP rank,
    the tied embedding on the first and last stage, every dense parameter over dp-cp-sp);
    replicas that do not own their piece say so (``Piece.owner``). ``grad_reduce_group`` /
    ``grad_reduce_op``: how the data-parallel gradient is combined. ``zero_group``: the group
    ZeRO partitions the parameter's optimizer state (and at stage 2-3 gradient, at 3 value)
    over. ``partial_sums``: gradient parts to add up first.
    """

    piece_map: PieceMap
    specs: dict[str, CanonicalSpec]
    replica_groups: tuple[str, ...] = (DENSE_REDUCE_GROUP,)
    grad_reduce_group: str = DENSE_REDUCE_GROUP
    grad_reduce_op: str = "sum"
    zero_group: str = DENSE_REDUCE_GROUP
    partial_sums: tuple[PartialSum, ...] = ()

    def __post_init__(self) -> None:
        if self.grad_reduce_op not in REDUCE_OPS:
            raise ValueError(f"grad_reduce_op must be one of {REDUCE_OPS}, got {self.grad_reduce_op!r}")
        missing = {p.canonical for p in self.piece_map.pieces} - set(self.specs)
        if missing:
            raise ValueError(f"pieces of {sorted(missing)} have no canonical spec")

    @property
    def local_shape(self) -> tuple[int, ...]:
        return self.piece_map.local_shape

    @property
    def weight_decay(self) -> bool:
        flags = {s.weight_decay for s in self.specs.values()}
        if len(flags) != 1:
            raise ValueError(f"parameter fuses tensors with and without weight decay: {sorted(self.specs)}")
        return flags.pop()

    def with_partial_sum(self, part: PartialSum, replica_group: str | None = None) -> "ShardingRecord":
        """A copy that also sums ``part`` (and, if given, is replicated over ``replica_group``)."""
        replicas = self.replica_groups + ((replica_group,) if replica_group else ())
        return dataclasses.replace(self, partial_sums=self.partial_sums + (part,), replica_groups=replicas)


def sharding_of(p: nn.Parameter) -> ShardingRecord:
    """The record a layer attached to ``p``; a clear error for a parameter made elsewhere."""
    record = getattr(p, "sharding", None)
    if not isinstance(record, ShardingRecord):
        raise TypeError(f"parameter of shape {tuple(p.shape)} has no ShardingRecord: make parameters with "
                        f"megatron.core.tensor_parallel.make_param so save, load and ZeRO know their layout")
    return record
