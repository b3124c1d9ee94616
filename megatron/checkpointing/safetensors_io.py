"""Streaming safetensors files with block checksums.

The writer knows every tensor's shape up front, writes the header first and then the
data in order, hashing fixed-size blocks of the file as they pass, so nothing is
held in memory twice and no temporary file is needed. The reader memory-maps the
file, reads only the byte ranges asked for and verifies each block it touches.
"""
from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import queue
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from megatron.checkpointing.read_plan import FileBlocks, blocks_touched

if TYPE_CHECKING:  # torch tensors are accepted, but the converter never imports torch
    import torch

BLOCK_SIZE = 1 << 18  # small enough that a partial read verifies little more than it needs
IOV_MAX = 1024  # buffers per writev call (the Linux limit)
HASH_BATCH = 4 << 20  # default bytes written before they are handed to a writer's hashing thread
WRITE_BEHIND = 64 << 20  # write_behind: bytes left to the page cache behind the newest


class CheckpointError(Exception):
    """A checkpoint that cannot be used as it is; the message says which file and how to fix it."""


@dataclass
class FileInfo:
    size: int
    block_sha256: list[str]

    def to_json(self) -> dict:
        return {"size": self.size, "block_size": BLOCK_SIZE, "block_sha256": self.block_sha256}


def _writev_fully(fd: int, views: list[memoryview]) -> None:
    """Write every byte of ``views`` in order, up to IOV_MAX buffers per call, resuming after a
    short write (Linux writes at most about 2 GiB per call)."""
    i = 0
    while i < len(views):
        written = os.writev(fd, views[i:i + IOV_MAX])
        if written == 0:
            raise OSError(f"writev wrote nothing of {sum(len(v) for v in views[i:])} bytes")
        while i < len(views) and written >= len(views[i]):
            written -= len(views[i])
            i += 1
        if written:
            views[i] = views[i][written:]


def _f32_bytes(values: torch.Tensor | np.ndarray) -> memoryview | None:
    """The bytes of a float32 array or torch tensor (copied only if it is not contiguous or not on
    the CPU); None for any other dtype."""
    if not isinstance(values, np.ndarray):
        import torch  # a torch tensor came in: torch is imported already

        if values.dtype != torch.float32:
            return None
        values = values.detach().contiguous().cpu().numpy()
    return memoryview(np.ascontiguousarray(values)).cast("B") if values.dtype == np.float32 else None


