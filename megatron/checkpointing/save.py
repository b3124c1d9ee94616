"""Save a native checkpoint: every rank writes its own fragments, rank 0 commits.

``DIR/.global_stepN.tmp/`` is filled and fsynced, then renamed to ``DIR/global_stepN``;
only then are ``DIR/latest`` and ``DIR/latest_checkpointed_iteration.txt`` replaced.
A crash at any point leaves the previous checkpoint and the ``latest`` files intact.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from megatron.checkpointing.agree import as_checkpoint_error, raise_if_any_failed
from megatron.checkpointing.commit import commit_folder, remove_old_checkpoints, tidy_folder, write_atomic, \
    write_pointers
from megatron.checkpointing.iolog import IoStats, describe_io, gather_to_rank0
from megatron.checkpointing.lock import acquire_folder_lock
from megatron.checkpointing.manifest import seal
from megatron.checkpointing.reader import FORMAT, FORMAT_VERSION, MANIFEST, STATES, WEIGHTS_ONLY
from megatron.checkpointing.safetensors_io import CheckpointError, SafetensorsWriter
from megatron.core.optimizer.distributed_optimizer import DistributedOptimizer
from megatron.core.parallel_state import Topology
from megatron.core.rng import rng_state
from megatron.core.sharding import sharding_of


def check_save_folder(save_dir: str) -> None:
    """Refuse a --save path that cannot hold checkpoints before any training time is spent."""
    if os.path.lexists(save_dir) and not os.path.isdir(save_dir):
        raise CheckpointError(f"--save {save_dir} is a file, expected a folder for checkpoints; choose another path")
    existing = os.path.abspath(save_dir)
    while not os.path.lexists(existing):  # the folder is created at the first save, under this one
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise CheckpointError(f"--save {save_dir}: cannot create or write that folder (check the path and "
                              f"permissions)")


@dataclass
class RankState:
    """What one rank writes at a save, taken when the save starts: its fragments' tensors (views
    of the live state for a synchronous save, host copies for an asynchronous one), its table,
    and the canonical tensors it holds (for rank 0's manifest)."""

    rank: int
    coords: dict
    entries: list[tuple[str, tuple[int, ...]]]
    tensors: list[torch.Tensor]
    params: dict
    canonical: dict
    rng: dict | None


def capture_rank_state(model: nn.Module, optimizer: DistributedOptimizer, topo: Topology,
                       states: tuple[str, ...] = STATES, save_rng: bool = True,
                       copy: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None) -> RankState:
    """This rank's part of a save; ``copy`` (if given) replaces the views by copies that later
    training steps do not change."""
    params, entries, canonical, tensors = {}, [], {}, []
    model_params = dict(model.named_parameters())
    for f in optimizer.fragments():
        name, record, group = f.name, sharding_of(model_params[f.name]), optimizer.groups[f.group]
        for spec in record.specs.values():
            canonical[spec.name] = {"shape": list(spec.shape), "group": f.group}
        # Unpartitioned (stage 0): the first member of the ZeRO group writes; the others are its replicas.
        stored_by = topo.rank if group.shards > 1 else topo.group_ranks[group.zero_group][0]
        fragments = [[f.start, f.end]] if stored_by == topo.rank and f.end > f.start else []
        params[name] = {"local_shape": list(record.local_shape),  # the tensor is empty under ZeRO-3
                        "pieces": [pc.to_json() for pc in record.piece_map.pieces],
                        "position": topo.position(group.zero_group), "stored_by": stored_by,
                        "group": f.group, "fragments": fragments}
        if fragments:
            entries += [(f"{name}/{s}", (f.end - f.start,)) for s in states]
            views = optimizer.fragment_state(f)
            tensors += [views[s] for s in states]
    return RankState(topo.rank, topo.rank_key(), entries, copy(tensors) if copy else tensors, params, canonical,
                     rng_state() if save_rng else None)


def write_rank_state(folder: str, rs: RankState) -> tuple[dict, int]:
    """Write the rank's fragments and its own table (pieces, fragments, RNG) as JSON; return its
    small manifest entry and the bytes written."""
    stem = f"rank_{rs.rank:05d}"
    file, table_file = f"{stem}.safetensors", f"{stem}.json"
    # The tensors stay unchanged until close() returns (training waits for a synchronous save;
    # an asynchronous one writes from its own copies), so hashing can trail the writes in the
    # writer's own thread, and writeback can start before the final fsync.
    writer = SafetensorsWriter(os.path.join(folder, file), rs.entries, {"rank": str(rs.rank)},
                               hash_in_background=True, write_behind=True)
    try:
        for (key, _), tensor in zip(rs.entries, rs.tensors):
            writer.write(key, tensor)
        info = writer.close()
    finally:
        writer.stop_hashing()  # also when a write failed: the hashing thread ends with the writer
    table = json.dumps({"rank": rs.rank, "coords": rs.coords, "params": rs.params, "rng": rs.rng}, indent=1)
    write_atomic(os.path.join(folder, table_file), table)
    return ({"file": file, "file_info": info.to_json(), "rank": rs.rank, "coords": rs.coords,
             "table": table_file, "table_sha256": hashlib.sha256(table.encode()).hexdigest(),
             "canonical": rs.canonical}, info.size + len(table))


def write_rank_file(folder: str, model: nn.Module, optimizer: DistributedOptimizer, topo: Topology,
                    states: tuple[str, ...] = STATES, save_rng: bool = True) -> dict:
    """Write this rank's fragments and table now; return its manifest entry."""
    return write_rank_state(folder, capture_rank_state(model, optimizer, topo, states, save_rng))[0]


@dataclass
class PendingSave:
    """A save whose folder is prepared and whose rank state is taken, not yet committed. The
    manifest's global parts are fixed when the save starts: training goes on meanwhile."""

    save_dir: str
    tag: str
    state: dict
    topology: dict
    zero_stage: int
    param_groups: list[dict]
    states: tuple[str, ...]
    keep_last_k: int | None
    started: float = field(default_factory=time.perf_counter)

    @property
    def final(self) -> str:
        return os.path.join(self.save_dir, self.tag)

    @property
    def tmp(self) -> str:
        return os.path.join(self.save_dir, f".{self.tag}.tmp")


def begin_save(save_dir: str, state: dict, optimizer: DistributedOptimizer, topo: Topology,
               save_optim: bool = True, keep_last_k: int | None = None) -> PendingSave:
    """Collective: rank 0 takes the folder's lock and makes the empty temporary folder."""
    pending = PendingSave(save_dir, f"global_step{state['iteration']}", copy.deepcopy(state), topo.describe(),
                          optimizer.stage, optimizer.hyperparameters(), STATES if save_optim else WEIGHTS_ONLY,
                          keep_last_k)
    error = None
    if topo.rank == 0:
        try:
            acquire_folder_lock(save_dir)  # from here on, every temporary entry in the folder is ours
            tidy_folder(save_dir)
            shutil.rmtree(pending.tmp, ignore_errors=True)  # left by a save of this folder's job that crashed
            os.makedirs(pending.tmp)
        except (OSError, CheckpointError) as e:
            error = as_checkpoint_error(e, f"saving {pending.final}")
    raise_if_any_failed(error)
    return pending


def write_rank_part(pending: PendingSave, rs: RankState) -> tuple[dict | None, IoStats, CheckpointError | None]:
    """This rank's files of the save (from any thread: no collectives): entry, I/O, error."""
    start = time.perf_counter()
    try:
        entry, nbytes = write_rank_state(pending.tmp, rs)
    except Exception as e:  # noqa: BLE001 -- any failure of the writer is this save's error, agreed later
        return None, IoStats(rs.rank, 0, time.perf_counter() - start), \
            as_checkpoint_error(e, f"saving {pending.final} (rank {rs.rank})")
    return entry, IoStats(rs.rank, nbytes, time.perf_counter() - start), None


def finish_save(pending: PendingSave, entry: dict | None, stats: IoStats, error: CheckpointError | None,
                topo: Topology) -> list[IoStats]:
    """Collective: agree that every rank wrote its part, then rank 0 commits. Returns every
    rank's I/O (on rank 0; others get their own). Raises the same error on every rank."""
    try:
        raise_if_any_failed(error)
    except CheckpointError:
        if topo.rank == 0:
            shutil.rmtree(pending.tmp, ignore_errors=True)  # our own unfinished save: give the space back
        raise
    gathered = gather_to_rank0((entry, stats), topo)
    if topo.rank == 0:
        try:
            _commit(pending, [e for e, _ in gathered])
        except (OSError, CheckpointError) as e:
            error = as_checkpoint_error(e, f"saving {pending.final}")
            shutil.rmtree(pending.tmp, ignore_errors=True)  # our own unfinished save: give the space back
    raise_if_any_failed(error)
    return [s for _, s in gathered] if topo.rank == 0 else [stats]


def save_checkpoint(save_dir: str, state: dict, model: nn.Module, optimizer: DistributedOptimizer,
                    topo: Topology, save_optim: bool = True, save_rng: bool = True,
                    keep_last_k: int | None = None, log: Callable[[str], None] | None = None) -> str:
    """Collective: every rank calls it. Returns the committed checkpoint folder.
    ``save_optim=False`` (``--no-save-optim``) writes the fp32 weights only. With ``keep_last_k``,
    older native checkpoints beyond the newest k are removed after the commit. A failure on any
    rank (disk full, ...) raises the same CheckpointError on every rank and leaves the previous
    checkpoint and the ``latest`` files as they were. ``log`` (rank 0's) gets the I/O summary."""
    pending = begin_save(save_dir, state, optimizer, topo, save_optim, keep_last_k)
    rs = capture_rank_state(model, optimizer, topo, pending.states, save_rng)
    stats = finish_save(pending, *write_rank_part(pending, rs), topo)
    if log is not None:
        log(f"committed checkpoint {pending.final}: " + describe_io("wrote", stats, time.perf_counter() - pending.started))
    return pending.final


def write_manifest(folder: str, entries: list[dict], state: dict, optimizer: DistributedOptimizer,
                   topo: Topology, states: tuple[str, ...] = STATES) -> None:
    """Rank 0: the global state plus one small entry per rank (its files, checksums, coordinates)."""
    _write_manifest(folder, entries, state, topo.describe(), optimizer.stage, optimizer.hyperparameters(), states)


def _write_manifest(folder: str, entries: list[dict], state: dict, topology: dict, zero_stage: int,
                    param_groups: list[dict], states: tuple[str, ...]) -> None:
    canonical = {}
    for e in entries:
        canonical.update(e.pop("canonical"))
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": "native", "state": state,
        "topology": topology, "zero_stage": zero_stage,
        "param_groups": param_groups, "canonical": dict(sorted(canonical.items())),
        "saved_states": list(states),
        "files": {e["file"]: e.pop("file_info") for e in entries},
        "sources": entries,
    }
    write_atomic(os.path.join(folder, MANIFEST), seal(manifest))


def _commit(p: PendingSave, entries: list[dict]) -> None:
    """Rank 0: manifest last into the temporary folder, then the folder, then the pointers."""
    _write_manifest(p.tmp, entries, p.state, p.topology, p.zero_stage, p.param_groups, p.states)
    commit_folder(p.tmp, p.final)
    write_pointers(p.save_dir, p.tag, p.state["iteration"])
    if p.keep_last_k:
        remove_old_checkpoints(p.save_dir, p.keep_last_k)
