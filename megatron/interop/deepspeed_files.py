"""DeepSpeed's checkpoint files -> whole tensors by DeepSpeed parameter name, per model-parallel rank.

A DeepSpeed save (``global_stepN/``) holds, per model-parallel rank ``mp``:

* ``mp_rank_{mp:02d}_model_states.pt`` (ZeRO 0-2) or ``zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt``
  (ZeRO-3): the module's weights (a PipelineModule keeps those in ``layer_*-model_{tp:02d}-model_states.pt``
  files instead, and numbers ``mp`` as stage x TP + TP rank), ``param_shapes`` (name -> shape per
  optimizer group, in the order the flat buffers hold them) and the client state (Megatron-DeepSpeed's
  ``args`` and ``iteration``);
* ``[bf16_]zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt``: the data-parallel rank's partition
  of the fp32 master weights and of Adam's moments. ZeRO-1/2 flatten each group (each parameter
  followed by its ``param_alignment_paddings``) and cut the buffer into equal parts; ZeRO-3 cuts
  every parameter into ``ceil(numel / dp)`` pieces and concatenates each rank's pieces.

The files are pickles: they are read with ``torch.load(weights_only=True)`` and an allow-list of
the few DeepSpeed classes they hold, re-declared here so ``deepspeed`` need not be installed.
"""
from __future__ import annotations

import argparse
import enum
import glob
import math
import os
import re
from dataclasses import dataclass, field

import torch

STATES = ("fp32", "exp_avg", "exp_avg_sq")


class _Record:
    """Stands in for DeepSpeed's loss scalers and fragment addresses: only their attributes are kept."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


class _ZeroStage(enum.IntEnum):
    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


_ALLOWED = [
    (_Record, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (_Record, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
    (_ZeroStage, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (_Record, "deepspeed.utils.tensor_fragment.fragment_address"),
    argparse.Namespace,
]


def load_pickle(path: str) -> dict:
    """One DeepSpeed file, refusing any class outside the allow-list (no code runs on load)."""
    with torch.serialization.safe_globals(_ALLOWED):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # the unpickler's refusal names the class it would not load
            raise ValueError(f"{path}: not a DeepSpeed checkpoint file this importer can read safely ({e}); "
                             f"only tensors, argparse.Namespace and DeepSpeed's loss-scaler, ZeRO-stage and "
                             f"fragment-address records are allowed") from e


@dataclass
class RankTensors:
    """Everything one model-parallel rank holds, whole: name -> {state -> tensor}, plus hyperparameters."""

    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    groups: list[dict] = field(default_factory=list)  # per optimizer group: lr, betas, eps, weight_decay, names
    step: int = 0


@dataclass
class DeepSpeedCheckpoint:
    folder: str
    client: dict  # the model-states dict of model-parallel rank 0 (args, iteration, global_samples, ...)
    ranks: list[RankTensors]  # by model-parallel rank: pipeline stage x TP + TP rank
    zero_stage: int
    tensor_parallel: int
    pipeline: bool  # a PipelineModule save: names are "<layer index>.<name>" and "tied_modules.<key>.<name>"


def _optim_files(folder: str, mp: int) -> list[str]:
    def dp_of(path: str) -> int:
        return int(re.search(r"zero_pp_rank_(\d+)_", os.path.basename(path)).group(1))
    files = glob.glob(os.path.join(folder, f"*zero_pp_rank_*_mp_rank_{mp:02d}_optim_states.pt"))
    files = sorted(files, key=dp_of)
    if [dp_of(f) for f in files] != list(range(len(files))):
        raise ValueError(f"{folder}: the optimizer files of model-parallel rank {mp} are not numbered "
                         f"0..{len(files) - 1}: found {[os.path.basename(f) for f in files]}")
    return files


def _model_states(folder: str, mp: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the rank's model-states dict, its module weights by name)."""
    for path in (os.path.join(folder, f"mp_rank_{mp:02d}_model_states.pt"),
                 os.path.join(folder, f"zero_pp_rank_0_mp_rank_{mp:02d}_model_states.pt")):
        if os.path.isfile(path):
            states = load_pickle(path)
            module = states.get("module") or {}
            return states, {k: v for k, v in module.items() if torch.is_tensor(v)}
    raise FileNotFoundError(f"{folder} holds no DeepSpeed model-states file for model-parallel rank {mp} "
                            f"(expected mp_rank_{mp:02d}_model_states.pt or zero_pp_rank_0_mp_rank_{mp:02d}_"
                            f"model_states.pt)")


def _unflatten_zero12(parts: list[torch.Tensor], shapes: dict, paddings: list[int]) -> dict[str, torch.Tensor]:
    flat = torch.cat(parts)
    out, offset = {}, 0
    for (name, shape), pad in zip(shapes.items(), paddings, strict=True):
        n = math.prod(shape)
        if offset + n > flat.numel():
            raise ValueError(f"the flat optimizer buffer ends at {flat.numel()} elements, {name} {tuple(shape)} "
                             f"needs {offset + n}: the optimizer files do not match param_shapes")
        out[name] = flat[offset:offset + n].view(*shape)
        offset += n + pad
    return out