def copy_runs(data: np.ndarray, lo: np.ndarray, nbytes: int, out: np.ndarray) -> None:
    """``out[i]`` = bytes [lo[i], lo[i] + nbytes) of ``data`` (uint8) as float32, for every i: in
    one strided copy when the runs are evenly spaced (the rows of a column slice), else run by run."""
    if not len(lo):
        return
    step = int(lo[1] - lo[0]) if len(lo) > 1 else nbytes
    if step > 0 and step % 4 == 0 and nbytes % 4 == 0 and lo[0] % 4 == 0 and (np.diff(lo) == step).all():
        first = int(lo[0])
        flat = data[first:first + step * (len(lo) - 1) + nbytes].view(np.float32)
        out[...] = np.lib.stride_tricks.as_strided(flat, (len(lo), nbytes // 4), (step, 4), writeable=False)
        return
    for row, a in zip(out, lo.tolist()):
        row[:] = data[a:a + nbytes].view(np.float32)


class SafetensorsWriter:
    """Write fp32 tensors ``entries`` = [(key, numel)] as 1-D tensors, in that order.

    ``hash_in_background``: the block checksums are computed by a thread of the writer's own
    while the caller goes on (reading, verifying and writing the next chunk), so that hashing
    what was written overlaps the rest. Only for data that stays unchanged until hashed (mapped
    input files, fresh arrays; ``after_hashed`` says when): a live tensor may change meanwhile.
    Written data is handed over ``hash_batch`` bytes at a time, so that the writer holds up to
    about three batches (filling, queued, hashing): give the caller's chunk size to bound that.

    ``write_behind``: the file's older bytes are handed to the disk while newer ones are written
    (``posix_fadvise(DONTNEED)`` starts their writeback, and drops them from the page cache once
    clean), so that the final fsync finds little left to write; for a file not read back soon."""

    def __init__(self, path: str, entries: list[tuple[str, tuple[int, ...]]], metadata: dict[str, str] | None = None,
                 hash_in_background: bool = False, write_behind: bool = False, hash_batch: int = HASH_BATCH):
        self.path, self.hash_batch = path, hash_batch
        header: dict = {"__metadata__": metadata or {}}
        offset = 0
        self.order = []
        for key, shape in entries:
            nbytes = 4 * math.prod(shape)
            header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.order.append((key, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.f = open(path, "wb", buffering=0)  # data goes out by os.writev, straight from its arrays
        self.blocks: list[str] = []
        self.block = hashlib.sha256()
        self.in_block = 0
        self.size = 0
        self.next = 0
        self.pending = 0  # bytes of the current tensor written so far
        self._behind = 0 if write_behind else None  # bytes handed to writeback so far
        self._queue: queue.Queue | None = None
        self._batch: list = []  # views and callbacks not yet handed to the hashing thread
        self._batch_bytes = 0
        self._hash_error: BaseException | None = None
        if hash_in_background:
            self._queue = queue.Queue(maxsize=1)  # one chunk waits while one is hashed
            self._hasher = threading.Thread(target=self._hash_loop, name=f"sha256 {os.path.basename(path)}",
                                            daemon=True)
            self._hasher.start()
        self._write([memoryview(struct.pack("<Q", len(raw)) + raw)])

    def _write(self, views: list[memoryview]) -> None:
        """Write ``views`` (bytes, in order) several per system call; hash them here or hand them
        to the hashing thread."""
        views = [v for v in views if len(v)]
        if self._hash_error is not None:
            raise self._hash_error
        _writev_fully(self.f.fileno(), views)
        self.size += sum(len(v) for v in views)
        if self._behind is not None and self.size - WRITE_BEHIND - self._behind >= WRITE_BEHIND:
            os.posix_fadvise(self.f.fileno(), self._behind, self.size - WRITE_BEHIND - self._behind,
                             os.POSIX_FADV_DONTNEED)
            self._behind = self.size - WRITE_BEHIND
        if self._queue is None:
            self._hash(views)
            return
        self._batch.append(views)
        self._batch_bytes += sum(len(v) for v in views)
        if self._batch_bytes >= self.hash_batch:
            self._hand_over()

    def after_hashed(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once every byte written so far is hashed (at once without a hashing
        thread): the caller may then unmap or reuse what it wrote from."""
        if self._queue is None:
            callback()
        else:
            self._batch.append(callback)

    def _hand_over(self) -> None:
        """Queue what was written since the last hand-over (small writes go together: one thread
        switch per few MiB, not per bias vector)."""
        if self._batch:
            self._queue.put(self._batch)
            self._batch, self._batch_bytes = [], 0

    def _hash_loop(self) -> None:
        """The hashing thread: written views and callbacks in the order they came, until None."""
        while (batch := self._queue.get()) is not None:
            for item in batch:
                try:
                    if callable(item):
                        item()
                    elif self._hash_error is None:
                        self._hash(item)
                except BaseException as e:  # noqa: BLE001 - raised in the writing thread at its next call
                    self._hash_error = e

    def _hash(self, views: list[memoryview]) -> None:
        for view in views:
            while len(view):
                take = min(len(view), BLOCK_SIZE - self.in_block)
                self.block.update(view[:take])
                self.in_block += take
                view = view[take:]
                if self.in_block == BLOCK_SIZE:
                    self.blocks.append(self.block.hexdigest())
                    self.block, self.in_block = hashlib.sha256(), 0

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """The whole of the next tensor, ``key``."""
        self.begin(key)
        self.write_chunk(tensor)
        self.end()

    def begin(self, key: str) -> None:
        """Start the next tensor, ``key``; its bytes follow in ``write_chunk`` calls, in order."""
        expected, _ = self.order[self.next] if self.next < len(self.order) else ("nothing more", 0)
        if key != expected:
            raise ValueError(f"{self.path}: expected {expected}, got {key}")
        self.pending = 0

    def write_chunk(self, data: torch.Tensor | np.ndarray | list[np.ndarray]) -> None:
        """The next elements of the current tensor: a torch tensor, a float32 array, or a list of
        float32 arrays written one after the other, such as views of mapped input files (written
        from where they lie, without a copy, many per system call)."""
        key, nbytes = self.order[self.next]
        arrays = data if isinstance(data, list) else [data]
        views = [_f32_bytes(a) for a in arrays]
        other = next((a.dtype for a, v in zip(arrays, views) if v is None), None)
        size = sum(v.nbytes for v in views if v is not None)
        if other is not None or self.pending + size > nbytes:
            raise ValueError(f"{self.path}: {key} takes {nbytes} bytes of F32, got {self.pending} bytes and then "
                             + (f"a tensor of {other}" if other is not None else f"{size} bytes"))
        self._write(views)
        self.pending += size

    def end(self) -> None:
        key, nbytes = self.order[self.next]
        if self.pending != nbytes:
            raise ValueError(f"{self.path}: {key} takes {nbytes} bytes, {self.pending} were written")
        self.next += 1

    def close(self) -> FileInfo:
        if self.next != len(self.order):
            raise ValueError(f"{self.path}: {len(self.order) - self.next} tensors were not written")
        self.stop_hashing()
        if self._hash_error is not None:
            raise self._hash_error
        if self.in_block:
            self.blocks.append(self.block.hexdigest())
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return FileInfo(self.size, self.blocks)

    def stop_hashing(self) -> None:
        """Wait for the hashing thread to finish what it was given, and end it (also on failure:
        the thread must not outlive the writer)."""
        if self._queue is not None:
            self._hand_over()
            self._queue.put(None)
            self._hasher.join()
            self._queue = None


MAX_HEADER_BYTES = 1 << 28  # a header of 256 MiB would describe millions of tensors: corruption
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def read_header_length(path: str, mm: np.ndarray) -> int:
    """The header length field, refused unless the header fits in the file."""
    if len(mm) < 8:
        raise CheckpointError(f"{path} is {len(mm)} bytes, too short for a safetensors header: the file is "
                              f"truncated; re-copy it or load an earlier checkpoint")
    (header_len,) = struct.unpack("<Q", bytes(mm[:8]))
    if header_len == 0 or header_len > MAX_HEADER_BYTES or 8 + header_len > len(mm):
        raise CheckpointError(f"{path}: safetensors header length {header_len} does not fit a file of "
                              f"{len(mm)} bytes: the file is corrupted; re-copy it or load an earlier checkpoint")
    return header_len


def parse_header(path: str, raw: bytes, data_size: int) -> tuple[dict, dict]:
    """Validate a safetensors header against its file before anything is read through it: every
    tensor's dtype and shape match its byte span, spans lie inside the data area, in order and
    without overlap. Returns (tensors by key, metadata)."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: invalid safetensors header: {what}; the file is corrupted or not "
                               f"written by this tool; re-copy it or load an earlier checkpoint")
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise bad(f"not JSON ({e})") from e
    if not isinstance(header, dict):
        raise bad(f"a JSON {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ is not an object of strings")
    spans = []
    for key, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {key!r} is not {{dtype, shape, data_offsets}}")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
            raise bad(f"tensor {key!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"tensor {key!r} has shape {shape!r}, expected a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            raise bad(f"tensor {key!r} has data_offsets {offsets!r} outside the data area of {data_size} bytes")
        if offsets[1] - offsets[0] != _ITEMSIZE[dtype] * math.prod(shape):
            raise bad(f"tensor {key!r}: {dtype} {shape} needs {_ITEMSIZE[dtype] * math.prod(shape)} bytes, "
                      f"data_offsets span {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], key))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise bad(f"tensors {a!r} and {b!r} overlap")
    return header, metadata


@dataclass(frozen=True)
class SharedHeader:
    """A file's parsed header, read and verified by one rank and handed to the others, so that a
    planned load reads the header's blocks once in the whole job."""

    length: int
    header: dict
    metadata: dict


PARALLEL_HASH_BLOCKS = 8  # a verification of this many blocks or more is spread over threads
_pool: tuple[int, ThreadPoolExecutor] | None = None


def _hash_pool() -> ThreadPoolExecutor:
    """This process's hashing threads, one per core up to 4 (made again after a fork: a
    parent's threads are not the child's)."""
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        _pool = (os.getpid(), ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1),
                                                 thread_name_prefix="sha256"))
    return _pool[1]


class SafetensorsReader:
    """Byte-range reads from one checkpoint file, verified against the manifest's checksums.

    ``router`` (a planned load's, see ``exchange``): when set, every read goes through it, which
    verifies and maps only the blocks this rank owns and serves the rest from bytes other ranks
    sent."""

    def __init__(self, path: str, info: dict, shared: SharedHeader | None = None) -> None:
        self.path = path
        self.info = info
        if not os.path.exists(path):
            raise CheckpointError(f"missing checkpoint file {path}: the manifest lists it; copy it back from "
                                  f"where the checkpoint was written, or load an earlier checkpoint")
        size = os.path.getsize(path)
        if size != info["size"]:
            raise CheckpointError(f"{path} is {size} bytes, the manifest says {info['size']}: the file is "
                                  f"{'truncated' if size < info['size'] else 'larger than written'}; re-copy it "
                                  f"or load an earlier checkpoint")
        self._map = None
        if size:
            with open(path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.mm = np.frombuffer(self._map, dtype=np.uint8) if size else np.zeros(0, dtype=np.uint8)
        self.header: dict = {}
        self.data_start = 0
        self.verified: set[int] = set()
        self._hashing: dict[int, threading.Event] = {}  # blocks being hashed by some thread now
        self._verify_lock = threading.Lock()
        self.bytes_read = 0
        self.router = None
        if shared is not None:
            self.header, self.metadata, self.data_start = shared.header, shared.metadata, 8 + shared.length
            return
        header_len = read_header_length(path, self.mm)
        self._verify(0, 8 + header_len)
        self.header, self.metadata = parse_header(path, bytes(self.mm[8:8 + header_len]), size - 8 - header_len)
        self.data_start = 8 + header_len

    def shared_header(self) -> SharedHeader:
        return SharedHeader(self.data_start - 8, self.header, self.metadata)

    def _verify(self, lo: int, hi: int) -> None:
        """Hash every block of [lo, hi) not yet verified, each exactly once whatever the number of
        threads reading: a block is claimed under the lock, hashed outside it (hashlib releases the
        GIL), and a thread that needs a block another is hashing waits for that hash."""
        bs = self.info.get("block_size", BLOCK_SIZE)
        self._verify_blocks(range(lo // bs, (hi - 1) // bs + 1))

    def _verify_blocks(self, wanted: Sequence[int]) -> None:
        """``_verify`` for the blocks ``wanted`` (indices)."""
        blocks = self.info["block_sha256"]
        bs = self.info.get("block_size", BLOCK_SIZE)
        if len(blocks) != -(-len(self.mm) // bs):
            raise CheckpointError(f"{self.path}: the manifest lists {len(blocks)} checksum blocks of {bs} bytes "
                                  f"for a file of {len(self.mm)} bytes: the manifest is corrupted")
        with self._verify_lock:
            mine = [b for b in wanted if b not in self.verified and b not in self._hashing]
            for b in mine:
                self._hashing[b] = threading.Event()
            theirs = [self._hashing[b] for b in wanted if b in self._hashing and b not in mine]
        try:
            if len(mine) >= PARALLEL_HASH_BLOCKS:  # hashlib releases the GIL: hash on several cores
                list(_hash_pool().map(lambda b: self._hash_block(b, bs, blocks[b]), mine))
            else:
                for b in mine:
                    self._hash_block(b, bs, blocks[b])
        finally:
            with self._verify_lock:
                for b in mine:
                    self._hashing.pop(b).set()
        for event in theirs:
            event.wait()
        if any(b not in self.verified for b in wanted):  # another thread found a block corrupted
            self._verify_blocks(wanted)  # hash it here too, to raise the same error in this thread

    def _hash_block(self, b: int, bs: int, expected: str) -> None:
        chunk = self.mm[b * bs:min((b + 1) * bs, len(self.mm))]
        if hashlib.sha256(chunk).hexdigest() != expected:
            names = [k for k, v in self.header.items()
                     if self.data_start + v["data_offsets"][0] < (b + 1) * bs
                     and self.data_start + v["data_offsets"][1] > b * bs]
            raise CheckpointError(f"checksum mismatch in {self.path}, bytes [{b * bs}, {(b + 1) * bs}) "
                                  f"(tensors: {', '.join(names) or 'header'}): the file is corrupted; "
                                  f"re-copy it or load an earlier checkpoint")
        with self._verify_lock:
            self.verified.add(b)
            self.bytes_read += len(chunk)

    def numel(self, key: str) -> int:
        return math.prod(self.entry(key)["shape"])

    def entry(self, key: str) -> dict:
        if key not in self.header:
            raise CheckpointError(f"{self.path} has no tensor {key!r}; the manifest and the file disagree")
        return self.header[key]

    def _f32_start(self, key: str) -> int:
        """The file byte where fp32 tensor ``key`` starts (a tensor of another dtype is refused)."""
        e = self.entry(key)
        if e["dtype"] != "F32":
            raise CheckpointError(f"{self.path}: tensor {key} is {e['dtype']}, expected F32")
        return self.data_start + e["data_offsets"][0]

    def _f32_bytes(self, key: str, start: int, end: int) -> tuple[int, int]:
        """The file bytes of elements [start, end) of fp32 tensor ``key`` (a read past it is refused)."""
        base = self._f32_start(key)
        if not 0 <= start <= end <= self.numel(key):
            raise CheckpointError(f"{self.path}: read [{start}, {end}) past tensor {key} of {self.numel(key)} elements")
        return base + 4 * start, base + 4 * end

    def read(self, key: str, start: int, end: int) -> np.ndarray:
        """Elements [start, end) of the flattened fp32 tensor ``key`` (a read-only view)."""
        lo, hi = self._f32_bytes(key, start, end)
        if self.router is not None:
            return self.router.read(self, lo, hi).view(np.float32)
        if hi > lo:
            self._verify(lo, hi)
        span = self.mm[lo:hi].view(np.float32)
        if len(span) != end - start:  # parse_header makes this impossible; never hand out a short span
            raise CheckpointError(f"{self.path}: tensor {key} runs past the end of the file")
        return span

    def read_into(self, key: str, start: int, end: int, out: np.ndarray) -> None:
        """``read`` copied into ``out`` (float32, end - start elements, any shape and strides)."""
        if self.router is None or not (out.flags.c_contiguous or self.router.recording is not None):
            np.copyto(out, self.read(key, start, end).reshape(out.shape))
            return
        # Straight into ``out`` (a recording walk only notes the range)
        self.router.read_into(self, *self._f32_bytes(key, start, end),
                              out.reshape(-1).view(np.uint8) if out.flags.c_contiguous else None)

    def read_runs(self, key: str, starts: np.ndarray, run: int, out: np.ndarray) -> None:
        """Elements [s, s + run) of the flattened fp32 tensor ``key`` for every s of ``starts``
        into the rows of ``out`` (float32, [len(starts), run], any strides): many short runs (a
        column slice's rows) at a small cost each."""
        base = self._f32_start(key)
        if len(starts) and (starts.min() < 0 or starts.max() + run > self.numel(key)):
            raise CheckpointError(f"{self.path}: runs of {run} from {starts.min()} to {starts.max()} go past tensor "
                                  f"{key} of {self.numel(key)} elements")
        lo = base + 4 * starts
        if self.router is not None:
            self.router.read_runs(self, lo, 4 * run, out)
            return
        self.verify_ranges(lo, lo + 4 * run)
        copy_runs(self.mm, lo, 4 * run, out)

    def verify_ranges(self, lo: np.ndarray, hi: np.ndarray) -> None:
        """Verify every block that file bytes [lo[i], hi[i]) touch, for every non-empty range i."""
        keep = hi > lo
        lo, hi = lo[keep], hi[keep]
        if not len(lo):
            return
        blocks = FileBlocks(self.path, len(self.mm), self.info.get("block_size", BLOCK_SIZE))
        self._verify_blocks(np.flatnonzero(blocks_touched(np.stack([lo, hi], axis=1), blocks)).tolist())

    def prefetch(self, key: str, start: int, end: int) -> None:
        """Ask the kernel to start reading elements [start, end) of ``key`` from storage now,
        without waiting (``MADV_WILLNEED``), so that a read of them soon finds them in the page
        cache while the caller hashes and writes what it read before."""
        base = self.data_start + self.entry(key)["data_offsets"][0]
        self.prefetch_bytes(base + 4 * start, base + 4 * end)

    def prefetch_bytes(self, start: int, end: int) -> None:
        """``prefetch`` of file bytes [start, end)."""
        lo = start // mmap.PAGESIZE * mmap.PAGESIZE
        hi = min(len(self.mm), end)
        if self._map is not None and hi > lo:
            self._map.madvise(mmap.MADV_WILLNEED, lo, hi - lo)

    def release(self, key: str, start: int, end: int) -> None:
        """Unmap the whole pages of elements [start, end) of ``key`` once they are copied out, so
        that a reader streaming through a file keeps only what it still needs mapped (the page
        cache keeps the data; a later read maps it again)."""
        base = self.data_start + self.entry(key)["data_offsets"][0]
        self.release_bytes(base + 4 * start, base + 4 * end)

    def release_bytes(self, start: int, end: int) -> None:
        """Unmap the whole pages of file bytes [start, end) (see ``release``)."""
        lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        hi = end // mmap.PAGESIZE * mmap.PAGESIZE
        if self._map is not None and hi > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def verify(self, lo: int, hi: int) -> None:
        """Verify every block that file bytes [lo, hi) touch (each block hashed once)."""
        if hi > lo:
            self._verify(lo, hi)

    def verify_all(self) -> None:
        if len(self.mm):
            self._verify(0, len(self.mm))
