"""The manifest's checksum and schema: nothing in it is used before both are checked.

``seal`` adds a sha256 of the manifest's canonical JSON; ``validate`` checks every structural
field the loader and converter rely on (types, sizes, file names confined to the folder,
pieces inside their tensors and not overlapping, fragments inside their tensor). The
``state`` dict belongs to the training loop: only its counters are checked here, its other
values are covered by the checksum. Extend ``SOURCE_FIELDS`` / ``_check_source`` when rank
files gain fields.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

from megatron.checkpointing.safetensors_io import CheckpointError

STATES = ("fp32", "exp_avg", "exp_avg_sq")  # the per-parameter states a checkpoint may hold

CHECKSUM = "checksum"
MAX_ELEMENTS = 1 << 40  # no canonical tensor of a real model comes near 4 TiB of fp32
MAX_BLOCK = 1 << 30
TOP_FIELDS = {
    "native": {"format", "format_version", "kind", "state", "topology", "zero_stage", "param_groups", "canonical",
               "saved_states", "files", "rng", "sources", CHECKSUM},
    "universal": {"format", "format_version", "kind", "state", "source_topology", "source_zero_stage",
                  "param_groups", "canonical", "saved_states", "files", "rng", "sources", "replica_check", CHECKSUM},
}
REQUIRED = {"format", "format_version", "kind", "state", "param_groups", "canonical", "files", "sources", CHECKSUM}
SOURCE_FIELDS = {"file", "rank", "position", "coords", "params", "table", "table_sha256"}
PARAM_FIELDS = {"local_shape", "pieces", "group", "fragments", "position", "stored_by"}
TABLE_FIELDS = {"rank", "coords", "params", "rng"}
PIECE_FIELDS = {"canonical", "local_offsets", "canonical_offsets", "sizes", "owner"}
FILE_FIELDS = {"size", "block_size", "block_sha256"}
STATE_COUNTERS = ("iteration", "consumed_samples", "consumed_tokens", "optimizer_step")
_SHA = re.compile(r"^[0-9a-f]{64}$")


def digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(manifest: dict) -> str:
    """The manifest as text, carrying the checksum of everything else in it."""
    sealed = {k: v for k, v in manifest.items() if k != CHECKSUM}
    sealed[CHECKSUM] = {"sha256": digest(sealed)}
    return json.dumps(sealed, indent=1)


class _Checker:
    """Type checks that name the file and the field path in one line."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, where: str, what: str) -> CheckpointError:
        return CheckpointError(f"{self.file}: {where}: {what}; the manifest is corrupted or was edited; restore it "
                               f"or load an earlier checkpoint")

    def dict(self, value: Any, where: str, fields: set[str] | None = None, required: set[str] | None = None) -> dict:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected an object, found {type(value).__name__}")
        if fields is not None and set(value) - fields:
            raise self.fail(where, f"unknown field(s) {sorted(set(value) - fields)}")
        missing = (required if required is not None else fields or set()) - set(value)
        if missing:
            raise self.fail(where, f"missing field(s) {sorted(missing)}")
        return value

    def int(self, value: Any, where: str, lo: int = 0, hi: int = MAX_ELEMENTS) -> int:
        if type(value) is not int or not lo <= value <= hi:
            raise self.fail(where, f"expected an integer in [{lo}, {hi}], found {value!r}")
        return value

    def ints(self, value: Any, where: str, length: int | None = None) -> tuple[int, ...]:
        if not isinstance(value, list) or (length is not None and len(value) != length) or len(value) > 16:
            raise self.fail(where, f"expected a list of {length if length is not None else 'up to 16'} "
                                   f"integers, found {str(value)[:80]}")
        return tuple(self.int(v, where) for v in value)

    def shape(self, value: Any, where: str, length: int | None = None) -> tuple[int, ...]:
        shape = self.ints(value, where, length)
        if math.prod(shape) > MAX_ELEMENTS:
            raise self.fail(where, f"shape {list(shape)} has an absurd number of elements")
        return shape

    def name(self, value: Any, where: str) -> str:
        """A file name inside the checkpoint folder: no directories, no hidden or parent entries."""
        if (not isinstance(value, str) or not value or "/" in value or "\\" in value or "\0" in value
                or value.startswith(".")):
            raise self.fail(where, f"file name {value!r} is not a plain name inside the checkpoint folder")
        return value


