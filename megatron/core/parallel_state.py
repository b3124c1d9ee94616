"""The rank grid and its process groups. Nothing else creates process groups.

One grid of ranks, two views of it (as Megatron-Core):

* dense parameters see ``pp x dp x cp x sp x tp`` (slowest to fastest: tp fastest, so
  ``rank = tp + TP * (sp + SP * (cp + CP * (dp + DP * pp)))``);
* expert parameters see ``pp x edp x ep x etp`` over the same ranks.

``cp`` (ring attention) and ``sp`` (Ulysses) are real axes with real groups; Megatron's
sequence parallelism lives inside tp. Every group is named for what flows through it
(``GROUPS``) and built here, in one deterministic order on every rank.

Groups are hand-made with ``new_group`` rather than taken from ``DeviceMesh``: on gloo
with forked workers (torch 2.14) ``init_device_mesh`` plus a flattened ``dp-cp-sp`` sub-mesh
took 5.6 s to start 4 ranks where the same groups by ``new_group`` take 0.02 s, its
flattening is a private API, and the embedding group (first and last pipeline stage) is
not a sub-mesh at all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

DENSE_AXES = ("pp", "dp", "cp", "sp", "tp")
EXPERT_AXES = ("pp", "edp", "ep", "etp")
_FLAGS = {"tp": "--tensor-model-parallel-size", "pp": "--pipeline-model-parallel-size",
          "cp": "--context-parallel-size", "sp": "--ds-sequence-parallel-size",
          "ep": "--expert-model-parallel-size", "etp": "--expert-tensor-parallel-size"}

# name -> (mesh, axes the group spans). "embedding" is built apart: the first and last stage.
GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tp": ("dense", ("tp",)),
    "sp": ("dense", ("sp",)),
    "cp": ("dense", ("cp",)),
    "dp": ("dense", ("dp",)),
    "dp-cp-sp": ("dense", ("dp", "cp", "sp")),  # dense gradients are reduced (and ZeRO-partitioned) here
    "pp": ("dense", ("pp",)),
    "model-parallel": ("dense", ("pp", "tp")),
    "ep": ("expert", ("ep",)),
    "etp": ("expert", ("etp",)),
    "edp": ("expert", ("edp",)),  # expert gradients are reduced (and ZeRO-partitioned) here
    "ep-etp": ("expert", ("ep", "etp")),
}


@dataclass(frozen=True)
class Mesh:
    """Named axes over ranks ``0 .. prod(sizes)-1``, the last axis fastest."""

    axes: tuple[str, ...]
    sizes: tuple[int, ...]

    def coords(self, rank: int) -> dict[str, int]:
        out = {}
        for axis, size in zip(reversed(self.axes), reversed(self.sizes)):
            out[axis] = rank % size
            rank //= size
        return {a: out[a] for a in self.axes}

    def rank_of(self, coords: dict[str, int]) -> int:
        rank = 0
        for axis, size in zip(self.axes, self.sizes):
            rank = rank * size + coords[axis]
        return rank

    def size(self, axes: tuple[str, ...]) -> int:
        return math.prod(self.sizes[self.axes.index(a)] for a in axes)

    def groups_along(self, axes: tuple[str, ...]) -> list[list[int]]:
        """Every group of ranks that differ only in ``axes``, in rank order (the same on every rank)."""
        seen, groups = set(), []
        for r in range(math.prod(self.sizes)):
            if r in seen:
                continue
            group = self.ranks_along(r, axes)
            seen.update(group)
            groups.append(group)
        return groups

    def ranks_along(self, rank: int, axes: tuple[str, ...]) -> list[int]:
        """The ranks that share every coordinate of ``rank`` except those of ``axes``, ordered
        as the group rank (the first of ``axes`` slowest)."""
        base = self.coords(rank)
        sizes = [self.sizes[self.axes.index(a)] for a in axes]
        out = []
        for i in range(math.prod(sizes)):
            c, rest = dict(base), i
            for axis, size in zip(reversed(axes), reversed(sizes)):
                c[axis], rest = rest % size, rest // size
            out.append(self.rank_of(c))
        return out


@dataclass(frozen=True)
class ParallelDims:
    """Requested parallel degrees; ``dp`` and ``edp`` are derived from the world size."""

    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sp: int = 1
    ep: int = 1
    etp: int = 1

    def __post_init__(self) -> None:
        for axis, flag in _FLAGS.items():
            if getattr(self, axis) < 1:
                raise ValueError(f"{flag} must be >= 1, got {getattr(self, axis)}")
        model = self.tp * self.pp * self.cp * self.sp
        if self.world_size % model:
            raise ValueError(
                f"world size {self.world_size} is not divisible by tensor-parallel size {self.tp} x pipeline-parallel "
                f"size {self.pp} x context-parallel size {self.cp} x sequence-parallel size {self.sp} = {model}; launch a "
                f"multiple of {model} processes or change the parallel sizes")
        per_stage = self.world_size // self.pp
        if per_stage % (self.ep * self.etp):
            raise ValueError(
                f"the {per_stage} ranks of a pipeline stage are not divisible by expert-parallel {self.ep} x "
                f"expert-tensor-parallel {self.etp} = {self.ep * self.etp}; choose sizes whose product divides "
                f"{per_stage} (world size {self.world_size} / pipeline-parallel {self.pp})")

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp * self.sp)

    @property
    def edp(self) -> int:
        return self.world_size // (self.pp * self.ep * self.etp)

    @property
    def dense(self) -> Mesh:
        return Mesh(DENSE_AXES, tuple(getattr(self, a) for a in DENSE_AXES))

    @property
    def expert(self) -> Mesh:
        return Mesh(EXPERT_AXES, tuple(getattr(self, a) for a in EXPERT_AXES))

    def mesh(self, kind: str) -> Mesh:
        return self.dense if kind == "dense" else self.expert

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(tp_rank, dp_rank, pp_rank) of a global rank."""
        c = self.dense.coords(rank)
        return c["tp"], c["dp"], c["pp"]

    def describe(self) -> dict[str, int]:
        return {"world_size": self.world_size, **{a: getattr(self, a) for a in DENSE_AXES + ("edp", "ep", "etp")}}


