"""Read canonical regions from a native or a universal checkpoint, through one interface.

A checkpoint is a manifest plus data files. Each *holder* is one local tensor of the
saved layout (a (pipeline stage, TP rank) position's parameter, or one whole
canonical tensor in a universal checkpoint) with its piece map and the fragments,
possibly in several files, that hold its flat elements. A region of a canonical
tensor is assembled from the owner pieces that overlap it; only the bytes of
those pieces are read.
"""
from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from megatron.checkpointing.safetensors_io import CheckpointError, SafetensorsReader
from megatron.core.pieces import Box, Piece, box_flat_span, box_slices, intersect, translate

MANIFEST = "manifest.json"
FORMAT = "megatron-ucp"
FORMAT_VERSION = 1
STATES = ("fp32", "exp_avg", "exp_avg_sq")
WEIGHTS_ONLY = ("fp32",)  # what --no-save-optim writes


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
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file}: format {manifest.get('format')!r} version "
                              f"{manifest.get('format_version')!r}, expected {FORMAT!r} version {FORMAT_VERSION}")
    return manifest


class CheckpointReader:
    """Random access to canonical regions of one checkpoint."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.manifest = read_manifest(path)
        self.kind = self.manifest["kind"]
        self.canonical = {n: tuple(e["shape"]) for n, e in self.manifest["canonical"].items()}
        self.holders: dict[tuple, Holder] = {}
        for source in self.manifest["sources"]:
            for local_name, entry in source["params"].items():
                key = (tuple(source.get("position", ())), local_name)
                holder = self.holders.setdefault(key, Holder(tuple(entry["local_shape"]),
                                                             [Piece.from_json(p) for p in entry["pieces"]]))
                for start, end in entry["fragments"]:
                    holder.fragments.append(StoredFragment(source["file"], local_name, start, end))
        self.by_canonical: dict[str, list[tuple[Holder, Piece]]] = {}
        for holder in self.holders.values():
            for piece in holder.pieces:
                self.by_canonical.setdefault(piece.canonical, []).append((holder, piece))
        self._files: dict[str, SafetensorsReader] = {}
        self._lock = threading.Lock()  # the converter reads from several threads

    def file(self, name: str) -> SafetensorsReader:
        with self._lock:
            if name not in self._files:
                if name not in self.manifest["files"]:
                    raise CheckpointError(f"{self.path}: {name} is not listed in the manifest")
                self._files[name] = SafetensorsReader(os.path.join(self.path, name), self.manifest["files"][name])
            return self._files[name]

    @property
    def bytes_read(self) -> int:
        return sum(f.bytes_read for f in self._files.values())

    @property
    def total_bytes(self) -> int:
        return sum(info["size"] for info in self.manifest["files"].values())

    def read_local_box(self, holder: Holder, state: str, box: Box, out: np.ndarray | None = None) -> np.ndarray:
        """A box of a saved local tensor, copied from the fragments that hold its elements into
        ``out`` (a float32 array of the box's shape; allocated if None)."""
        itemsize = np.dtype(np.float32).itemsize
        strides = tuple(itemsize * math.prod(holder.local_shape[d + 1:]) for d in range(len(holder.local_shape)))
        out = np.empty(box[1], dtype=np.float32) if out is None else out
        lo, hi = box_flat_span(holder.local_shape, box)
        parts = [(f, max(lo, f.start), min(hi, f.end)) for f in holder.fragments]
        parts = [(f, a, b) for f, a, b in parts if a < b]
        missing = (hi - lo) - sum(b - a for _, a, b in parts)
        if missing:
            raise CheckpointError(f"{self.path}: elements [{lo}, {hi}) of a saved tensor holding "
                                  f"{holder.pieces[0].canonical if holder.pieces else '?'} are missing "
                                  f"({missing} not found in any rank file): a rank file is missing "
                                  f"or the manifest is inconsistent")
        if len(parts) == 1:  # one fragment holds the box: copy straight from the mapped file
            f = parts[0][0]
            span = self.file(f.file).read(f"{f.key}/{state}", lo - f.start, hi - f.start)
        else:
            span = np.empty(hi - lo, dtype=np.float32)
            for f, a, b in parts:
                span[a - lo:b - lo] = self.file(f.file).read(f"{f.key}/{state}", a - f.start, b - f.start)
        np.copyto(out, np.lib.stride_tricks.as_strided(span, shape=box[1], strides=strides, writeable=False))
        return out

    def read_region(self, name: str, box: Box, state: str) -> torch.Tensor:
        """Region ``box`` of canonical tensor ``name`` (fp32), from its owner pieces."""
        if name not in self.canonical:
            raise CheckpointError(f"{self.path} has no tensor {name!r}: the checkpoint is of another model "
                                  f"(check --num-layers, --swiglu, --untie-embeddings-and-output-weights, ...)")
        out = np.empty(box[1], dtype=np.float32)
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
                                  f"{covered} times element-wise, expected {math.prod(box[1])}: pieces are "
                                  f"missing or overlap")
        return torch.from_numpy(out)

    def replica_pieces(self, name: str) -> list[tuple[Holder, Piece]]:
        return [(h, p) for h, p in self.by_canonical.get(name, []) if not p.owner]
