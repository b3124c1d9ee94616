"""Native -> universal: canonical tensors streamed in fixed-size chunks.

Tensors are dealt to a few output files; one worker fills each file in order, chunk by
chunk (a chunk is a row-major run of a canonical tensor, assembled from the input pieces
it overlaps), so each input byte is read once, each output byte written once with its
checksum computed on the way, nothing goes through a temporary file, and memory stays
near the chunk size whatever the largest tensor. Workers are threads: reading, copying
and sha256 release the GIL. Coverage and replica agreement are checked for every chunk.
"""
from __future__ import annotations

import bisect
import itertools
import json
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator

import numpy as np

from megatron.checkpointing.agree import as_checkpoint_error, process_group, raise_if_any_failed
from megatron.checkpointing.manifest import seal
from megatron.checkpointing.reader import (FORMAT, FORMAT_VERSION, MANIFEST, CheckpointReader, read_ahead,
                                           saved_states)
from megatron.checkpointing.safetensors_io import HASH_BATCH, CheckpointError, SafetensorsReader, SafetensorsWriter
from megatron.checkpointing.commit import commit_folder, is_checkpoint, write_atomic
from megatron.checkpointing.finite import all_finite
from megatron.checkpointing.locate import POINTERS, checkpoint_folders
from megatron.core.pieces import (Box, box_flat_span, box_runs, box_slices, flat_range_boxes, intersect, run_pairs,
                                  translate)
from megatron.progress import progress_bar

REPLICA_POLICIES = ("first", "mean", "strict")
CHUNK_BYTES = 256 << 20  # tensor data held at once by all workers together


@dataclass
class ConversionReport:
    output: str
    tensors: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    max_replica_diff: float = 0.0
    max_replica_tensor: str = ""
    files: list[str] = field(default_factory=list)


def _refuse_non_finite(reader: CheckpointReader, name: str, state: str) -> CheckpointError:
    return CheckpointError(f"{reader.path}: {name} ({state}) holds NaN or Inf values: training had diverged "
                           f"when it was saved; convert an earlier checkpoint")


def assemble(reader: CheckpointReader, name: str, box: Box, state: str, policy: str) -> tuple[np.ndarray, float]:
    """Region ``box`` of a canonical tensor from its owner pieces, checked against every replica
    piece that overlaps it. Returns the region and the largest |owner - replica| difference."""
    full = reader.read_region_array(name, box, state)
    if not all_finite(full):
        raise _refuse_non_finite(reader, name, state)
    max_diff = 0.0
    replicas = reader.replica_pieces(name)
    total, count = ((full.copy(), np.ones(box[1], dtype=np.float32)) if policy == "mean" and replicas
                    else (None, None))
    for holder, piece in replicas:
        overlap = intersect(box, (piece.canonical_offsets, piece.sizes))
        if overlap is None:
            continue
        region = box_slices(translate(overlap, box[0], (0,) * len(box[0])))
        values = reader.read_local_box(holder, state, translate(overlap, piece.canonical_offsets, piece.local_offsets))
        diff = float(np.nan_to_num(np.abs(values - full[region]), nan=math.inf).max()) if values.size else 0.0
        if policy == "strict" and diff > 0:  # a NaN replica counts as an infinite disagreement
            raise CheckpointError(f"{reader.path}: replicas of {name} ({state}) disagree by up to {diff:.3e} "
                                  f"(--replica-policy strict); use --replica-policy first or mean to convert anyway")
        max_diff = max(max_diff, diff)
        if total is not None:
            total[region] += values
            count[region] += 1
    if total is not None and max_diff > 0:
        full = total / count
    return full, max_diff


Reads = list[tuple[SafetensorsReader, str, int, int]]  # (file, key, start, end) element ranges read