def validate(manifest: Any, file: str) -> dict:
    """Refuse a manifest whose checksum or structure is wrong; returns it unchanged."""
    c = _Checker(file)
    c.dict(manifest, "top level")
    kind = manifest.get("kind")
    if not isinstance(kind, str) or kind not in TOP_FIELDS:
        raise c.fail("kind", f"expected 'native' or 'universal', found {kind!r}")
    c.dict(manifest, "top level", TOP_FIELDS[kind], REQUIRED)
    check = c.dict(manifest[CHECKSUM], CHECKSUM, {"sha256"})
    if check["sha256"] != digest(manifest):
        raise c.fail(CHECKSUM, "the manifest's content does not match its sha256")
    saved = manifest.get("saved_states", list(STATES))
    if not isinstance(saved, list) or not saved or saved[0] != "fp32" or not set(saved) <= set(STATES) \
            or len(set(saved)) != len(saved):
        raise c.fail("saved_states", f"expected fp32 and optionally {list(STATES[1:])}, found {saved!r}")
    if not isinstance(manifest.get("rng", {}), dict):
        raise c.fail("rng", "expected an object")
    state = c.dict(manifest["state"], "state", required={"iteration"})
    for key in STATE_COUNTERS:
        if key in state:
            c.int(state[key], f"state.{key}", hi=1 << 62)
    groups = manifest["param_groups"]
    if not isinstance(groups, list) or not groups:
        raise c.fail("param_groups", "expected a non-empty list")
    for i, g in enumerate(groups):
        for k, v in c.dict(g, f"param_groups[{i}]").items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise c.fail(f"param_groups[{i}].{k}", f"expected a finite number, found {v!r}")
    canonical = {}
    for name, entry in c.dict(manifest["canonical"], "canonical").items():
        c.dict(entry, f"canonical.{name}", {"shape", "group"})
        canonical[name] = c.shape(entry["shape"], f"canonical.{name}.shape")
        c.int(entry["group"], f"canonical.{name}.group", hi=len(groups) - 1)
    files = c.dict(manifest["files"], "files")
    for name, info in files.items():
        c.name(name, "files")
        c.dict(info, f"files.{name}", FILE_FIELDS)
        size = c.int(info["size"], f"files.{name}.size", hi=1 << 50)
        block = c.int(info["block_size"], f"files.{name}.block_size", lo=1, hi=MAX_BLOCK)
        blocks = info["block_sha256"]
        if (not isinstance(blocks, list) or len(blocks) != -(-size // block)
                or not all(isinstance(b, str) and _SHA.match(b) for b in blocks)):
            raise c.fail(f"files.{name}.block_sha256", f"expected {-(-size // block)} sha256 hex digests")
    sources = manifest["sources"]
    if not isinstance(sources, list) or not sources:
        raise c.fail("sources", "expected a non-empty list")
    for i, source in enumerate(sources):
        _check_source(c, source, f"sources[{i}]", files, canonical, len(groups))
    return manifest


def _check_source(c: _Checker, source: Any, where: str, files: dict, canonical: dict, groups: int) -> None:
    """A rank's entry: its parameter table inline (universal, format 1), or the name and sha256
    of its own table file (format 2), whose content ``validate_rank_table`` checks when parsed."""
    c.dict(source, where, SOURCE_FIELDS, {"file"})
    if c.name(source["file"], f"{where}.file") not in files:
        raise c.fail(f"{where}.file", f"{source['file']!r} is not listed in 'files'")
    if "table" in source:
        c.name(source["table"], f"{where}.table")
        if not (isinstance(source.get("table_sha256"), str) and _SHA.match(source["table_sha256"])):
            raise c.fail(f"{where}.table_sha256", "expected a sha256 hex digest")
        return
    if not isinstance(source.get("position"), list):
        raise c.fail(f"{where}.position", "expected a list")
    if "params" not in source:
        raise c.fail(where, "expected 'params' or 'table'")
    _check_params(c, source["params"], f"{where}.params", canonical, groups)


def validate_rank_table(table: Any, file: str, manifest: dict) -> dict:
    """Refuse a rank's own table (format 2) whose structure is wrong; its sha256, recorded in
    the already validated manifest, was checked before it was parsed."""
    c = _Checker(file)
    c.dict(table, "top level", TABLE_FIELDS, {"params"})
    if table.get("rng") is not None:
        c.dict(table["rng"], "rng")
    canonical = {name: tuple(e["shape"]) for name, e in manifest["canonical"].items()}
    _check_params(c, table["params"], "params", canonical, len(manifest["param_groups"]))
    return table


def _check_params(c: _Checker, params: Any, where: str, canonical: dict, groups: int) -> None:
    for local, entry in c.dict(params, where).items():
        w = f"{where}.{local}"
        c.dict(entry, w, PARAM_FIELDS, {"local_shape", "pieces", "group", "fragments"})
        shape = c.shape(entry["local_shape"], f"{w}.local_shape")
        c.int(entry["group"], f"{w}.group", hi=groups - 1)
        boxes = []
        if not isinstance(entry["pieces"], list):
            raise c.fail(f"{w}.pieces", "expected a list")
        for j, piece in enumerate(entry["pieces"]):
            pw = f"{w}.pieces[{j}]"
            c.dict(piece, pw, PIECE_FIELDS)
            name = piece["canonical"]
            if not isinstance(name, str) or name not in canonical:
                raise c.fail(f"{pw}.canonical", f"{name!r} is not in the canonical table")
            ndim = len(canonical[name])
            sizes = c.shape(piece["sizes"], f"{pw}.sizes", ndim)
            local_off = c.ints(piece["local_offsets"], f"{pw}.local_offsets", len(shape))
            canon_off = c.ints(piece["canonical_offsets"], f"{pw}.canonical_offsets", ndim)
            if not isinstance(piece["owner"], bool):
                raise c.fail(f"{pw}.owner", "expected true or false")
            if ndim != len(shape) or any(o + s > n for o, s, n in zip(local_off, sizes, shape)):
                raise c.fail(pw, f"local box offsets {list(local_off)} sizes {list(sizes)} lies outside "
                                 f"local_shape {list(shape)}")
            if any(o + s > n for o, s, n in zip(canon_off, sizes, canonical[name])):
                raise c.fail(pw, f"box offsets {list(canon_off)} sizes {list(sizes)} lies outside {name} of "
                                 f"shape {list(canonical[name])}")
            for other_off, other_sizes, k in boxes:
                if all(a < b + t and b < a + s for a, s, b, t in zip(local_off, sizes, other_off, other_sizes)):
                    raise c.fail(pw, f"overlaps pieces[{k}] in the local tensor")
            boxes.append((local_off, sizes, j))
        frags = entry["fragments"]
        if not isinstance(frags, list):
            raise c.fail(f"{w}.fragments", "expected a list")
        last = 0
        for j, frag in enumerate(frags):
            start, end = c.ints(frag, f"{w}.fragments[{j}]", 2)
            if not last <= start < end <= math.prod(shape):
                raise c.fail(f"{w}.fragments[{j}]", f"[{start}, {end}) is empty, out of order or outside the "
                                                    f"{math.prod(shape)} elements of local_shape {list(shape)}")
            last = end
