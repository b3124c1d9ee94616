"""A planned resharded load: each needed checkpoint block is read and verified by one rank,
which sends the other ranks the slices of it they need.

1. Headers: rank ``i % world`` reads and verifies file ``i``'s header; one all_gather_object
   hands it to the others (with any rank's failure).
2. Needs: every rank walks its load once with the reads recorded, not done (``BlockRouter``),
   and groups its items into rounds of at most ``EXCHANGE_BUDGET`` bytes; one
   all_gather_object shares every rank's byte intervals by round (with any rank's failure).
3. Plan: ``read_plan.assign_owners``, the same on every rank, gives each needed block one owner.
4. Rounds: owners verify and pack what each rank needs in the round, one batch_isend_irecv
   moves it, and each rank fills its round's items (its own blocks straight from the file).
A failure on any rank (a corrupted block, found by its owner) is agreed before the next
transfer (one small all_reduce per round while none fails), so every rank raises the same
error instead of waiting for a peer that stopped.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from megatron.checkpointing.agree import as_checkpoint_error, raise_if_any_failed
from megatron.checkpointing.read_plan import FileBlocks, assign_owners, block_runs, merge_intervals, split_by_owner
from megatron.checkpointing.reader import CheckpointReader
from megatron.checkpointing.safetensors_io import (BLOCK_SIZE, CheckpointError, SafetensorsReader, SharedHeader,
                                                   copy_runs)
from megatron.core.parallel_state import Topology

EXCHANGE_BUDGET = 128 << 20  # bytes a rank receives and fills per round: bounds the load's extra memory

T = TypeVar("T")
Needs = dict[str, np.ndarray]  # file name -> sorted disjoint byte intervals (n, 2)


def _block_size(f: SafetensorsReader) -> int:
    return f.info.get("block_size", BLOCK_SIZE)


class BlockRouter:
    """What ``SafetensorsReader.read`` does on a planned load: record the byte ranges asked for
    (planning: nothing is read, the values are left as they are), or serve them: blocks this
    rank owns are verified and read from the file, the others come from the bytes their owners
    sent this round."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.recording: list[tuple[str, int, int]] | None = None
        self.owners: dict[str, np.ndarray] = {}
        self._cuts: dict[str, np.ndarray] = {}  # blocks where the owner changes
        self._block_sizes: dict[str, int] = {}
        self._split: dict[int, tuple[Needs, dict]] = {}  # needs cut by owner (segments), by id
        self.received: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # starts, ends, offsets
        self.buffer = np.zeros(0, dtype=np.uint8)  # this round's bytes from other ranks

    def set_owners(self, owners: dict[str, np.ndarray], block_sizes: dict[str, int]) -> None:
        self.owners, self._block_sizes = owners, block_sizes
        self._cuts = {n: np.flatnonzero(o[1:] != o[:-1]) + 1 for n, o in owners.items()}

    def read(self, file: SafetensorsReader, lo: int, hi: int) -> np.ndarray:
        """File bytes [lo, hi) as uint8 (a view where one rank owns them all)."""
        if self.recording is None and hi > lo:
            owner, bs = self.owners[os.path.basename(file.path)], _block_size(file)
            first, last = lo // bs, (hi - 1) // bs
            if first == last or (owner[first:last + 1] == owner[first]).all():
                return self._segment(file, os.path.basename(file.path), int(owner[first]), lo, hi)
        out = np.zeros(max(hi - lo, 0), dtype=np.uint8)
        self.read_into(file, lo, hi, out)
        return out

    def read_into(self, file: SafetensorsReader, lo: int, hi: int, out: np.ndarray | None) -> None:
        """File bytes [lo, hi) into ``out`` (uint8, contiguous), segment by owner; while
        recording, nothing is written (``out`` may be None)."""
        name = os.path.basename(file.path)
        if self.recording is not None:
            if hi > lo:
                self.recording.append((name, lo, hi))
            return
        if hi <= lo:
            return
        owner, bs = self.owners[name], _block_size(file)
        first, last = lo // bs, (hi - 1) // bs
        cuts = self._cuts[name]
        inner = cuts[np.searchsorted(cuts, first + 1):np.searchsorted(cuts, last, side="right")] * bs
        points = [lo, *inner.tolist(), hi]
        for a, b in zip(points, points[1:]):
            out[a - lo:b - lo] = self._segment(file, name, int(owner[a // bs]), a, b)

    def read_runs(self, file: SafetensorsReader, lo: np.ndarray, nbytes: int, out: np.ndarray) -> None:
        """File bytes [a, a + nbytes) for every a of ``lo`` into the rows of ``out`` (float32):
        ``read`` for many short runs, with the owner lookups done for all of them at once."""
        name = os.path.basename(file.path)
        if self.recording is not None:
            if nbytes > 0:
                self.recording.extend((name, a, a + nbytes) for a in lo.tolist())
            return
        if not len(lo) or nbytes <= 0:
            return
        owner, bs = self.owners[name], _block_size(file)
        first, last = lo // bs, (lo + nbytes - 1) // bs
        whole = (last - first <= 1) & (owner[first] == owner[last])  # one owner (runs over 2 blocks: read apart)
        mine = whole & (owner[first] == self.rank)
        if mine.any():
            file.verify_ranges(lo[mine], lo[mine] + nbytes)
            _copy_rows(file.mm, lo[mine], nbytes, out, mine)
        theirs = whole & ~mine
        if theirs.any():
            starts, ends, offsets = self.received.get(name, (np.zeros(0, np.int64),) * 3)
            k = np.searchsorted(starts, lo[theirs], side="right") - 1
            served = (k >= 0) & (lo[theirs] + nbytes <= ends[np.maximum(k, 0)]) if len(starts) else k >= 0
            if not served.all():
                a = int(lo[theirs][~served][0])
                raise _unserved(file, a, a + nbytes, int(owner[a // bs]))
            _copy_rows(self.buffer, offsets[k] + lo[theirs] - starts[k], nbytes, out, theirs)  # from the received
        for i in np.flatnonzero(~whole).tolist():
            out[i] = self.read(file, int(lo[i]), int(lo[i]) + nbytes).view(np.float32)

    def _segment(self, file: SafetensorsReader, name: str, owner: int, a: int, b: int) -> np.ndarray:
        if owner == self.rank:
            file.verify(a, b)
            return file.mm[a:b]
        got = self.received.get(name)
        if got is not None:
            starts, ends, offsets = got
            k = int(np.searchsorted(starts, a, side="right")) - 1
            if k >= 0 and b <= ends[k]:
                at = int(offsets[k] + a - starts[k])
                return self.buffer[at:at + b - a]
        raise _unserved(file, a, b, owner)

    def segments(self, needs: Needs, src: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """The parts of ``needs`` whose blocks rank ``src`` owns: (file, starts, ends), in the
        order both the sender and the receiver lay them out."""
        out = []
        split = self._split.get(id(needs))
        if split is None or split[0] is not needs:  # cut once per needs, for every owner
            split = self._split[id(needs)] = (needs, {name: split_by_owner(needs[name], self.owners[name],
                                                                          self._block_sizes[name])
                                                      for name in sorted(needs)})
        for name, (lo, hi, own) in split[1].items():
            keep = own == src
            if keep.any():
                out.append((name, lo[keep], hi[keep]))
        return out

    def pack(self, files: dict[str, SafetensorsReader], needs: Needs, out: np.ndarray) -> np.ndarray:
        """This rank's blocks' bytes that ``needs`` asks for, verified, in ``segments`` order,
        copied into the start of ``out`` (uint8, large enough: ``packed_size``); returns that part."""
        at, segments = 0, self.segments(needs, self.rank)
        for name, starts, ends in segments:
            f = files[name]
            f.verify_ranges(starts, ends)
            for a, b in zip(starts.tolist(), ends.tolist()):
                out[at:at + b - a] = f.mm[a:b]
                at += b - a
        for name, starts, ends in segments:
            if len(starts):  # copied out: keep only what is still needed mapped
                files[name].release_bytes(int(starts.min()), int(ends.max()))
        return out[:at]

    def packed_size(self, needs: Needs, src: int) -> int:
        """Bytes of ``needs`` whose blocks rank ``src`` owns."""
        return int(sum((e - s).sum() for _, s, e in self.segments(needs, src)))

    def prefetch(self, files: dict[str, SafetensorsReader], needs: Sequence[Needs]) -> None:
        """Start reading from storage, in the background, the blocks of this rank's that
        ``needs`` (every rank's, for one round) ask for: whole blocks, which verification reads."""
        for each in needs:
            for name, starts, ends in self.segments(each, self.rank):
                for a, b in block_runs(starts, ends, self._block_sizes[name]):
                    files[name].prefetch_bytes(a, b)

    def receive(self, buffer: np.ndarray, pieces: dict[str, list[tuple[np.ndarray, ...]]]) -> None:
        """This round's bytes from other ranks: ``buffer``, and by file the file ranges [starts,
        ends) it holds with the ``offsets`` in ``buffer`` where they begin (arrays, by source)."""
        self.buffer, self.received, self._split = buffer, {}, {}
        for name, got in pieces.items():
            starts, ends, offsets = (np.concatenate([g[i] for g in got]) for i in range(3))
            order = np.argsort(starts, kind="stable")
            self.received[name] = (starts[order], ends[order], offsets[order])


def _copy_rows(data: np.ndarray, lo: np.ndarray, nbytes: int, out: np.ndarray, rows: np.ndarray) -> None:
    """``copy_runs`` into the rows of ``out`` that the mask ``rows`` selects (``lo``: their runs)."""
    if rows.all():
        copy_runs(data, lo, nbytes, out)
        return
    picked = np.empty((len(lo), nbytes // 4), dtype=np.float32)
    copy_runs(data, lo, nbytes, picked)
    out[np.flatnonzero(rows)] = picked


def _unserved(file: SafetensorsReader, a: int, b: int, owner: int) -> RuntimeError:
    return RuntimeError(f"planned load: bytes [{a}, {b}) of {file.path} were neither read here nor received "
                        f"from rank {owner}: the read plan and the load disagree")


def _gathered(fn: Callable[[], T], world: int, what: str) -> list[T]:
    """Collective: every rank's ``fn()``, gathered on every rank by one all_gather_object that
    also carries failures: the lowest failing rank's error is raised on every rank instead."""
    result, error = None, None
    try:
        result = fn()
    except (OSError, CheckpointError) as e:
        error = str(as_checkpoint_error(e, what))
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (result, error))
    first = next((e for _, e in gathered if e is not None), None)
    if first is not None:
        raise CheckpointError(first)
    return [r for r, _ in gathered]


def _share_headers(reader: CheckpointReader, rank: int, world: int) -> list[dict[str, SharedHeader]]:
    """Each file's header read and verified by one rank (``i % world``) and given to all."""
    names = sorted(reader.manifest["files"])
    return _gathered(lambda: {n: reader.file(n).shared_header() for i, n in enumerate(names) if i % world == rank},
                     world, f"loading {reader.path}")


def _adopt_headers(reader: CheckpointReader, gathered: list[dict[str, SharedHeader]],
                   rank: int) -> dict[str, dict[int, int]]:
    """Open every file with the header its reader sent; returns the blocks each rank read."""
    pinned: dict[str, dict[int, int]] = {}
    for r, headers in enumerate(gathered):
        for name, shared in headers.items():
            f = reader.file(name) if r == rank else reader.adopt_file(name, shared)
            pinned[name] = {b: r for b in range((8 + shared.length - 1) // _block_size(f) + 1)}
    return pinned


def _rounds(per_item: list[list[tuple[str, int, int]]], budget: int) -> tuple[list[list[int]], list[Needs]]:
    """Consecutive items grouped into rounds of at most ``budget`` bytes (an item larger than
    that is a round of its own), with each round's byte intervals by file."""
    rounds: list[list[int]] = []
    raw: list[dict[str, list[tuple[int, int]]]] = []
    used = 0
    for i, reads in enumerate(per_item):
        nbytes = sum(hi - lo for _, lo, hi in reads)
        if not rounds or (used + nbytes > budget and rounds[-1]):
            rounds.append([])
            raw.append({})
            used = 0
        rounds[-1].append(i)
        used += nbytes
        for name, lo, hi in reads:
            raw[-1].setdefault(name, []).append((lo, hi))
    return rounds, [{n: merge_intervals(np.array(v)) for n, v in r.items()} for r in raw]


class _Staging:
    """The send and receive buffers of the rounds, allocated once and reused (fresh memory each
    round costs its page faults and zeroing again)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.send = np.zeros(0, dtype=np.uint8)
        self.recv = torch.zeros(0, dtype=torch.uint8, device=device)

    def send_buffer(self, nbytes: int) -> np.ndarray:
        if len(self.send) < nbytes:
            self.send = np.empty(nbytes, dtype=np.uint8)
        return self.send

    def recv_buffer(self, nbytes: int) -> torch.Tensor:
        if self.recv.numel() < nbytes:
            self.recv = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self.recv


def _transfer(sends: dict[int, np.ndarray], sizes: dict[int, int], staging: _Staging) -> np.ndarray:
    """One batch_isend_irecv: ``sends`` by destination, receives of ``sizes`` bytes by source.
    Returns the bytes received, source after source in rank order (a view of the staging
    buffer on the CPU: valid until the next transfer)."""
    ops, keep = [], []
    for dst, buf in sorted(sends.items()):
        if len(buf):
            t = torch.from_numpy(buf).to(staging.device)
            keep.append(t)
            ops.append(dist.P2POp(dist.isend, t, dst))
    total = sum(sizes.values())
    buffer, at = staging.recv_buffer(total), 0
    for src, size in sorted(sizes.items()):
        if size:
            ops.append(dist.P2POp(dist.irecv, buffer[at:at + size], src))
            at += size
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    return buffer[:total].cpu().numpy()


def planned_fill(reader: CheckpointReader, items: Sequence[T], fill: Callable[[T], None], topo: Topology,
                 budget: int | None = None, on_filled: Callable[[], None] | None = None) -> int:
    """Collective: ``fill(item)`` for every item of this rank, each needed block of the job read
    and verified by one rank only (``on_filled()`` after each). Returns the bytes this rank
    received from other ranks."""
    rank, world, what = topo.rank, topo.world_size, f"loading {reader.path}"
    headers = _share_headers(reader, rank, world)
    router = BlockRouter(rank)
    try:
        return _run(reader, router, items, fill, topo, headers, EXCHANGE_BUDGET if budget is None else budget, what,
                    on_filled or (lambda: None))
    finally:
        reader.route(None)


def _record(router: BlockRouter, items: Sequence[T], fill: Callable[[T], None]) -> list[list[tuple[str, int, int]]]:
    per_item = []
    for item in items:
        router.recording = []
        fill(item)
        per_item.append(router.recording)
    router.recording = None
    return per_item


def _run(reader: CheckpointReader, router: BlockRouter, items: Sequence[T], fill: Callable[[T], None],
         topo: Topology, headers: list[dict[str, SharedHeader]], budget: int, what: str,
         on_filled: Callable[[], None]) -> int:
    rank, world = topo.rank, topo.world_size
    pinned: dict[str, dict[int, int]] = {}
    mine: list[list[int]] = []

    def plan() -> list[Needs]:  # this rank's reads by round; in one collective with any failure
        nonlocal pinned, mine
        pinned = _adopt_headers(reader, headers, rank)
        reader.route(router)
        mine, needs = _rounds(_record(router, items, fill), budget)
        return needs
    everyone = _gathered(plan, world, what)
    needs = everyone[rank]
    names = sorted(reader.manifest["files"])
    files = {n: reader.file(n) for n in names}
    blocks = [FileBlocks(n, reader.manifest["files"][n]["size"], _block_size(files[n])) for n in names]
    totals = [{n: merge_intervals(np.concatenate([r[n] for r in rounds if n in r]))
               for n in names if any(n in r for r in rounds)} for rounds in everyone]
    router.set_owners(assign_owners(blocks, totals, pinned), {b.name: b.block_size for b in blocks})
    received, error = 0, None
    staging = _Staging(topo.device)
    rounds = max(len(each) for each in everyone)

    def round_needs(r: int) -> list[Needs]:
        return [each[r] for each in everyone if r < len(each)]

    router.prefetch(files, round_needs(0))
    for r in range(rounds):
        # The disk reads the next round's blocks while this one is verified, sent and filled.
        router.prefetch(files, round_needs(r + 1))
        sends: dict[int, np.ndarray] = {}
        if error is None:
            try:
                targets = [dst for dst in range(world) if dst != rank and r < len(everyone[dst])]
                sizes = [router.packed_size(everyone[dst][r], rank) for dst in targets]
                buffer, at = staging.send_buffer(sum(sizes)), 0
                for dst, size in zip(targets, sizes):
                    sends[dst] = router.pack(files, everyone[dst][r], buffer[at:at + size])
                    at += size
            except (OSError, CheckpointError) as e:
                error = as_checkpoint_error(e, what)
        raise_if_any_failed(error)  # a corrupted block stops every rank here, before the transfer
        layout = {src: router.segments(needs[r], src) for src in range(world) if src != rank} if r < len(needs) else {}
        sizes = {src: router.packed_size(needs[r], src) for src in layout}
        got = _transfer(sends, sizes, staging)
        pieces: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        at = 0
        for src in sorted(layout):  # the order _transfer laid the sources out in
            for name, starts, ends in layout[src]:
                lengths = ends - starts
                pieces.setdefault(name, []).append((starts, ends, at + np.cumsum(lengths) - lengths))
                at += int(lengths.sum())
        received += sum(sizes.values())
        router.receive(got, pieces)
        try:
            for i in mine[r] if r < len(mine) else []:
                fill(items[i])
                on_filled()
        except (OSError, CheckpointError) as e:
            error = as_checkpoint_error(e, what)
    router.receive(np.zeros(0, dtype=np.uint8), {})
    if error is not None:
        raise error  # load_checkpoint agrees on it with the other ranks
    return received
