"""Write a universal checkpoint from whole canonical tensors held in memory.

The importers (Hugging Face, DCP, Megatron-Core, DeepSpeed) produce canonical tensors
rather than rank files; this writes them in the layout ``convert_to_universal`` produces
(one piece per tensor, fp32 + exp_avg + exp_avg_sq, a manifest with checksums), commits
the folder atomically and points ``latest_universal`` at it.
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass

import torch

from megatron.checkpointing.convert import check_output_folder
from megatron.checkpointing.manifest import seal
from megatron.checkpointing.reader import FORMAT, FORMAT_VERSION, MANIFEST, STATES
from megatron.checkpointing.safetensors_io import SafetensorsWriter
from megatron.checkpointing.commit import commit_folder, write_atomic

FILE_BYTES = 1 << 30  # tensors are dealt to files of about this size


@dataclass
class CanonicalEntry:
    """One canonical tensor to write: its optimizer group and its states (missing moments are zero)."""

    group: int
    fp32: torch.Tensor
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None

    def state(self, name: str) -> torch.Tensor:
        t = getattr(self, name)
        return torch.zeros_like(self.fp32, dtype=torch.float32) if t is None else t


def write_universal(output_folder: str, entries: dict[str, CanonicalEntry], state: dict,
                    param_groups: list[dict], source: dict, input_folder: str, overwrite: bool = False) -> list[str]:
    """Write ``output_folder`` and ``latest_universal`` beside it; returns the data files written.
    ``source`` describes where the tensors came from (kept in the manifest); the output folder
    is refused as the converter refuses it (never the input, never a native checkpoint)."""
    output_folder = output_folder.rstrip("/")
    check_output_folder(input_folder, output_folder, overwrite)
    parent = os.path.dirname(os.path.abspath(output_folder))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(output_folder)}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, e in entries.items():
        for s in STATES:
            if tuple(e.state(s).shape) != tuple(e.fp32.shape):
                raise ValueError(f"{name}: {s} has shape {tuple(e.state(s).shape)}, the weight {tuple(e.fp32.shape)}")
    names = sorted(entries)
    total = sum(entries[n].fp32.numel() * 4 * len(STATES) for n in names)
    plan: list[list[str]] = [[] for _ in range(max(1, math.ceil(total / FILE_BYTES)))]
    sizes = [0] * len(plan)
    for n in sorted(names, key=lambda n: -entries[n].fp32.numel()):
        i = sizes.index(min(sizes))
        plan[i].append(n)
        sizes[i] += entries[n].fp32.numel()
    files, sources = {}, []
    for index, group in enumerate(p for p in plan if p):
        file = f"universal_{index:03d}.safetensors"
        group = sorted(group)
        writer = SafetensorsWriter(os.path.join(tmp, file),
                                   [(f"{n}/{s}", tuple(entries[n].fp32.shape)) for n in group for s in STATES],
                                   {"kind": "universal"})
        params = {}
        for n in group:
            for s in STATES:
                writer.write(f"{n}/{s}", entries[n].state(s).detach().float().reshape(-1))
            shape = list(entries[n].fp32.shape)
            params[n] = {"local_shape": shape, "group": entries[n].group,
                         "pieces": [{"canonical": n, "local_offsets": [0] * len(shape),
                                     "canonical_offsets": [0] * len(shape), "sizes": shape, "owner": True}],
                         "fragments": [[0, math.prod(shape)]]}
        files[file] = writer.close().to_json()
        sources.append({"file": file, "position": [file], "params": params})
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": "universal", "state": state,
        "source_topology": source, "source_zero_stage": None, "param_groups": param_groups,
        "canonical": {n: {"shape": list(entries[n].fp32.shape), "group": entries[n].group} for n in names},
        "saved_states": list(STATES), "files": files, "sources": sources,
        "replica_check": {"policy": "imported", "max_abs_diff": 0.0, "tensor": ""},
    }
    write_atomic(os.path.join(tmp, MANIFEST), seal(manifest))
    commit_folder(tmp, output_folder)
    write_atomic(os.path.join(parent, "latest_universal"), os.path.basename(output_folder))
    return sorted(files)
