"""Save a native checkpoint: every rank writes its own fragments, rank 0 commits.

``DIR/.global_stepN.tmp/`` is filled and fsynced, then renamed to ``DIR/global_stepN``;
only then are ``DIR/latest`` and ``DIR/latest_checkpointed_iteration.txt`` replaced.
A crash at any point leaves the previous checkpoint and the ``latest`` files intact.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch.distributed as dist
from torch import nn

from megatron.checkpointing.agree import as_checkpoint_error, raise_if_any_failed
from megatron.checkpointing.commit import commit_folder, remove_old_checkpoints, tidy_folder, write_atomic, \
    write_pointers
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


def write_rank_file(folder: str, model: nn.Module, optimizer: DistributedOptimizer, topo: Topology,
                    states: tuple[str, ...] = STATES, save_rng: bool = True) -> dict:
    """Write this rank's fragments (the ``states`` of each) and its own table (pieces, fragments,
    RNG) as JSON; return the rank's small manifest entry and the canonical tensors it holds
    (for rank 0 to merge)."""
    stem = f"rank_{topo.rank:05d}"
    file, table_file = f"{stem}.safetensors", f"{stem}.json"
    params, entries, canonical = {}, [], {}
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
    writer = SafetensorsWriter(os.path.join(folder, file), entries, {"rank": str(topo.rank)})
    for f in optimizer.fragments():
        if params[f.name]["fragments"]:
            views = optimizer.fragment_state(f)
            for s in states:
                writer.write(f"{f.name}/{s}", views[s])
    info = writer.close()
    table = json.dumps({"rank": topo.rank, "coords": topo.rank_key(), "params": params,
                        "rng": rng_state() if save_rng else None}, indent=1)
    write_atomic(os.path.join(folder, table_file), table)
    return {"file": file, "file_info": info.to_json(), "rank": topo.rank, "coords": topo.rank_key(),
            "table": table_file, "table_sha256": hashlib.sha256(table.encode()).hexdigest(),
            "canonical": canonical}


def save_checkpoint(save_dir: str, state: dict, model: nn.Module, optimizer: DistributedOptimizer,
                    topo: Topology, save_optim: bool = True, save_rng: bool = True,
                    keep_last_k: int | None = None) -> str:
    """Collective: every rank calls it. Returns the committed checkpoint folder.
    ``save_optim=False`` (``--no-save-optim``) writes the fp32 weights only. With ``keep_last_k``,
    older native checkpoints beyond the newest k are removed after the commit. A failure on any
    rank (disk full, ...) raises the same CheckpointError on every rank and leaves the previous
    checkpoint and the ``latest`` files as they were."""
    states = STATES if save_optim else WEIGHTS_ONLY
    tag = f"global_step{state['iteration']}"
    final = os.path.join(save_dir, tag)
    tmp = os.path.join(save_dir, f".{tag}.tmp")
    error = None
    if topo.rank == 0:
        try:
            acquire_folder_lock(save_dir)  # from here on, every temporary entry in the folder is ours
            tidy_folder(save_dir)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a save of this folder's job that crashed
            os.makedirs(tmp)
        except (OSError, CheckpointError) as e:
            error = as_checkpoint_error(e, f"saving {final}")
    raise_if_any_failed(error)
    entry = None
    try:
        entry = write_rank_file(tmp, model, optimizer, topo, states, save_rng)
    except (OSError, CheckpointError) as e:
        error = as_checkpoint_error(e, f"saving {final} (rank {topo.rank})")
    try:
        raise_if_any_failed(error)
    except CheckpointError:
        if topo.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # our own unfinished save: give the space back
        raise
    entries = [None] * topo.world_size if topo.rank == 0 else None
    if dist.is_initialized() and topo.world_size > 1:
        dist.gather_object(entry, entries, dst=0)
    else:
        entries = [entry]
    if topo.rank == 0:
        try:
            _commit(save_dir, tmp, final, tag, state, topo, optimizer, entries, states, keep_last_k)
        except (OSError, CheckpointError) as e:
            error = as_checkpoint_error(e, f"saving {final}")
            shutil.rmtree(tmp, ignore_errors=True)  # our own unfinished save: give the space back
    raise_if_any_failed(error)
    return final


def write_manifest(folder: str, entries: list[dict], state: dict, optimizer: DistributedOptimizer,
                   topo: Topology, states: tuple[str, ...] = STATES) -> None:
    """Rank 0: the global state plus one small entry per rank (its files, checksums, coordinates)."""
    canonical = {}
    for e in entries:
        canonical.update(e.pop("canonical"))
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": "native", "state": state,
        "topology": topo.describe(), "zero_stage": optimizer.stage,
        "param_groups": optimizer.hyperparameters(), "canonical": dict(sorted(canonical.items())),
        "saved_states": list(states),
        "files": {e["file"]: e.pop("file_info") for e in entries},
        "sources": entries,
    }
    write_atomic(os.path.join(folder, MANIFEST), seal(manifest))


def _commit(save_dir: str, tmp: str, final: str, tag: str, state: dict, topo: Topology,
            optimizer: DistributedOptimizer, entries: list[dict], states: tuple[str, ...],
            keep_last_k: int | None) -> None:
    """Rank 0: manifest last into the temporary folder, then the folder, then the pointers."""
    write_manifest(tmp, entries, state, optimizer, topo, states)
    commit_folder(tmp, final)
    write_pointers(save_dir, tag, state["iteration"])
    if keep_last_k:
        remove_old_checkpoints(save_dir, keep_last_k)
