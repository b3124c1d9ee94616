"""Initialise shards of canonical tensors without materialising the whole tensor.

Each canonical tensor is cut into fixed-size tiles; tile ``t`` of tensor ``name`` is
drawn from a generator seeded by (seed, name, t). A rank generates only the tiles
its pieces overlap, so the initial model is the same on every layout (DESIGN §4).
"""
from __future__ import annotations

import hashlib
import itertools

import torch

from megatron.core.pieces import (Box, CanonicalSpec, PieceMap, box_slices, flat_range_boxes, intersect, strided_view,
                                  translate)

TILE_1D = 1 << 16
TILE_2D = 256


def tile_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 1:
        return (TILE_1D,)
    return (1,) * (len(shape) - 2) + (TILE_2D, TILE_2D)


def _tile_seed(seed: int, name: str, tile_index: tuple[int, ...]) -> int:
    key = f"{seed}/{name}/{','.join(map(str, tile_index))}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def init_region(spec: CanonicalSpec, seed: int, box: Box) -> torch.Tensor:
    """The fp32 initial values of ``box`` of canonical tensor ``spec``."""
    sizes = box[1]
    if spec.init == "zeros":
        return torch.zeros(sizes)
    if spec.init == "ones":
        return torch.ones(sizes)
    out = torch.empty(sizes)
    tile = tile_shape(spec.shape)
    ranges = [range(o // t, (o + s - 1) // t + 1) for o, s, t in zip(box[0], box[1], tile)]
    gen = torch.Generator()
    for index in itertools.product(*ranges):
        t_off = tuple(i * t for i, t in zip(index, tile))
        t_size = tuple(min(t, n - o) for t, n, o in zip(tile, spec.shape, t_off))
        gen.manual_seed(_tile_seed(seed, spec.name, index))
        values = torch.randn(t_size, generator=gen).mul_(spec.std)
        overlap = intersect((t_off, t_size), box)
        if overlap is None:
            continue
        src = translate(overlap, t_off, (0,) * len(t_off))
        dst = translate(overlap, box[0], (0,) * len(t_off))
        out[box_slices(dst)] = values[box_slices(src)]
    return out


def init_local(piece_map: PieceMap, specs: dict[str, CanonicalSpec], seed: int) -> torch.Tensor:
    """The fp32 initial value of a local tensor: its pieces from the canonical init, padding zero."""
    out = torch.zeros(piece_map.local_shape)
    for p in piece_map.pieces:
        values = init_region(specs[p.canonical], seed, (p.canonical_offsets, p.sizes))
        out[box_slices((p.local_offsets, p.sizes))] = values
    return out


def init_flat_range(piece_map: PieceMap, specs: dict[str, CanonicalSpec], seed: int, start: int,
                    end: int) -> torch.Tensor:
    """Flat elements ``[start, end)`` of ``init_local``'s value, generating only the tiles they
    overlap: a ZeRO-3 rank initialises its chunk without the rest of the local tensor."""
    out = torch.zeros(end - start)
    for box in flat_range_boxes(piece_map.local_shape, start, end):
        for p in piece_map.pieces:
            overlap = intersect(box, (p.local_offsets, p.sizes))
            if overlap is not None:
                region = translate(overlap, p.local_offsets, p.canonical_offsets)
                strided_view(out, piece_map.local_shape, start, overlap).copy_(
                    init_region(specs[p.canonical], seed, region))
    return out