def _unflatten_zero3(parts: list[torch.Tensor], shapes: dict) -> dict[str, torch.Tensor]:
    dp = len(parts)
    out, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        piece = math.ceil(n / dp)
        if offset + piece > parts[0].numel():
            raise ValueError(f"ZeRO-3 partitions end at {parts[0].numel()} elements, {name} needs "
                             f"{offset + piece}: the optimizer files do not match param_shapes")
        out[name] = torch.cat([p[offset:offset + piece] for p in parts])[:n].view(*shape)
        offset += piece
    return out


def _read_rank(folder: str, mp: int) -> tuple[dict, RankTensors, int]:
    states, weights = _model_states(folder, mp)
    files = _optim_files(folder, mp)
    rank = RankTensors()
    if not files and states.get("optimizer") is not None:
        raise ValueError(f"{folder}: a ZeRO-0 save keeps Adam's state in a torch optimizer state dict keyed by "
                         f"position, which names cannot be recovered from; resave with ZeRO stage 1-3, or "
                         f"without the optimizer for a weights-only import")
    if not files and not weights:
        raise ValueError(f"{folder}: model-parallel rank {mp} has neither optimizer files nor module weights (a "
                         f"PipelineModule save keeps them in layer_* files, which are read only with the optimizer "
                         f"state); copy its *zero_pp_rank_*_mp_rank_{mp:02d}_optim_states.pt files")
    if not files:  # weights only: the module's tensors are the master
        rank.tensors = {n: {"fp32": t.float()} for n, t in weights.items()}
        return states, rank, 0
    dp = states.get("dp_world_size", len(files))
    if len(files) != dp:
        raise ValueError(f"{folder}: model-parallel rank {mp} was saved by {dp} data-parallel ranks but "
                         f"{len(files)} optimizer files are there ({[os.path.basename(f) for f in files]}); "
                         f"copy the missing *zero_pp_rank_*_mp_rank_{mp:02d}_optim_states.pt files")
    optim = [load_pickle(f)["optimizer_state_dict"] for f in files]
    stage = int(optim[0].get("zero_stage", 1))
    shapes = states.get("param_shapes")  # under ZeRO-3 from zero_pp_rank_0's model states (_model_states)
    if not shapes:
        raise ValueError(f"{folder}: model states of model-parallel rank {mp} have no param_shapes; cannot place "
                         f"the flat optimizer partitions")
    base_key = "optimizer_state_dict" if stage == 3 else "base_optimizer_state"
    master_key = "fp32_flat_groups" if stage == 3 else "single_partition_of_fp32_groups"
    for g, group_shapes in enumerate(shapes):
        per_state = {"fp32": [o[master_key][g] for o in optim]}
        for moment in ("exp_avg", "exp_avg_sq"):
            per_state[moment] = [o[base_key]["state"][g][moment] for o in optim]
        for s, parts in per_state.items():
            if stage == 3:
                whole = _unflatten_zero3([p.float() for p in parts], group_shapes)
            else:
                pads = optim[0].get("param_alignment_paddings", [[0] * len(group_shapes)])[g]
                whole = _unflatten_zero12([p.float() for p in parts], group_shapes, pads)
            for name, t in whole.items():
                rank.tensors.setdefault(name, {})[s] = t
        hyper = optim[0][base_key]["param_groups"][g]
        rank.groups.append({"lr": hyper.get("lr"), "betas": list(hyper.get("betas", (0.9, 0.999))),
                            "eps": hyper.get("eps"), "weight_decay": hyper.get("weight_decay"),
                            "names": list(group_shapes)})
        step = optim[0][base_key]["state"][g].get("step", 0)
        rank.step = int(step.item() if torch.is_tensor(step) else step)
    return states, rank, stage


def read_deepspeed(folder: str) -> DeepSpeedCheckpoint:
    """Every model-parallel rank of a DeepSpeed save folder (``global_stepN``, or its parent with a
    ``latest`` file), reassembled from its data-parallel partitions."""
    latest = os.path.join(folder, "latest")
    if os.path.isfile(latest) and not glob.glob(os.path.join(folder, "*model_states.pt")):
        with open(latest) as f:
            folder = os.path.join(folder, f.read().strip())
    names = [os.path.basename(p) for p in glob.glob(os.path.join(folder, "*model_states.pt"))]
    mps = sorted({int(m) for n in names for m in re.findall(r"mp_rank_(\d+)", n)})
    if not mps:
        raise FileNotFoundError(f"{folder} holds no DeepSpeed *model_states.pt files")
    if mps != list(range(len(mps))):
        raise ValueError(f"{folder}: model-parallel ranks {mps} are not 0..{len(mps) - 1}: a rank's files are missing")
    client, ranks, stage = {}, [], 0
    for mp in mps:
        states, rank, stage = _read_rank(folder, mp)
        client = client or states
        ranks.append(rank)
    layer_files = [n for n in names if n.startswith("layer_")]
    tp_ranks = {int(m) for n in layer_files for m in re.findall(r"-model_(\d+)-", n)}
    args = client.get("args")
    if layer_files:
        tp = getattr(args, "tensor_model_parallel_size", None) or max(len(tp_ranks), 1)
    else:
        tp = len(mps)
    if len(mps) % tp:
        raise ValueError(f"{folder}: {len(mps)} model-parallel ranks do not divide into tensor-parallel size {tp}")
    return DeepSpeedCheckpoint(folder, client, ranks, stage, tp, bool(layer_files))