def stored_spans(reader: CheckpointReader, name: str, box: Box, state: str) -> tuple[list[np.ndarray], Reads] | None:
    """The box's values as views of the mapped input files in row-major order, to write straight
    from there, and the ranges read (to release once written): each owner piece's part of each
    stored fragment is read (and verified) once, and cut into the runs that are contiguous both
    there and in the canonical tensor (one per row of a TP column slice). None when a replica
    overlaps the box (``assemble`` compares them), or when the pieces or fragments do not cover the
    box exactly (``assemble`` then names what is wrong). Refuses NaN and Inf."""
    shape = reader.canonical[name]
    if len(box_runs(shape, box)[1]) != 1 or any(intersect(box, (p.canonical_offsets, p.sizes))
                                                for _, p in reader.replica_pieces(name)):
        return None
    runs: list[tuple[int, np.ndarray]] = []  # (canonical flat start, values)
    reads: Reads = []
    for holder, piece in reader.by_canonical.get(name, []):
        overlap = intersect(box, (piece.canonical_offsets, piece.sizes)) if piece.owner else None
        if overlap is None:
            continue
        length, pairs = run_pairs(holder.local_shape, translate(overlap, piece.canonical_offsets, piece.local_offsets),
                                  shape, overlap)
        lo, hi = pairs[0][0], pairs[-1][0] + length
        reader.check_fragment_sizes(holder, state, lo, hi)
        starts = [local for local, _ in pairs]
        for f in holder.fragments:
            a, b = max(lo, f.start), min(hi, f.end)
            if a >= b:
                continue
            file, key = reader.file(f.file), f"{f.key}/{state}"
            values = file.read(key, a - f.start, b - f.start)
            reads.append((file, key, a - f.start, b - f.start))
            first = max(0, bisect.bisect_right(starts, a) - 1)
            pieces = [(dst + max(a, src) - src, values[max(a, src) - a:min(b, src + length) - a])
                      for src, dst in pairs[first:bisect.bisect_left(starts, b)] if src + length > a]
            if sum(len(v) for _, v in pieces) == b - a:
                finite = all_finite(values)  # the runs tile the read: one pass over it
            else:
                finite = all(all_finite(v) for _, v in pieces)
            if not finite:
                raise _refuse_non_finite(reader, name, state)
            runs += pieces
    runs.sort(key=lambda r: r[0])
    at, end = box_flat_span(shape, box)
    for start, values in runs:
        if start != at:
            return None
        at += len(values)
    return ([values for _, values in runs], reads) if at == end else None


def _release(reads: Reads) -> None:
    for file, key, start, end in reads:
        file.release(key, start, end)


def chunk_boxes(shape: tuple[int, ...], chunk_elements: int) -> Iterator[Box]:
    """A canonical tensor as boxes of at most ``chunk_elements`` elements, in row-major order
    (so that writing them one after the other writes the tensor)."""
    numel = math.prod(shape)
    for start in range(0, numel, max(1, chunk_elements)):
        yield from flat_range_boxes(shape, start, min(numel, start + max(1, chunk_elements)))


def _plan_files(reader: CheckpointReader, num_files: int) -> list[list[str]]:
    """Deal tensors to files, largest first, each to the currently smallest file."""
    files: list[list[str]] = [[] for _ in range(num_files)]
    sizes = [0] * num_files
    for name in sorted(reader.canonical, key=lambda n: -math.prod(reader.canonical[n])):
        i = sizes.index(min(sizes))
        files[i].append(name)
        sizes[i] += math.prod(reader.canonical[name])
    return [sorted(f) for f in files if f]


def check_output_folder(input_folder: str, output_folder: str, overwrite: bool) -> None:
    """Refuse an output folder whose replacement could lose anything: the input itself, a folder
    around or inside it, one holding native checkpoints, pointers or other files, or (without
    ``overwrite``) an existing universal checkpoint."""
    source, target = os.path.realpath(input_folder), os.path.realpath(output_folder)
    hint = "choose a new folder such as " + input_folder.rstrip("/") + "_universal"
    if target == source or source.startswith(target + os.sep) or target.startswith(source + os.sep):
        raise CheckpointError(f"--output_folder {output_folder} is, contains or lies inside the input "
                              f"{input_folder}: converting would replace the checkpoint; {hint}")
    if not os.path.lexists(output_folder):
        return
    if not os.path.isdir(output_folder):
        raise CheckpointError(f"--output_folder {output_folder} is a file; {hint}")
    entries = sorted(os.listdir(output_folder))
    if not entries:
        return
    if is_checkpoint(output_folder):
        kind = _kind(output_folder)
        if kind == "universal" and overwrite:
            return
        why = "pass --overwrite to replace it" if kind == "universal" else hint
        raise CheckpointError(f"--output_folder {output_folder} already holds a {kind} checkpoint; {why}")
    held = [n for n in entries if n in POINTERS] + checkpoint_folders(output_folder)
    what = f"checkpoints ({', '.join(held)})" if held else f"other files ({', '.join(entries[:5])})"
    raise CheckpointError(f"--output_folder {output_folder} is not empty: it holds {what} that the conversion "
                          f"would delete; {hint}")


def _kind(folder: str) -> str:
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            kind = json.load(f).get("kind")
    except (ValueError, AttributeError, OSError):
        return "unreadable"
    return kind if kind in ("native", "universal") else "unknown"


