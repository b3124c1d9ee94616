"""Which rank reads each checkpoint block on a resharded load (pure: no processes, no files).

Every rank states the byte intervals of each file it needs. The plan gives every needed block
exactly one owner, which reads it, verifies its checksum and sends the other ranks their
slices of it: the job reads each needed block once. Owners balance bytes over ranks, prefer a
rank that needs the block itself (fewer bytes on the wire) and take consecutive blocks together
(sequential reads).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RUN_BLOCKS = 8  # blocks assigned as one unit at most: runs stay sequential, balance stays fine
SLACK = 1.05  # a rank takes blocks it needs itself up to this times the mean share


@dataclass(frozen=True)
class FileBlocks:
    """A checkpoint file's size and checksum block size."""

    name: str
    size: int
    block_size: int

    @property
    def nblocks(self) -> int:
        return -(-self.size // self.block_size)

    def block_bytes(self) -> np.ndarray:
        sizes = np.full(self.nblocks, self.block_size, dtype=np.int64)
        if self.nblocks:
            sizes[-1] = self.size - (self.nblocks - 1) * self.block_size
        return sizes


def merge_intervals(intervals: np.ndarray) -> np.ndarray:
    """Byte intervals (n, 2) as sorted, disjoint intervals; touching ones become one."""
    iv = np.asarray(intervals, dtype=np.int64).reshape(-1, 2)
    iv = iv[iv[:, 1] > iv[:, 0]]
    if len(iv) == 0:
        return iv
    iv = iv[np.lexsort((iv[:, 1], iv[:, 0]))]
    reach = np.maximum.accumulate(iv[:, 1])
    starts = np.concatenate(([True], iv[1:, 0] > reach[:-1]))
    first = np.flatnonzero(starts)
    last = np.concatenate((first[1:] - 1, [len(iv) - 1]))
    return np.stack((iv[first, 0], reach[last]), axis=1)


def blocks_touched(intervals: np.ndarray, f: FileBlocks) -> np.ndarray:
    """A bool per block of ``f``: does any interval touch it."""
    iv = np.asarray(intervals, dtype=np.int64).reshape(-1, 2)
    iv = iv[iv[:, 1] > iv[:, 0]]
    diff = np.zeros(f.nblocks + 1, dtype=np.int64)
    np.add.at(diff, iv[:, 0] // f.block_size, 1)
    np.add.at(diff, (iv[:, 1] - 1) // f.block_size + 1, -1)
    return np.cumsum(diff[:-1]) > 0


def assign_owners(files: list[FileBlocks], needs: list[dict[str, np.ndarray]],
                  pinned: dict[str, dict[int, int]] | None = None) -> dict[str, np.ndarray]:
    """Owner rank of every block of every file (-1: nobody needs it). ``needs[r][name]`` are rank
    r's byte intervals of file ``name``; ``pinned[name][block] = r``: rank r has read that block
    already (a header), so it owns it. Deterministic: every rank computes the same plan."""
    world, pinned = len(needs), pinned or {}
    load = np.zeros(world, dtype=np.int64)
    owners: dict[str, np.ndarray] = {}
    units = []  # (number of needers, order, file, first block, end block, needers, bytes)
    # Units short enough that the last ones can even out the shares (16 or more per rank).
    run = max(1, min(RUN_BLOCKS, sum(f.nblocks for f in files) // (16 * max(world, 1))))
    for f in files:
        sizes = f.block_bytes()
        mask = np.stack([blocks_touched(n.get(f.name, np.zeros((0, 2))), f) for n in needs]) \
            if world else np.zeros((0, f.nblocks), dtype=bool)
        owner = np.full(f.nblocks, -1, dtype=np.int64)
        for block, rank in pinned.get(f.name, {}).items():
            owner[block] = rank
            load[rank] += sizes[block]
        free = mask.any(axis=0) & (owner < 0)
        owners[f.name] = owner
        # Units: runs of free blocks with the same needers, cut every ``run`` blocks.
        change = np.ones(f.nblocks, dtype=bool)
        if f.nblocks > 1:
            change[1:] = (mask[:, 1:] != mask[:, :-1]).any(axis=0) | (free[1:] != free[:-1])
        starts = np.flatnonzero(change)
        ends = np.concatenate((starts[1:], [f.nblocks])).astype(np.int64)
        for a, b in zip(starts.tolist(), ends.tolist()):
            if not free[a]:
                continue
            needers = np.flatnonzero(mask[:, a]).tolist()
            for lo in range(a, b, run):
                hi = min(b, lo + run)
                units.append((len(needers), len(units), f.name, lo, hi, needers, int(sizes[lo:hi].sum())))
    cap = SLACK * (int(load.sum()) + sum(u[6] for u in units)) / max(world, 1)
    for _, _, name, lo, hi, needers, nbytes in sorted(units, key=lambda u: (u[0], u[1])):
        rank = min(needers, key=lambda r: (load[r], r))
        if load[rank] + nbytes > cap:  # it has its share: the least loaded rank reads this and sends it
            rank = int(np.argmin(load))
        owners[name][lo:hi] = rank
        load[rank] += nbytes
    return owners


def split_by_owner(intervals: np.ndarray, owner: np.ndarray, block_size: int) -> tuple[np.ndarray, ...]:
    """Sorted disjoint intervals cut where the block owner changes: (starts, ends, owners)."""
    iv = np.asarray(intervals, dtype=np.int64).reshape(-1, 2)
    if len(iv) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    changes = (np.flatnonzero(owner[1:] != owner[:-1]) + 1) * block_size
    changes = changes[(changes > iv[0, 0]) & (changes < iv[-1, 1])]  # only those inside the intervals
    points = np.sort(np.concatenate((iv.ravel(), changes)))
    points = points[np.concatenate(([True], points[1:] != points[:-1]))]
    lo, hi = points[:-1], points[1:]
    index = np.searchsorted(iv[:, 0], lo, side="right") - 1
    inside = (index >= 0) & (lo < iv[np.maximum(index, 0), 1])
    lo, hi = lo[inside], hi[inside]
    return lo, hi, owner[lo // block_size]


def block_runs(starts: np.ndarray, ends: np.ndarray, block_size: int) -> list[tuple[int, int]]:
    """The byte ranges of the whole blocks that sorted disjoint intervals [starts, ends) touch,
    consecutive blocks as one range."""
    if not len(starts):
        return []
    first, last = starts // block_size, (ends - 1) // block_size
    reach = np.maximum.accumulate(last)
    new = np.concatenate(([True], first[1:] > reach[:-1] + 1))
    heads = np.flatnonzero(new)
    tails = np.concatenate((heads[1:] - 1, [len(first) - 1]))
    return [(a * block_size, (b + 1) * block_size) for a, b in zip(first[heads].tolist(), reach[tails].tolist())]
