"""Save a native checkpoint: every rank writes its own fragments, rank 0 commits.

``DIR/.global_stepN.tmp/`` is filled and fsynced, then renamed to ``DIR/global_stepN``;
only then are ``DIR/latest`` and ``DIR/latest_checkpointed_iteration.txt`` replaced.
A crash at any point leaves the previous checkpoint and the ``latest`` files intact.
"""
from __future__ import annotations

import json
import os
import shutil

import torch.distributed as dist
from torch import nn

from megatron.checkpointing.commit import commit_folder, recover_interrupted_commits, write_atomic
from megatron.checkpointing.reader import FORMAT, FORMAT_VERSION, MANIFEST, STATES, WEIGHTS_ONLY
from megatron.checkpointing.safetensors_io import CheckpointError, SafetensorsWriter
from megatron.core import comm
from megatron.core.optimizer.distributed_optimizer import DistributedOptimizer
from megatron.core.parallel_state import Topology
from megatron.initialize import rng_state


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
    """Write this rank's fragments (the ``states`` of each); return its entry of the manifest."""
    file = f"rank_{topo.rank:05d}.safetensors"
    write_tensors = optimizer.stage >= 1 or topo.dp_rank == 0  # stage 0: DP replicas are identical
    params, entries, canonical = {}, [], {}
    model_params = dict(model.named_parameters())
    for f in optimizer.fragments():
        name, p = f.name, model_params[f.name]
        for spec in p.canonical_specs.values():
            canonical[spec.name] = {"shape": list(spec.shape), "group": f.group}
        fragments = [[f.start, f.end]] if write_tensors and f.end > f.start else []
        params[name] = {"local_shape": list(p.piece_map.local_shape),  # p is empty under ZeRO-3
                        "pieces": [pc.to_json() for pc in p.piece_map.pieces],
                        "group": f.group, "fragments": fragments}
        if fragments:
            entries += [(f"{name}/{s}", (f.end - f.start,)) for s in states]
    writer = SafetensorsWriter(os.path.join(folder, file), entries, {"rank": str(topo.rank)})
    for f in optimizer.fragments():
        if write_tensors and f.end > f.start:
            views = optimizer.fragment_state(f)
            for s in states:
                writer.write(f"{f.name}/{s}", views[s])
    info = writer.close()
    return {"file": file, "file_info": info.to_json(), "rank": topo.rank,
            "position": [topo.pp_rank, topo.tp_rank],
            "coords": {"tp": topo.tp_rank, "dp": topo.dp_rank, "pp": topo.pp_rank},
            "params": params, "canonical": canonical, "rng": rng_state() if save_rng else None}


def save_checkpoint(save_dir: str, state: dict, model: nn.Module, optimizer: DistributedOptimizer,
                    topo: Topology, save_optim: bool = True, save_rng: bool = True) -> str:
    """Collective: every rank calls it. Returns the committed checkpoint folder.
    ``save_optim=False`` (``--no-save-optim``) writes the fp32 weights only."""
    states = STATES if save_optim else WEIGHTS_ONLY
    tag = f"global_step{state['iteration']}"
    final = os.path.join(save_dir, tag)
    tmp = os.path.join(save_dir, f".{tag}.tmp")
    if topo.rank == 0:
        os.makedirs(save_dir, exist_ok=True)
        recover_interrupted_commits(save_dir)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that crashed
        os.makedirs(tmp)
    comm.barrier()
    entry = write_rank_file(tmp, model, optimizer, topo, states, save_rng)
    entries = [None] * topo.world_size if topo.rank == 0 else None
    if dist.is_initialized() and topo.world_size > 1:
        dist.gather_object(entry, entries, dst=0)
    else:
        entries = [entry]
    if topo.rank == 0:
        canonical = {}
        for e in entries:
            canonical.update(e.pop("canonical"))
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "kind": "native", "state": state,
            "topology": topo.describe(), "zero_stage": optimizer.stage,
            "param_groups": optimizer.hyperparameters(), "canonical": dict(sorted(canonical.items())),
            "saved_states": list(states),
            "files": {e["file"]: e.pop("file_info") for e in entries},
            "rng": {str(e["rank"]): rng for e in entries if (rng := e.pop("rng")) is not None},
            "sources": entries,
        }
        write_atomic(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1))
        commit_folder(tmp, final)
        write_atomic(os.path.join(save_dir, "latest"), tag)
        write_atomic(os.path.join(save_dir, "latest_checkpointed_iteration.txt"), str(state["iteration"]))
    comm.barrier()
    return final
