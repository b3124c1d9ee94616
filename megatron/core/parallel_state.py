"""The rank grid and its process groups. Nothing else creates process groups.

Rank order is Megatron's: tensor-parallel fastest, then data-parallel, then pipeline:
``rank = tp_rank + tp * (dp_rank + dp * pp_rank)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelDims:
    """Requested parallel degrees; ``dp`` is derived from the world size."""

    world_size: int
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        for name, v in (("tensor-model-parallel-size", self.tp), ("pipeline-model-parallel-size", self.pp)):
            if v < 1:
                raise ValueError(f"--{name} must be >= 1, got {v}")
        if self.world_size % (self.tp * self.pp):
            raise ValueError(
                f"world size {self.world_size} is not divisible by tensor-parallel size {self.tp} x "
                f"pipeline-parallel size {self.pp} = {self.tp * self.pp}; launch a multiple of "
                f"{self.tp * self.pp} processes or change the parallel sizes")

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(tp_rank, dp_rank, pp_rank) of a global rank."""
        return rank % self.tp, (rank // self.tp) % self.dp, rank // (self.tp * self.dp)

    def rank_of(self, tp_rank: int, dp_rank: int, pp_rank: int) -> int:
        return tp_rank + self.tp * (dp_rank + self.dp * pp_rank)


class Topology:
    """This rank's coordinates and the process groups it belongs to.

    Groups are None when the world is a single process; collectives on a group of
    size 1 are skipped by the callers (see ``megatron.core.comm``).
    """

    def __init__(self, dims: ParallelDims, rank: int = 0) -> None:
        self.dims = dims
        self.rank = rank
        self.tp_rank, self.dp_rank, self.pp_rank = dims.coords(rank)
        self.tp_ranks = [dims.rank_of(t, self.dp_rank, self.pp_rank) for t in range(dims.tp)]
        self.dp_ranks = [dims.rank_of(self.tp_rank, d, self.pp_rank) for d in range(dims.dp)]
        self.pp_ranks = [dims.rank_of(self.tp_rank, self.dp_rank, p) for p in range(dims.pp)]
        self.tp_group = self.dp_group = self.pp_group = self.mp_group = self.embedding_group = None
        if dist.is_available() and dist.is_initialized():
            if dist.get_world_size() != dims.world_size:
                raise ValueError(f"torch.distributed world size {dist.get_world_size()} != {dims.world_size}")
            self._build_groups()

    def _build_groups(self) -> None:
        d = self.dims
        # Every rank must create every group, in the same order.
        for p in range(d.pp):
            for dp in range(d.dp):
                g = dist.new_group([d.rank_of(t, dp, p) for t in range(d.tp)])
                if (p, dp) == (self.pp_rank, self.dp_rank):
                    self.tp_group = g
        for p in range(d.pp):
            for t in range(d.tp):
                g = dist.new_group([d.rank_of(t, dp, p) for dp in range(d.dp)])
                if (p, t) == (self.pp_rank, self.tp_rank):
                    self.dp_group = g
        for dp in range(d.dp):
            for t in range(d.tp):
                ranks = [d.rank_of(t, dp, p) for p in range(d.pp)]
                g = dist.new_group(ranks)
                e = dist.new_group(sorted({ranks[0], ranks[-1]}))
                if (dp, t) == (self.dp_rank, self.tp_rank):
                    self.pp_group, self.embedding_group = g, e
        for dp in range(d.dp):
            g = dist.new_group([d.rank_of(t, dp, p) for p in range(d.pp) for t in range(d.tp)])
            if dp == self.dp_rank:
                self.mp_group = g

    @property
    def tp(self) -> int:
        return self.dims.tp

    @property
    def pp(self) -> int:
        return self.dims.pp

    @property
    def dp(self) -> int:
        return self.dims.dp

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.dims.pp - 1

    def describe(self) -> dict:
        return {"world_size": self.world_size, "tp": self.tp, "pp": self.pp, "dp": self.dp}