@dataclass
class _FileResult:
    """One output file as its writer left it: checksums, the tensors' tables, the largest replica gap."""

    file: str
    info: dict
    params: dict
    max_diff: float = 0.0
    max_tensor: str = ""


def _ranks_files(plan: list[list[str]], sizes: list[int], world: int) -> list[list[int]]:
    """Deal output files to ranks, largest first, each to the rank with the fewest bytes so far."""
    ranks: list[list[int]] = [[] for _ in range(world)]
    load = [0] * world
    for i in sorted(range(len(plan)), key=lambda i: -sizes[i]):
        r = load.index(min(load))
        ranks[r].append(i)
        load[r] += sizes[i]
    return ranks


def _write_file(reader: CheckpointReader, tmp: str, index: int, names: list[str], states: tuple[str, ...],
                chunk_elements: int, policy: str, bar) -> _FileResult:
    """Stream the canonical tensors ``names`` into ``universal_{index:03d}.safetensors``."""
    file = f"universal_{index:03d}.safetensors"
    entries = [(f"{n}/{s}", reader.canonical[n]) for n in names for s in states]
    writer = SafetensorsWriter(os.path.join(tmp, file), entries, {"kind": "universal"}, hash_in_background=True,
                               write_behind=True, hash_batch=min(HASH_BATCH, 4 * chunk_elements))
    try:
        result = _write_tensors(reader, writer, _FileResult(file, {}, {}), names, states, chunk_elements, policy, bar)
        result.info = writer.close().to_json()
    finally:
        writer.stop_hashing()
    return result


def _write_tensors(reader: CheckpointReader, writer: SafetensorsWriter, result: _FileResult, names: list[str],
                   states: tuple[str, ...], chunk_elements: int, policy: str, bar) -> _FileResult:
    # The chunks in writing order; the storage reads of those ahead start while this one is
    # verified, written and hashed, so that the disk does not wait for the CPU.
    boxes = {n: list(chunk_boxes(reader.canonical[n], chunk_elements)) for n in names}
    work = read_ahead([(n, s, box) for n in names for s in states for box in boxes[n]],
                      lambda chunk: reader.prefetch(chunk[0], chunk[2], chunk[1]))
    for n in names:
        for s in states:
            writer.begin(f"{n}/{s}")
            for _, _, box in itertools.islice(work, len(boxes[n])):
                stored = stored_spans(reader, n, box, s)
                if stored is not None:  # straight from the mapped input into the output file
                    writer.write_chunk(stored[0])
                    writer.after_hashed(partial(_release, stored[1]))  # unmapped once hashed
                    continue
                chunk, diff = assemble(reader, n, box, s, policy)
                writer.write_chunk(chunk)
                if diff > result.max_diff:
                    result.max_diff, result.max_tensor = diff, f"{n} ({s})"
            writer.end()
        shape = list(reader.canonical[n])
        result.params[n] = {"local_shape": shape, "group": reader.manifest["canonical"][n]["group"],
                            "pieces": [{"canonical": n, "local_offsets": [0] * len(shape),
                                        "canonical_offsets": [0] * len(shape), "sizes": shape, "owner": True}],
                            "fragments": [[0, math.prod(shape)]]}
        bar.update(1)
    return result


def _manifest(reader: CheckpointReader, states: tuple[str, ...], results: list[_FileResult], policy: str,
              report: ConversionReport) -> dict:
    m = reader.manifest
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": "universal", "state": m["state"],
        "source_topology": m["topology"], "source_zero_stage": m["zero_stage"], "param_groups": m["param_groups"],
        "canonical": m["canonical"], "saved_states": list(states), "files": {r.file: r.info for r in results},
        # Kept so that a resume on the saving layout restores every rank's RNG exactly.
        "rng": {str(src["rank"]): rng for src in m["sources"] if (rng := reader.rank_rng(src["rank"])) is not None},
        "sources": [{"file": r.file, "position": [r.file], "params": r.params} for r in results],
        "replica_check": {"policy": policy, "max_abs_diff": report.max_replica_diff,
                          "tensor": report.max_replica_tensor},
    }


def _world() -> tuple[int, int]:
    dist = process_group()
    return (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)


def _agree(error: BaseException | None, rank: int) -> None:
    """Collective: every rank raises the lowest failing rank's error (named by rank), or none does."""
    named = None if error is None else as_checkpoint_error(error, f"rank {rank} of the conversion")
    if named is not None and not str(named).startswith("rank "):
        named = CheckpointError(f"rank {rank} of the conversion: {named}")
    raise_if_any_failed(named)


