"""Whole canonical tensors in and out of our checkpoints, for the interop tools.

``template`` asks the model (built on the meta device, so no memory is spent) which
canonical tensors a config has, their shapes and optimizer groups: importers check
what they produce against it instead of keeping their own lists of names.
"""
from __future__ import annotations

import torch

from megatron.checkpointing import CheckpointReader, resolve_checkpoint
from megatron.checkpointing.reader import STATES
from megatron.checkpointing.safetensors_io import CheckpointError
from megatron.checkpointing.universal_writer import CanonicalEntry, write_universal
from megatron.core.optimizer.distributed_optimizer import optimizer_group_index, zero_group_order
from megatron.core.parallel_state import ParallelDims, Topology
from megatron.model.config import ModelConfig
from megatron.model.gpt import GPTModel


def template(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], int]]:
    """canonical name -> (shape, optimizer group: 0 decays, 1 does not; experts 2 and 3), as the
    model declares."""
    with torch.device("meta"):
        model = GPTModel(cfg, Topology(ParallelDims(1), 0), seed=0)
    order = zero_group_order(p.sharding for p in model.parameters())
    out = {}
    for p in model.parameters():
        for spec in p.sharding.specs.values():
            out[spec.name] = (spec.shape, optimizer_group_index(p.sharding, order))
    return out


def open_checkpoint(path: str) -> CheckpointReader:
    """A native or universal checkpoint folder, or a save directory whose ``latest_universal``
    (else ``latest``) names one."""
    try:
        return CheckpointReader(path)
    except CheckpointError:
        for universal in (True, False):
            try:
                folder = resolve_checkpoint(path, universal, None)
            except CheckpointError:
                continue
            if folder is not None:
                return CheckpointReader(folder)
        raise


def read_tensors(reader: CheckpointReader, states: tuple[str, ...] = ("fp32",)) -> dict[str, dict[str, torch.Tensor]]:
    """Every canonical tensor of a checkpoint, whole, for each of ``states``."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, shape in sorted(reader.canonical.items()):
        box = ((0,) * len(shape), shape)
        out[name] = {s: reader.read_region(name, box, s).clone() for s in states}
    return out


def checkpoint_config(reader: CheckpointReader) -> ModelConfig:
    return ModelConfig.from_json(reader.manifest["state"]["model_config"])


def imported_state(cfg: ModelConfig, iteration: int = 0, tokenizer: dict | None = None,
                   optimizer_step: int = 0, consumed_samples: int = 0) -> dict:
    """The training state of an imported model: nothing consumed yet unless the source says so.
    The batch size and seed are unknown (None) and there is no LR schedule, so a run starts
    from it with --finetune (or --no-load-optim) and takes the rest from its own flags."""
    return {"iteration": iteration, "consumed_samples": consumed_samples, "consumed_tokens": 0,
            "model_config": cfg.to_json(), "optimizer_step": optimizer_step, "seed": None, "tokenizer": tokenizer or {"type": None, "vocab_size": cfg.vocab_size},
            "global_batch_size": None, "micro_batch_size": None, "zero_stage": None, "precision": "float32"}


def write_imported(output_folder: str, cfg: ModelConfig, tensors: dict[str, dict[str, torch.Tensor]],
                   source: dict, input_folder: str, state: dict | None = None, param_groups: list[dict] | None = None,
                   overwrite: bool = False) -> list[str]:
    """Check ``tensors`` (canonical name -> {fp32[, exp_avg, exp_avg_sq]}) against the model's
    template and write them as a universal checkpoint; absent moments are fresh (zero)."""
    expected = template(cfg)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"the imported tensors do not match the model {cfg}: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    entries = {}
    for name, (shape, group) in expected.items():
        given = tensors[name]
        for s, t in given.items():
            if s not in STATES:
                raise ValueError(f"{name}: unknown state {s!r}")
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name} ({s}) has shape {tuple(t.shape)}, the model expects {tuple(shape)}")
        entries[name] = CanonicalEntry(group, *(None if given.get(s) is None else given[s].float() for s in STATES))
    groups = param_groups or [{} for _ in range(1 + max(g for _, g in expected.values()))]
    return write_universal(output_folder, entries, state or imported_state(cfg), groups, source,
                           input_folder, overwrite)
