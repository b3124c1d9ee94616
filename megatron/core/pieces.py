"""The vocabulary of canonical tensors and piece maps (DESIGN §3).

A *canonical tensor* is the parallelism-free form of one piece of training state.
A *piece* maps a box of a local tensor to a box of a canonical tensor. Layers build
their piece maps at construction; save, convert and load only ever read them.
This module is pure: no torch.distributed, no files.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)


@dataclass(frozen=True)
class CanonicalSpec:
    """A canonical tensor: its global name and shape, and how it is initialised."""

    name: str
    shape: tuple[int, ...]
    init: str = "normal"  # "normal" | "zeros" | "ones"
    std: float = 0.02
    weight_decay: bool = True

    def __post_init__(self) -> None:
        if self.init not in ("normal", "zeros", "ones"):
            raise ValueError(f"{self.name}: unknown init {self.init!r}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Piece:
    """A box of a local tensor that holds a box of a canonical tensor.

    ``owner`` is False on replicas (norm weights on TP ranks > 0, the tied word
    embedding on the last pipeline stage, a KV head repeated over TP ranks): the
    same canonical elements live on another rank that owns them.
    """

    canonical: str
    local_offsets: tuple[int, ...]
    canonical_offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    owner: bool = True

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> "Piece":
        return Piece(d["canonical"], tuple(d["local_offsets"]), tuple(d["canonical_offsets"]),
                     tuple(d["sizes"]), bool(d["owner"]))


@dataclass
class PieceMap:
    """Every piece of one local tensor. Local elements covered by no piece are padding."""

    local_shape: tuple[int, ...]
    pieces: list[Piece] = field(default_factory=list)


def shard_range(size: int, rank: int, world: int, what: str = "dimension") -> tuple[int, int]:
    """(start, length) of rank's equal share of ``size``; refuses sizes that do not divide."""
    if size % world:
        raise ValueError(f"{what} of size {size} is not divisible by {world}")
    n = size // world
    return rank * n, n


def slice_piece(canonical: CanonicalSpec, dim: int, start: int, length: int,
                local_dim_offset: int = 0, owner: bool = True) -> Piece:
    """A piece holding ``[start, start+length)`` of ``canonical`` along ``dim`` (whole elsewhere)."""
    ndim = len(canonical.shape)
    local_off = tuple(local_dim_offset if d == dim else 0 for d in range(ndim))
    canon_off = tuple(start if d == dim else 0 for d in range(ndim))
    sizes = tuple(length if d == dim else canonical.shape[d] for d in range(ndim))
    return Piece(canonical.name, local_off, canon_off, sizes, owner)


def whole_piece(canonical: CanonicalSpec, owner: bool = True) -> Piece:
    """The whole canonical tensor, unsharded (norms, replicated biases)."""
    ndim = len(canonical.shape)
    return Piece(canonical.name, (0,) * ndim, (0,) * ndim, tuple(canonical.shape), owner)


def intersect(a: Box, b: Box) -> Box | None:
    """The intersection of two boxes, or None if they do not overlap."""
    offs, sizes = [], []
    for ao, asz, bo, bsz in zip(a[0], a[1], b[0], b[1]):
        lo, hi = max(ao, bo), min(ao + asz, bo + bsz)
        if hi <= lo:
            return None
        offs.append(lo)
        sizes.append(hi - lo)
    return tuple(offs), tuple(sizes)


def translate(box: Box, src_origin: Sequence[int], dst_origin: Sequence[int]) -> Box:
    """Move a box from one coordinate frame to another (piece local <-> canonical)."""
    return tuple(o - s + d for o, s, d in zip(box[0], src_origin, dst_origin)), box[1]


def flat_range_boxes(shape: Sequence[int], start: int, end: int) -> Iterator[Box]:
    """Decompose the row-major flat range [start, end) of ``shape`` into boxes."""
    shape = tuple(shape)
    if start >= end:
        return
    if len(shape) <= 1:
        yield (start,), (end - start,)
        return
    inner = math.prod(shape[1:])
    first_row, last_row = start // inner, (end - 1) // inner
    if first_row == last_row:
        for off, sz in flat_range_boxes(shape[1:], start - first_row * inner, end - first_row * inner):
            yield (first_row, *off), (1, *sz)
        return
    row = first_row
    if start % inner:
        for off, sz in flat_range_boxes(shape[1:], start % inner, inner):
            yield (row, *off), (1, *sz)
        row += 1
    full_end = end // inner
    if full_end > row:
        yield (row,) + (0,) * (len(shape) - 1), (full_end - row, *shape[1:])
    if end % inner:
        for off, sz in flat_range_boxes(shape[1:], 0, end % inner):
            yield (full_end, *off), (1, *sz)


