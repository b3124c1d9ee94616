"""Count the activation memory a pipeline schedule keeps alive, per stage.

Autograd keeps alive exactly the tensors that its saved-tensor hooks see packed and
not yet released, so tracking those (deduplicated by storage, parameters excluded)
gives the live activation bytes at every moment, and their peak, on any device. Used
by ``benchmarks/pipeline_activation_memory.py``, the sequence-split memory benchmarks and the
pipeline tests.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from megatron.core.micro_batches import MicroBatch
from megatron.core.parallel_state import ParallelDims, Topology
from megatron.core.pipeline_parallel import forward_backward_pipelined
from megatron.model.config import ModelConfig
from megatron.model.gpt import GPTModel


class _Saved:
    """One packed tensor; releases its bytes from the meter when autograd drops it."""

    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor: torch.Tensor, key: int, meter: "SavedTensorMeter") -> None:
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self) -> None:
        self.meter.release(self.key)


class SavedTensorMeter:
    """Live and peak bytes of the storages autograd has saved for backward, parameters excluded."""

    def __init__(self, model: nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.refs: dict[int, tuple[int, int]] = {}  # storage pointer -> (references, bytes)
        self.live = self.peak = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor | _Saved:
        key = t.untyped_storage().data_ptr()
        if key in self.params:
            return t
        count, nbytes = self.refs.get(key, (0, t.untyped_storage().nbytes()))
        if count == 0:
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.refs[key] = (count + 1, nbytes)
        return _Saved(t, key, self)

    @staticmethod
    def unpack(saved: torch.Tensor | _Saved) -> torch.Tensor:
        return saved.tensor if isinstance(saved, _Saved) else saved

    def release(self, key: int) -> None:
        count, nbytes = self.refs[key]
        if count == 1:
            del self.refs[key]
            self.live -= nbytes
        else:
            self.refs[key] = (count - 1, nbytes)

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def stage_activation_peak(rank: int, world: int, cfg: ModelConfig, micro: int, num_micro: int,
                          all_forward_first: bool = False) -> dict:
    """On a pipeline of ``world`` stages: run one global batch through the schedule and return
    this stage's peak saved-activation bytes (and what is still alive after it: must be 0)."""
    topo = Topology(ParallelDims(world, 1, world), rank)
    model = GPTModel(cfg, topo, seed=1234)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (num_micro, micro, cfg.seq_length + 1), generator=gen)
    batches = [MicroBatch(t[:, :-1].contiguous(), t[:, 1:].contiguous(), m * micro) for m, t in enumerate(tokens)]
    meter = SavedTensorMeter(model)
    with meter.hooks():
        forward_backward_pipelined(model, batches, topo, 1.0, num_micro * micro * cfg.seq_length,
                                   torch.device("cpu"), all_forward_first=all_forward_first)
    return {"stage": topo.pp_rank, "peak": meter.peak, "live_after": meter.live}


def add_sequence_model_args(p: argparse.ArgumentParser) -> None:
    """The model flags of the sequence-split memory benchmarks: one long sequence, a tiny model."""
    for flag, default in (("--seq", 2048), ("--layers", 2), ("--hidden", 128), ("--heads", 8), ("--vocab", 128)):
        p.add_argument(flag, type=int, default=default)


def sequence_model_config(a: argparse.Namespace, **overrides) -> ModelConfig:
    return ModelConfig(num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=a.heads, vocab_size=a.vocab,
                       seq_length=a.seq, make_vocab_size_divisible_by=32, **overrides)


def peak_over_ranks(results: list[dict]) -> int:
    """The largest of the ranks' peaks (``peak``), refusing a run whose meter saw saved tensors
    outlive backward (``live_after``)."""
    if any(r["live_after"] for r in results):
        raise RuntimeError("saved activations still alive after backward: the meter missed a release")
    return max(r["peak"] for r in results)