def _gather(obj):
    rank, world = _world()
    if world == 1:
        return [obj]
    out: list = [None] * world
    process_group().all_gather_object(out, obj)
    return out


def convert_to_universal(input_folder: str, output_folder: str, num_workers: int = 4,
                         replica_policy: str = "first", progress: bool | None = None,
                         overwrite: bool = False, chunk_bytes: int = CHUNK_BYTES) -> ConversionReport:
    """Write ``output_folder`` (a universal checkpoint) and ``latest_universal`` beside it.
    ``chunk_bytes`` bounds the tensor data each process holds at once, whatever the tensors' sizes.

    Under ``torch.distributed`` (torchrun) every rank calls this: the ``max(num_workers, world)``
    output files are dealt to the ranks by bytes, each rank writes its own into the shared
    temporary folder, and rank 0 commits once after all have finished; the output is the one a
    single process writes with that many workers, byte for byte. A failure on any rank raises
    on every rank and commits nothing."""
    rank, world = _world()
    error, reader, tmp = None, None, ""
    try:
        if replica_policy not in REPLICA_POLICIES:
            raise ValueError(f"--replica-policy must be one of {REPLICA_POLICIES}, got {replica_policy!r}")
        if chunk_bytes < 4:
            raise ValueError(f"--chunk-size-mb must hold at least one fp32 element, got {chunk_bytes} bytes")
        reader = CheckpointReader(input_folder)
        if reader.kind != "native":
            raise CheckpointError(f"{input_folder} is already a {reader.kind} checkpoint")
        output_folder = output_folder.rstrip("/")
        check_output_folder(input_folder, output_folder, overwrite)
        parent = os.path.dirname(os.path.abspath(output_folder))
        tmp = os.path.join(parent, f".{os.path.basename(output_folder)}.tmp")
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
    except Exception as e:  # noqa: BLE001 - every rank must learn of it before the next collective
        error = e
    if world == 1 and error is not None:
        raise error
    _agree(error, rank)
    try:
        return _convert(reader, tmp, output_folder, max(1, num_workers), replica_policy, progress, chunk_bytes)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _convert(reader: CheckpointReader, tmp: str, output_folder: str, num_workers: int, policy: str,
             progress: bool | None, chunk_bytes: int) -> ConversionReport:
    rank, world = _world()
    states = saved_states(reader.manifest)
    plan = _plan_files(reader, max(num_workers, world))
    sizes = [sum(math.prod(reader.canonical[n]) for n in f) for f in plan]
    mine = _ranks_files(plan, sizes, world)[rank]
    # Each file's thread holds up to three chunks: one being read and verified, one written and
    # waiting for its hashing thread, one being hashed (twice that for 'mean').
    chunk_elements = max(1, chunk_bytes // 4 // max(1, 3 * len(mine)))
    bar = progress_bar(sum(len(plan[i]) for i in mine), "converting", "tensor", progress if rank == 0 else False)
    results, error = [], None
    try:
        with ThreadPoolExecutor(max_workers=max(1, len(mine))) as pool:
            results = list(pool.map(lambda i: _write_file(reader, tmp, i, plan[i], states, chunk_elements, policy,
                                                          bar), mine))
    except Exception as e:  # noqa: BLE001 - reported to every rank by _agree
        if world == 1:
            raise
        error = e
    bar.close()
    _agree(error, rank)
    gathered = _gather((results, reader.bytes_read))
    results = sorted((r for rs, _ in gathered for r in rs), key=lambda r: r.file)
    report = ConversionReport(output_folder, tensors=len(reader.canonical), files=[r.file for r in results],
                              bytes_written=sum(r.info["size"] for r in results),
                              bytes_read=sum(b for _, b in gathered))
    for r in results:  # in file order, so that the tensor named does not depend on thread timing
        if r.max_diff > report.max_replica_diff:
            report.max_replica_diff, report.max_replica_tensor = r.max_diff, r.max_tensor
    error = None
    if rank == 0:
        try:
            write_atomic(os.path.join(tmp, MANIFEST), seal(_manifest(reader, states, results, policy, report)))
            commit_folder(tmp, output_folder)
            write_atomic(os.path.join(os.path.dirname(os.path.abspath(output_folder)), "latest_universal"),
                         os.path.basename(output_folder))
        except Exception as e:  # noqa: BLE001
            if world == 1:
                raise
            error = e
    _agree(error, rank)
    return report