def box_slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(box[0], box[1]))


def box_runs(shape: Sequence[int], box: Box) -> tuple[int, list[tuple[int, tuple[int, ...]]]]:
    """A box of a row-major tensor as contiguous runs: (run length, [(flat start, index of the run
    in the box's leading dims)]). Trailing dims the box spans whole are folded into each run, so a
    column slice of a matrix is one run per row and a block of whole rows is a single run."""
    run, starts = box_run_starts(shape, box)
    return run, list(zip(starts.tolist(), box_run_indices(shape, box)))


def box_run_indices(shape: Sequence[int], box: Box) -> Iterator[tuple[int, ...]]:
    """The index of each of ``box_runs``'s runs in the box's leading dims, in the same order."""
    return itertools.product(*(range(n) for n in box[1][:_run_dim(shape, box[1])]))


def _run_dim(shape: Sequence[int], sizes: Sequence[int]) -> int:
    """The first dim a run covers: trailing dims the box spans whole fold into the run."""
    k = len(shape) - 1
    while k > 0 and sizes[k] == shape[k]:
        k -= 1
    return k


def box_run_starts(shape: Sequence[int], box: Box) -> tuple[int, np.ndarray]:
    """``box_runs`` without the indices, as an array: (run length, flat starts in row-major
    order of the box's leading dims), for reading many short runs at once."""
    shape, (offsets, sizes) = tuple(shape), box
    if math.prod(sizes) == 0:
        return 0, np.zeros(0, dtype=np.int64)
    if not shape:
        return 1, np.zeros(1, dtype=np.int64)
    k = _run_dim(shape, sizes)
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    starts = np.full(1, sum(o * s for o, s in zip(offsets, strides)), dtype=np.int64)
    for n, stride in zip(sizes[:k], strides[:k]):  # row-major: the last leading dim varies fastest
        starts = (starts[:, None] + np.arange(n, dtype=np.int64) * stride).reshape(-1)
    return sizes[k] * strides[k], starts


def run_pairs(src_shape: Sequence[int], src_box: Box, dst_shape: Sequence[int],
              dst_box: Box) -> tuple[int, list[tuple[int, int]]]:
    """The same box (equal sizes) in two row-major tensors, as runs contiguous in both: (run
    length, [(flat start in src, flat start in dst)]) in row-major order of the box. Trailing
    dims are folded into the runs only where the box spans them whole in both tensors, so a
    TP column slice of a matrix is one run per row and whole rows of an unsplit one are one run."""
    sizes = tuple(src_box[1])
    if tuple(dst_box[1]) != sizes:
        raise ValueError(f"boxes of sizes {sizes} and {tuple(dst_box[1])} differ")
    if math.prod(sizes) == 0:
        return 0, []
    if not sizes:
        return 1, [(0, 0)]
    k = len(sizes) - 1
    while k > 0 and sizes[k] == src_shape[k] == dst_shape[k]:
        k -= 1
    src_strides = [math.prod(src_shape[d + 1:]) for d in range(len(sizes))]
    dst_strides = [math.prod(dst_shape[d + 1:]) for d in range(len(sizes))]
    src_base = sum(o * s for o, s in zip(src_box[0], src_strides))
    dst_base = sum(o * s for o, s in zip(dst_box[0], dst_strides))
    pairs = [(src_base + sum(i * s for i, s in zip(index, src_strides)),
              dst_base + sum(i * s for i, s in zip(index, dst_strides)))
             for index in itertools.product(*(range(n) for n in sizes[:k]))]
    return sizes[k] * src_strides[k], pairs


def box_flat_span(shape: Sequence[int], box: Box) -> tuple[int, int]:
    """The smallest flat range [lo, hi) of a row-major tensor that contains ``box``."""
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    lo = sum(o * s for o, s in zip(box[0], strides))
    hi = sum((o + n - 1) * s for o, n, s in zip(box[0], box[1], strides)) + 1
    return lo, hi


def strided_view(flat: torch.Tensor, shape: tuple[int, ...], start: int, box: Box) -> torch.Tensor:
    """The elements of ``box`` of a row-major tensor of ``shape`` whose flat elements from
    ``start`` on are stored in ``flat``."""
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    origin = sum(o * s for o, s in zip(box[0], strides)) - start
    return flat.as_strided(box[1], strides, flat.storage_offset() + origin)
