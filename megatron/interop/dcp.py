"""PyTorch Distributed Checkpoint (DCP) <-> our checkpoints, for torchtitan-style users.

The DCP holds plain whole tensors keyed by canonical names, in torchtitan's shape:
``model.<name>`` (fp32 weights) and ``optimizer.state.<name>.{exp_avg, exp_avg_sq, step}``
(Adam's moments and step, as ``torch.optim.Adam`` keeps them). ``ucp_state.json`` beside the
DCP files keeps our training state (model config, iteration, param groups) as JSON, so a
round trip loses nothing; a DCP without it needs the model config given.
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron.checkpointing.reader import saved_states

from megatron.interop.canonical import imported_state, open_checkpoint, read_tensors, write_imported
from megatron.model.config import ModelConfig

STATE_FILE = "ucp_state.json"
MOMENTS = ("exp_avg", "exp_avg_sq")


def export_dcp(input_folder: str, output_folder: str) -> int:
    """Write a DCP folder from a native or universal checkpoint; returns the tensor count."""
    reader = open_checkpoint(input_folder)
    states = saved_states(reader.manifest)
    tensors = read_tensors(reader, states)
    state_dict = {"model": {n: s["fp32"] for n, s in tensors.items()}}
    if set(MOMENTS) <= set(states):  # a weights-only checkpoint (--no-save-optim) has no Adam state
        step = torch.tensor(float(reader.manifest["state"].get("optimizer_step", 0)))
        state_dict["optimizer"] = {"state": {n: {"exp_avg": s["exp_avg"], "exp_avg_sq": s["exp_avg_sq"],
                                                 "step": step.clone()} for n, s in tensors.items()}}
    os.makedirs(output_folder, exist_ok=True)
    dcp.save(state_dict, storage_writer=dcp.FileSystemWriter(output_folder), no_dist=True)
    side = {"state": reader.manifest["state"], "param_groups": reader.manifest["param_groups"],
            "source": reader.path}
    with open(os.path.join(output_folder, STATE_FILE), "w") as f:
        json.dump(side, f, indent=1)
    return len(tensors)


def read_dcp(folder: str, keys: dict[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP folder (or those in ``keys``: flat key -> shape), read with torch's
    DCP reader into whole fp32 tensors, by flat key."""
    reader = dcp.FileSystemReader(folder)
    meta = reader.read_metadata().state_dict_metadata
    if keys is None:
        keys = {k: tuple(m.size) for k, m in meta.items() if isinstance(m, TensorStorageMetadata)}
    missing = [k for k in keys if k not in meta]
    if missing:
        raise ValueError(f"DCP checkpoint {folder} has no tensors {missing[:5]}")
    state = {k: torch.empty(shape, dtype=meta[k].properties.dtype) for k, shape in keys.items()}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return {k: v.float() for k, v in state.items()}


def import_dcp(folder: str, output_folder: str, model_config: ModelConfig | None = None,
               overwrite: bool = False) -> int:
    """Write a universal checkpoint from a canonical-keyed DCP folder; returns the tensor count."""
    side_file = os.path.join(folder, STATE_FILE)
    side = None
    if os.path.isfile(side_file):
        with open(side_file) as f:
            side = json.load(f)
    if model_config is None:
        if side is None:
            raise ValueError(f"{folder} has no {STATE_FILE}: pass --model-config FILE (a JSON of the model's "
                             f"shape: num_layers, hidden_size, num_attention_heads, vocab_size, seq_length, ...)")
        model_config = ModelConfig.from_json(side["state"]["model_config"])
    flat = read_dcp(folder)
    names = sorted(k[len("model."):] for k in flat if k.startswith("model."))
    if not names:
        raise ValueError(f"DCP checkpoint {folder} has no model.* tensors: expected canonical names under 'model'")
    tensors = {}
    for n in names:
        entry = {"fp32": flat[f"model.{n}"]}
        for m in MOMENTS:
            key = f"optimizer.state.{n}.{m}"
            if key in flat:
                entry[m] = flat[key]
        tensors[n] = entry
    steps = {int(v) for k, v in flat.items() if k.startswith("optimizer.state.") and k.endswith(".step")}
    if len(steps) > 1:
        raise ValueError(f"{folder}: the Adam step differs between tensors ({sorted(steps)}); expected one")
    if side is not None and side["state"]["model_config"] == model_config.to_json():
        state, groups = side["state"], side["param_groups"]
    else:
        state, groups = imported_state(model_config, optimizer_step=steps.pop() if steps else 0), None
    write_imported(output_folder, model_config, tensors, {"imported_from": "dcp", "folder": os.path.abspath(folder)},
                   folder, state, groups, overwrite)
    return len(tensors)
