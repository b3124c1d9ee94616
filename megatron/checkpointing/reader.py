"""Read canonical regions from a native or a universal checkpoint, through one interface.

A checkpoint is a manifest plus data files. Each *holder* is one local tensor of the
saved layout (a (pipeline stage, TP rank) position's parameter, or one whole
canonical tensor in a universal checkpoint) with its piece map and the fragments,
possibly in several files, that hold its flat elements. A region of a canonical
tensor is assembled from the owner pieces that overlap it; only the bytes of
those pieces are read.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence, TypeVar

import numpy as np

if TYPE_CHECKING:  # read_region returns torch tensors; the converter reads arrays without importing torch
    import torch

from megatron.checkpointing.manifest import STATES, validate, validate_rank_table
from megatron.checkpointing.safetensors_io import CheckpointError, SafetensorsReader, SharedHeader
from megatron.core.pieces import Box, Piece, box_flat_span, box_run_starts, box_slices, intersect, translate

MANIFEST = "manifest.json"
FORMAT = "megatron-ucp"
FORMAT_VERSION = 2  # 2: per-rank tables (pieces, fragments, RNG) in each rank's own JSON file
READABLE_VERSIONS = (1, 2)
WEIGHTS_ONLY = ("fp32",)  # what --no-save-optim writes
READ_AHEAD = 2  # chunks or fragments whose storage reads a sequential reader starts ahead of use
T = TypeVar("T")


def read_ahead(items: Sequence[T], prefetch: Callable[[T], None], ahead: int = READ_AHEAD) -> Iterator[T]:
    """``items`` in order, ``prefetch(item)`` called ``ahead`` items before each is handed out: the
    storage reads of what is to come run while the caller verifies and copies the current one."""
    for item in items[:ahead]:
        prefetch(item)
    for i, item in enumerate(items):
        if i + ahead < len(items):
            prefetch(items[i + ahead])
        yield item


def saved_states(manifest: dict) -> tuple[str, ...]:
    """The per-parameter states a checkpoint holds (older ones: all of them)."""
    return tuple(manifest.get("saved_states", STATES))


@dataclass
class StoredFragment:
    file: str
    key: str  # tensor key prefix in the file; the state name is appended
    start: int
    end: int


@dataclass
class Holder:
    """One saved local tensor: its shape, pieces and where its flat elements are stored."""

    local_shape: tuple[int, ...]
    pieces: list[Piece]
    fragments: list[StoredFragment] = field(default_factory=list)


def read_manifest(path: str) -> dict:
    file = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    if not os.path.exists(file):
        raise CheckpointError(f"{path} has no {MANIFEST}: it is not a checkpoint, or its save did not "
                              f"finish; load the checkpoint that 'latest' names instead")
    try:
        with open(file) as f:
            manifest = json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}): the manifest is corrupted") from e
    validate(manifest, file)
    if manifest.get("format") != FORMAT or manifest.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{file}: format {manifest.get('format')!r} version "
                              f"{manifest.get('format_version')!r}, expected {FORMAT!r} version {FORMAT_VERSION}")
    return manifest


def _holder_key(source: dict, entry: dict, local_name: str) -> tuple:
    """Which saved local tensor an entry is part of: its mesh coordinates outside the group that
    replicates or partitions it (format 2), or the source's position (format 1, universal)."""
    if "position" in entry:
        return tuple(sorted(entry["position"].items())), local_name
    return tuple(source.get("position", ())), local_name


