"""Load a native or universal checkpoint into any layout.

Each rank walks its own fragment table: for every flat range it holds of a local
parameter, it maps the range to boxes, the boxes through its piece map to canonical
regions, and asks the checkpoint for exactly those regions. Elements covered by no
piece (vocabulary padding) are zero. On a resharded load of several ranks the reads are
planned (``exchange``): each needed block is read and verified by one rank, which sends the
others their slices; a single process, or a same-layout load, reads its own bytes itself.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from megatron.checkpointing.agree import as_checkpoint_error, raise_if_any_failed
from megatron.checkpointing.async_save import wait_for_async_saves
from megatron.checkpointing.exchange import planned_fill
from megatron.checkpointing.finite import all_finite
from megatron.checkpointing.iolog import MIB, IoStats, describe_io, gather_to_rank0
from megatron.checkpointing.locate import NEVER, resolve_checkpoint
from megatron.checkpointing.reader import STATES, WEIGHTS_ONLY, CheckpointReader, read_ahead, saved_states
from megatron.checkpointing.safetensors_io import CheckpointError
from megatron.core.optimizer.distributed_optimizer import DistributedOptimizer
from megatron.core.parallel_state import Topology
from megatron.core.pieces import Box, flat_range_boxes, intersect, translate
from megatron.core.rng import set_rng_state
from megatron.core.sharding import sharding_of
from megatron.progress import progress_bar


@dataclass
class Loaded:
    path: str
    kind: str  # native | universal
    state: dict
    rng_restored: bool
    bytes_read: int
    total_bytes: int
    json_bytes_parsed: int = 0  # manifest and rank tables this rank parsed
    seconds: float = 0.0  # this rank's time in the load, collectives included
    from_peers: int = 0  # bytes other ranks read and sent to this one (planned load)


@dataclass(frozen=True)
class _Sources:
    """Where flat elements [start, end) of a local parameter come from (the same for every state):
    the parameter's strides and, for every piece they overlap, (canonical tensor, its region, the
    region's sizes, its first element's offset from ``start``)."""

    strides: list[int]
    regions: list[tuple[str, Box, tuple[int, ...], int]]
    covered: int  # elements the pieces cover (fewer: vocabulary padding)


def fragment_sources(param: nn.Parameter, start: int, end: int) -> _Sources:
    """The ``_Sources`` of flat elements [start, end) of ``param``."""
    record = sharding_of(param)
    shape = tuple(record.local_shape)  # under ZeRO-3 the parameter itself is empty here
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    regions = []
    for box in flat_range_boxes(shape, start, end):
        for piece in record.piece_map.pieces:
            overlap = intersect(box, (piece.local_offsets, piece.sizes))
            if overlap is not None:
                origin = sum(o * s for o, s in zip(overlap[0], strides)) - start
                regions.append((piece.canonical, translate(overlap, piece.local_offsets, piece.canonical_offsets),
                                overlap[1], origin))
    return _Sources(strides, regions, sum(math.prod(sizes) for _, _, sizes, _ in regions))


def fill_fragment(reader: CheckpointReader, sources: _Sources, state: str, dest: torch.Tensor) -> None:
    """Fill ``dest`` (a fragment of a parameter, read from ``sources``) with ``state`` from the
    checkpoint: each piece's region straight into its place in ``dest`` on the CPU; elements no
    piece covers (vocabulary padding) are zero."""
    if sources.covered < dest.numel():
        dest.zero_()
    on_host = dest.device.type == "cpu" and dest.dtype == torch.float32
    for name, region, sizes, origin in sources.regions:
        view = dest.as_strided(sizes, sources.strides, dest.storage_offset() + origin)
        if on_host:
            reader.read_region_array(name, region, state, out=view.numpy())
        else:
            view.copy_(reader.read_region(name, region, state))


def load_checkpoint(load_dir: str, model: nn.Module, optimizer: DistributedOptimizer, topo: Topology,
                    universal: bool = False, tag: str | None = None, load_optimizer: bool = True,
                    load_rng: bool = True, validate: Callable[[dict], None] | None = None,
                    start_fresh: str = NEVER, log: Callable[[str], None] | None = None,
                    progress: bool | None = None, exchange: bool = True) -> Loaded | None:
    """Collective (ZeRO gathers the loaded weights): each rank reads only what its fragments need.
    Returns None if there is nothing to resume from and ``start_fresh`` allows that (see
    ``locate``). ``validate(state)`` may refuse the checkpoint before any tensor is read. A
    failure on any rank raises the same CheckpointError on every rank. ``log`` (rank 0's) gets
    the bytes each rank read, seconds and throughput. ``progress``: a bar over this rank's
    fragments (None: when stderr is a terminal; the caller passes False off rank 0). ``exchange``:
    plan a resharded load's reads over the ranks (False: every rank reads what it needs itself)."""
    wait_for_async_saves()  # a checkpoint still being written in the background is committed first
    path = resolve_checkpoint(load_dir, universal, tag, start_fresh)  # the same answer on every rank
    if path is None:
        return None
    start = time.perf_counter()
    reader, error, from_peers = None, None, 0
    try:
        reader, from_peers = _read_into_fragments(path, model, optimizer, topo, universal, load_optimizer, validate,
                                                  progress, exchange)
    except (OSError, CheckpointError) as e:
        error = as_checkpoint_error(e, f"loading {path}")
        if tag is None and os.path.realpath(path) != os.path.realpath(load_dir):  # found through a pointer
            pointer = os.path.join(load_dir, "latest_universal" if universal else "latest")
            error = CheckpointError(f"{error} (named by {pointer})")
    raise_if_any_failed(error)  # before the collectives below, which a failed rank would never join
    if load_optimizer:
        optimizer.load_hyperparameters(reader.manifest["param_groups"])
    optimizer.copy_master_to_model()
    # A universal checkpoint keeps its source's RNG states: the saving layout resumes exactly.
    saved_layout = reader.manifest["topology" if reader.kind == "native" else "source_topology"]
    same_layout = saved_layout == topo.describe()
    rng_restored = False
    if load_rng and same_layout:
        rng = reader.rank_rng(topo.rank)
        if rng is not None:
            set_rng_state(rng)
            rng_restored = True
    seconds = time.perf_counter() - start
    stats = gather_to_rank0(IoStats(topo.rank, reader.bytes_read, seconds, from_peers), topo)
    if log is not None:
        log(f"loaded checkpoint {path}: " + describe_io("read", stats, seconds)
            + f"; the checkpoint holds {reader.total_bytes / MIB:.1f} MiB")
    return Loaded(path, reader.kind, reader.manifest["state"], rng_restored, reader.bytes_read,
                  reader.total_bytes, reader.json_bytes_parsed, seconds, from_peers)


def _copy_array(dest: torch.Tensor, values: np.ndarray) -> None:
    """``dest`` = ``values`` (maybe a read-only view of a mapped file), copied once on the CPU."""
    if dest.device.type == "cpu" and dest.dtype == torch.float32 and values.dtype == np.float32:
        np.copyto(dest.numpy(), values.reshape(dest.shape))
    else:
        dest.copy_(torch.from_numpy(np.array(values)))


def _read_into_fragments(path: str, model: nn.Module, optimizer: DistributedOptimizer, topo: Topology,
                         universal: bool, load_optimizer: bool,
                         validate: Callable[[dict], None] | None, progress: bool | None,
                         exchange: bool) -> tuple[CheckpointReader, int]:
    """This rank's part of a load: checks, then every fragment's states from the checkpoint.
    Returns the reader and the bytes received from other ranks."""
    planned = exchange and dist.is_initialized() and topo.world_size > 1
    reader, error = None, None
    try:
        reader = _open_checked(path, model, optimizer, universal, load_optimizer, validate)
    except (OSError, CheckpointError) as e:
        if not planned:
            raise
        error = as_checkpoint_error(e, f"loading {path}")
    if planned:  # the planned load's collectives start only if every rank passed the checks
        raise_if_any_failed(error)
    params = dict(model.named_parameters())
    states = STATES if load_optimizer else WEIGHTS_ONLY
    saved_stage = reader.manifest.get("zero_stage")  # native checkpoints only
    same_files = (reader.kind == "native" and reader.manifest["topology"] == topo.describe()
                  and (saved_stage == optimizer.stage or min(saved_stage, optimizer.stage) >= 1))
    # Same layout (ZeRO stages 1-3 partition alike): copy this rank's fragments straight from the
    # file that stored them, parsing only that rank's table. Otherwise go through the canonical
    # tensors (all tables).
    stored = reader.rank_table(topo.rank)["params"] if same_files else {}
    items = [(f, s) for f in optimizer.fragments() for s in states]
    sources: dict[str, _Sources] = {}  # by parameter: the same for each of its states

    def sources_of(f) -> _Sources:
        if f.name not in sources:
            sources[f.name] = fragment_sources(params[f.name], f.start, f.end)
        return sources[f.name]
    bar = progress_bar(len(items), f"loading {os.path.basename(path)}", "state", progress)

    def fill(item: tuple) -> None:
        f, s = item
        dest = optimizer.fragment_state(f)[s]
        if f.name in stored and f.end > f.start:
            rank = stored[f.name].get("stored_by", topo.rank)
            _copy_array(dest, reader.read_stored(rank, f.name, s, f.start, f.end))
        else:
            fill_fragment(reader, sources_of(f), s, dest)
        if not reader.recording and not all_finite(dest):  # (a planned load's recording walk reads nothing)
            raise CheckpointError(f"{path}: {f.name} ({s}) holds NaN or Inf values in the checkpoint: "
                                  f"training had diverged when it was saved; load an earlier checkpoint")

    def prefetch(item: tuple) -> None:  # start the storage reads of what fill(item) will read
        f, s = item
        if f.name in stored and f.end > f.start:
            reader.prefetch_stored(stored[f.name].get("stored_by", topo.rank), f.name, s, f.start, f.end)
        else:
            for name, region, _, _ in sources_of(f).regions:
                reader.prefetch(name, region, s)

    from_peers = 0
    if planned and not same_files:
        from_peers = planned_fill(reader, items, fill, topo, on_filled=lambda: bar.update(1))
    else:
        for item in read_ahead(items, prefetch):
            fill(item)
            bar.update(1)
    bar.close()
    return reader, from_peers


def _open_checked(path: str, model: nn.Module, optimizer: DistributedOptimizer, universal: bool,
                  load_optimizer: bool, validate: Callable[[dict], None] | None) -> CheckpointReader:
    """The checkpoint's reader, once it is known to be of this model and of the kind asked for."""
    reader = CheckpointReader(path)
    if universal and reader.kind != "universal":
        raise CheckpointError(f"--universal-checkpoint: {path} is a {reader.kind} checkpoint; drop "
                              f"--universal-checkpoint to load it, or convert it first")
    if not universal and reader.kind == "universal":
        raise CheckpointError(f"{path} is a universal checkpoint: add --universal-checkpoint to load it")
    if validate is not None:
        validate(reader.manifest["state"])
    _check_param_groups(reader, model, optimizer)
    if load_optimizer and saved_states(reader.manifest) != STATES:
        raise CheckpointError(f"{path} holds weights only (saved with --no-save-optim): pass --no-load-optim "
                              f"or --finetune to start the optimizer afresh")
    return reader


def _check_param_groups(reader: CheckpointReader, model: nn.Module, optimizer: DistributedOptimizer) -> None:
    """Every canonical tensor must have its saved shape and land in its saved optimizer group."""
    params = dict(model.named_parameters())
    for f in optimizer.fragments():
        for name, spec in sharding_of(params[f.name]).specs.items():
            entry = reader.manifest["canonical"].get(name)
            if entry is None:
                raise CheckpointError(f"{reader.path} has no tensor {name!r}: the checkpoint is of another "
                                      f"model (check --num-layers, --swiglu, --untie-embeddings-and-output-weights)")
            if tuple(entry["shape"]) != spec.shape:
                raise CheckpointError(f"{reader.path}: tensor {name} has shape {tuple(entry['shape'])} in the "
                                      f"checkpoint, {spec.shape} in this model: the checkpoint is of another "
                                      f"model shape")
            if entry["group"] != f.group:
                raise CheckpointError(f"{reader.path}: tensor {name} was in optimizer group {entry['group']}, "
                                      f"here it is in group {f.group}")
