"""Describe a checkpoint and verify every checksum."""
from __future__ import annotations

import math

from megatron.checkpointing.reader import CheckpointReader


def describe_checkpoint(path: str, verify: bool = True) -> str:
    """A human-readable summary; with ``verify`` every block of every file is checked
    (raises CheckpointError naming the file and tensors on a mismatch)."""
    reader = CheckpointReader(path)
    m = reader.manifest
    state = m["state"]
    lines = [f"checkpoint {path}", f"  kind: {m['kind']}  format version: {m['format_version']}",
             f"  iteration: {state['iteration']}  consumed samples: {state['consumed_samples']}  "
             f"consumed tokens: {state['consumed_tokens']}"]
    topo = m.get("topology") or m.get("source_topology")
    stage = m.get("zero_stage", m.get("source_zero_stage"))
    lines.append(f"  layout{' (source)' if m['kind'] == 'universal' else ''}: {topo}  ZeRO stage {stage}")
    lines.append(f"  model: {state['model_config']}")
    for i, g in enumerate(m["param_groups"]):
        lines.append(f"  param group {i}: {g}")
    total = sum(math.prod(s) for s in reader.canonical.values())
    lines.append(f"  {len(reader.canonical)} canonical tensors, {total:,} elements each of fp32, exp_avg, exp_avg_sq:")
    for name, shape in sorted(reader.canonical.items()):
        holders = len(reader.by_canonical.get(name, []))
        lines.append(f"    {name:60s} {str(list(shape)):>16s}  pieces: {holders}")
    lines.append(f"  {len(m['files'])} files, {reader.total_bytes / 2**20:.2f} MiB")
    if verify:
        for name in m["files"]:
            reader.file(name).verify_all()
        lines.append("  checksums: all verified")
    return "\n".join(lines)