class CheckpointReader:
    """Random access to canonical regions of one checkpoint.

    Per-rank tables are parsed only when needed: all of them for a resharded read (the
    holder index), one or two for a same-layout load (``rank_table``). ``json_bytes_parsed``
    counts the manifest and table bytes this reader has parsed.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.manifest = read_manifest(path)
        self.json_bytes_parsed = os.path.getsize(os.path.join(path, MANIFEST))
        self.kind = self.manifest["kind"]
        self.canonical = {n: tuple(e["shape"]) for n, e in self.manifest["canonical"].items()}
        self._tables: dict[str, dict] = {}
        self._holders: dict[tuple, Holder] | None = None
        self._by_canonical: dict[str, list[tuple[Holder, Piece]]] = {}
        self._files: dict[str, SafetensorsReader] = {}
        self._router: object | None = None  # see route
        self._lock = threading.Lock()  # the converter reads from several threads
        self._index_lock = threading.Lock()

    def source_params(self, source: dict) -> dict:
        """A source's parameter table: inline (universal, format 1) or in its own JSON file."""
        return source["params"] if "params" in source else self._table(source)["params"]

    def _table(self, source: dict) -> dict:
        name = source["table"]
        with self._lock:
            if name not in self._tables:
                file = os.path.join(self.path, name)
                if not os.path.exists(file):
                    raise CheckpointError(f"missing checkpoint file {file}: the manifest lists it as rank "
                                          f"{source['rank']}'s table; copy it back or load an earlier checkpoint")
                with open(file, "rb") as f:
                    raw = f.read()
                if hashlib.sha256(raw).hexdigest() != source["table_sha256"]:
                    raise CheckpointError(f"checksum mismatch in {file}: the rank table is corrupted; re-copy it "
                                          f"or load an earlier checkpoint")
                try:
                    table = json.loads(raw)
                except ValueError as e:
                    raise CheckpointError(f"{file} is not valid JSON ({e}): the rank table is corrupted") from e
                self._tables[name] = validate_rank_table(table, f"{file} (with {os.path.join(self.path, MANIFEST)})",
                                                          self.manifest)
                self.json_bytes_parsed += len(raw)
            return self._tables[name]

    def source_of_rank(self, rank: int) -> dict:
        for source in self.manifest["sources"]:
            if source.get("rank") == rank:
                return source
        raise CheckpointError(f"{self.path} has no rank file of rank {rank}")

    def rank_table(self, rank: int) -> dict:
        """Rank ``rank``'s own table: ``params`` and ``rng`` (format 2), parsed alone."""
        source = self.source_of_rank(rank)
        if "table" in source:
            return self._table(source)
        return {"params": source["params"], "rng": self.manifest.get("rng", {}).get(str(rank))}

    def rank_rng(self, rank: int) -> dict | None:
        """The RNG states rank ``rank`` saved: from its own table (native), or the copy a
        universal checkpoint keeps of its source's (``rng`` by rank), or None."""
        if self.kind == "native" and "table" in self.source_of_rank(rank):
            return self.rank_table(rank).get("rng")
        return self.manifest.get("rng", {}).get(str(rank))

    def read_stored(self, rank: int, local_name: str, state: str, start: int, end: int) -> np.ndarray:
        """Flat elements [start, end) of ``local_name`` as rank ``rank`` stored them (same layout)."""
        file, first = self._stored(rank, local_name, start, end)
        return file.read(f"{local_name}/{state}", start - first, end - first)

    def prefetch_stored(self, rank: int, local_name: str, state: str, start: int, end: int) -> None:
        """Start reading what ``read_stored`` of the same arguments will read (see ``prefetch``)."""
        file, first = self._stored(rank, local_name, start, end)
        file.prefetch(f"{local_name}/{state}", start - first, end - first)

    def _stored(self, rank: int, local_name: str, start: int, end: int) -> tuple[SafetensorsReader, int]:
        """The file holding rank ``rank``'s stored elements [start, end) of ``local_name``, and the
        first element of its fragment there."""
        source = self.source_of_rank(rank)
        for a, b in self.source_params(source)[local_name]["fragments"]:
            if a <= start and end <= b:
                return self.file(source["file"]), a
        raise CheckpointError(f"{self.path}: rank {rank} did not store elements [{start}, {end}) of {local_name}")

    @property
    def holders(self) -> dict[tuple, Holder]:
        self._index()
        return self._holders

    @property
    def by_canonical(self) -> dict[str, list[tuple[Holder, Piece]]]:
        self._index()
        return self._by_canonical

    def _index(self) -> None:
        """Every saved local tensor and where its fragments are: needs every rank's table."""
        with self._index_lock:
            if self._holders is None:
                self._build_index()

    def _build_index(self) -> None:
        holders: dict[tuple, Holder] = {}
        for source in self.manifest["sources"]:
            for local_name, entry in self.source_params(source).items():
                holder = holders.setdefault(_holder_key(source, entry, local_name),
                                            Holder(tuple(entry["local_shape"]),
                                                   [Piece.from_json(p) for p in entry["pieces"]]))
                for start, end in entry["fragments"]:
                    holder.fragments.append(StoredFragment(source["file"], local_name, start, end))
        for holder in holders.values():
            for piece in holder.pieces:
                self._by_canonical.setdefault(piece.canonical, []).append((holder, piece))
        self._holders = holders

    def file(self, name: str) -> SafetensorsReader:
        with self._lock:
            if name not in self._files:
                if name not in self.manifest["files"]:
                    raise CheckpointError(f"{self.path}: {name} is not listed in the manifest")
                self._files[name] = SafetensorsReader(os.path.join(self.path, name), self.manifest["files"][name])
            return self._files[name]

    def adopt_file(self, name: str, shared: SharedHeader) -> SafetensorsReader:
        """Open ``name`` with the header another rank read and verified (a planned load)."""
        with self._lock:
            if name not in self._files:
                if name not in self.manifest["files"]:
                    raise CheckpointError(f"{self.path}: {name} is not listed in the manifest")
                self._files[name] = SafetensorsReader(os.path.join(self.path, name), self.manifest["files"][name],
                                                      shared)
            return self._files[name]

    def route(self, router: object | None) -> None:
        """Send every open file's reads through ``router`` (None: straight from the files again)."""
        self._router = router
        for f in self._files.values():
            f.router = router

    @property
    def recording(self) -> bool:
        """True while a planned load walks its reads only to record them (nothing is read)."""
        return getattr(self._router, "recording", None) is not None

    @property
    def bytes_read(self) -> int:
        return sum(f.bytes_read for f in self._files.values())

    @property
    def total_bytes(self) -> int:
        return sum(info["size"] for info in self.manifest["files"].values())

    def read_local_box(self, holder: Holder, state: str, box: Box, out: np.ndarray | None = None) -> np.ndarray:
        """A box of a saved local tensor, copied into ``out`` (a float32 array of the box's shape;
        allocated if None) run by contiguous run: a column slice reads its rows' spans, never
        the whole tensor."""
        out = np.empty(box[1], dtype=np.float32) if out is None else out
        run, starts = box_run_starts(holder.local_shape, box)
        if not len(starts):
            return out
        lo, hi = box_flat_span(holder.local_shape, box)
        self.check_fragment_sizes(holder, state, lo, hi)
        if len(starts) == 1:
            self._copy_flat(holder, state, lo, lo + run, out)
            return out
        # Many runs (a column slice's rows), in ascending order: those inside one fragment are a
        # slice of them, read in one call straight into their rows of ``out``; a run across a
        # fragment boundary is copied on its own.
        rows, own_rows = out.view(), False
        try:
            rows.shape = (len(starts), run)  # a view of out's elements: no copy
        except AttributeError:  # the run's dims are not contiguous in out: go through rows of our own
            rows, own_rows = np.empty((len(starts), run), np.float32), True
        done = np.zeros(len(starts), dtype=bool)
        for f in holder.fragments:
            i, j = np.searchsorted(starts, f.start), np.searchsorted(starts, f.end - run, side="right")
            if i < j:
                key, file = f"{f.key}/{state}", self.file(f.file)
                file.read_runs(key, starts[i:j] - f.start, run, rows[i:j])
                file.release(key, max(lo, f.start) - f.start, min(hi, f.end) - f.start)
                done[i:j] = True
        for i in np.flatnonzero(~done).tolist():
            self._copy_flat(holder, state, int(starts[i]), int(starts[i]) + run, rows[i])
        if own_rows:
            np.copyto(out, rows.reshape(out.shape))
        return out

    def prefetch(self, name: str, box: Box, state: str) -> None:
        """Start reading from storage, in the background, the stored bytes that region ``box``
        of canonical tensor ``name`` will be read from (every piece that overlaps it)."""
        for holder, piece in self.by_canonical.get(name, []):
            overlap = intersect(box, (piece.canonical_offsets, piece.sizes))
            if overlap is None:
                continue
            lo, hi = box_flat_span(holder.local_shape, translate(overlap, piece.canonical_offsets, piece.local_offsets))
            for f in holder.fragments:
                a, b = max(lo, f.start), min(hi, f.end)
                if a < b:
                    self.file(f.file).prefetch(f"{f.key}/{state}", a - f.start, b - f.start)

    def check_fragment_sizes(self, holder: Holder, state: str, lo: int, hi: int) -> None:
        """Refuse a file whose tensor holding part of flat elements [lo, hi) of ``holder`` is not
        the size the manifest gives its fragment (before any of it is read through the fragment)."""
        for f in holder.fragments:
            if f.start < hi and f.end > lo and self.file(f.file).numel(f"{f.key}/{state}") != f.end - f.start:
                raise CheckpointError(f"{self.path}: {f.file} holds {self.file(f.file).numel(f'{f.key}/{state}')} "
                                      f"elements of {f.key}/{state}, the {MANIFEST} says [{f.start}, {f.end}): the "
                                      f"manifest and the file disagree")

    def _copy_flat(self, holder: Holder, state: str, lo: int, hi: int, target: np.ndarray) -> None:
        """Copy flat elements [lo, hi) of a saved local tensor into ``target`` (any array of that
        many elements) from the fragments that hold them, and unmap what was copied."""
        parts = [(f, max(lo, f.start), min(hi, f.end)) for f in holder.fragments]
        parts = [(f, a, b) for f, a, b in parts if a < b]
        missing = (hi - lo) - sum(b - a for _, a, b in parts)
        if missing:
            raise CheckpointError(f"{self.path}: elements [{lo}, {hi}) of a saved tensor holding "
                                  f"{holder.pieces[0].canonical if holder.pieces else '?'} are missing "
                                  f"({missing} not found in any rank file): a rank file is missing "
                                  f"or {MANIFEST} is inconsistent")
        flat = target.reshape(-1) if target.flags.c_contiguous else None  # a view: filled in place
        span = flat if flat is not None or len(parts) == 1 else np.empty(hi - lo, dtype=np.float32)
        for f, a, b in parts:
            key, file = f"{f.key}/{state}", self.file(f.file)
            file.read_into(key, a - f.start, b - f.start, target if span is None else span[a - lo:b - lo])
            file.release(key, a - f.start, b - f.start)
        if span is not None and flat is None:
            np.copyto(target, span.reshape(target.shape))

    def read_region(self, name: str, box: Box, state: str) -> torch.Tensor:
        """Region ``box`` of canonical tensor ``name`` (fp32), from its owner pieces."""
        import torch  # here, not at the top: see read_region_array

        return torch.from_numpy(self.read_region_array(name, box, state))

    def read_region_array(self, name: str, box: Box, state: str, out: np.ndarray | None = None) -> np.ndarray:
        """``read_region`` as a float32 array, for readers that do without torch (the converter);
        into ``out`` (a float32 array of the box's shape, any strides: say a view of the tensor
        being loaded) when given, so that the values are copied once, from the file to there."""
        if name not in self.canonical:
            raise CheckpointError(f"{self.path} has no tensor {name!r}: the checkpoint is of another model "
                                  f"(check --num-layers, --swiglu, --untie-embeddings-and-output-weights, ...)")
        out = np.empty(box[1], dtype=np.float32) if out is None else out
        covered = 0
        for holder, piece in self.by_canonical.get(name, []):
            if not piece.owner:
                continue
            overlap = intersect(box, (piece.canonical_offsets, piece.sizes))
            if overlap is None:
                continue
            local = translate(overlap, piece.canonical_offsets, piece.local_offsets)
            dst = translate(overlap, box[0], (0,) * len(box[0]))
            self.read_local_box(holder, state, local, out[box_slices(dst)])
            covered += math.prod(overlap[1])
        if covered != math.prod(box[1]):
            raise CheckpointError(f"{self.path}: tensor {name} region offsets {box[0]} sizes {box[1]} is covered "
                                  f"{covered} times element-wise, expected {math.prod(box[1])}: pieces in "
                                  f"{MANIFEST} are missing or overlap")
        return out

    def replica_pieces(self, name: str) -> list[tuple[Holder, Piece]]:
        return [(h, p) for h, p in self.by_canonical.get(name, []) if not p.owner]