class Topology:
    """This rank's coordinates on both meshes and the named process groups it belongs to.

    ``group(name)`` is None for a group of one rank (and in a single process); the
    collectives in ``megatron.core.comm`` skip those.
    """

    def __init__(self, dims: ParallelDims, rank: int = 0) -> None:
        self.dims, self.rank = dims, rank
        self.coords = dims.dense.coords(rank)
        self.expert_coords = dims.expert.coords(rank)
        self.group_ranks: dict[str, list[int]] = {
            name: dims.mesh(kind).ranks_along(rank, axes) for name, (kind, axes) in GROUPS.items()}
        pp = self.group_ranks["pp"]
        self.group_ranks["embedding"] = sorted({pp[0], pp[-1]})
        self._groups: dict[str, dist.ProcessGroup | None] = dict.fromkeys(self.group_ranks)
        if dist.is_available() and dist.is_initialized():
            if dist.get_world_size() != dims.world_size:
                raise ValueError(f"torch.distributed world size {dist.get_world_size()} != {dims.world_size}")
            self._build_groups()

    def _build_groups(self) -> None:
        """Every rank creates every group of more than one rank, in the same order."""
        for name, (kind, axes) in GROUPS.items():
            mesh = self.dims.mesh(kind)
            if mesh.size(axes) == 1:
                continue
            for ranks in mesh.groups_along(axes):
                g = dist.new_group(ranks)
                if self.rank in ranks:
                    self._groups[name] = g
        if self.dims.pp > 1:
            for ranks in self.dims.dense.groups_along(("pp",)):
                g = dist.new_group(sorted({ranks[0], ranks[-1]}))
                if self.rank in ranks:
                    self._groups["embedding"] = g
        if dist.get_backend() == "nccl":
            # NCCL creates communicators lazily; a first p2p batch must not be the first call on a group.
            for name in ("pp", "embedding", "cp"):
                if self._groups[name] is not None:
                    dist.barrier(group=self._groups[name], device_ids=[torch.cuda.current_device()])

    def group(self, name: str) -> dist.ProcessGroup | None:
        if name not in self._groups:
            raise KeyError(f"no process group named {name!r}; known: {sorted(self._groups)}")
        return self._groups[name]

    def group_rank(self, name: str) -> int:
        return self.group_ranks[name].index(self.rank)

    def group_size(self, name: str) -> int:
        return len(self.group_ranks[name])

    @property
    def device(self) -> torch.device:
        """Where collective buffers live: the current GPU under NCCL, else the CPU."""
        if dist.is_initialized() and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # Shorthands the layers and the schedule use.
    tp = property(lambda self: self.dims.tp)
    pp = property(lambda self: self.dims.pp)
    dp = property(lambda self: self.dims.dp)
    world_size = property(lambda self: self.dims.world_size)
    tp_rank = property(lambda self: self.coords["tp"])
    dp_rank = property(lambda self: self.coords["dp"])
    pp_rank = property(lambda self: self.coords["pp"])
    tp_ranks = property(lambda self: self.group_ranks["tp"])
    dp_ranks = property(lambda self: self.group_ranks["dp"])
    pp_ranks = property(lambda self: self.group_ranks["pp"])
    tp_group = property(lambda self: self._groups["tp"])
    dp_group = property(lambda self: self._groups["dp"])
    pp_group = property(lambda self: self._groups["pp"])
    mp_group = property(lambda self: self._groups["model-parallel"])
    embedding_group = property(lambda self: self._groups["embedding"])

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.dims.pp - 1

    def describe(self) -> dict[str, int]:
        return self.dims.describe()

    def position(self, group: str) -> dict[str, int]:
        """This rank's coordinates on ``group``'s mesh outside ``group``'s axes: what tells apart the
        local tensors of a parameter replicated or partitioned over ``group``."""
        kind, axes = GROUPS[group]
        coords = self.coords if kind == "dense" else self.expert_coords
        return {a: c for a, c in coords.items() if a not in axes}

    def rank_key(self) -> dict[str, int]:
        """This rank's full coordinates on both meshes: what keys its checkpoint file."""
        return {**self.coords, **{a: self.expert_coords[a] for a in ("edp", "ep", "etp")}}
