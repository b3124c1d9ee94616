"""Activation recomputation: keep fewer activations in forward, recompute them in backward.

Megatron's flags map onto one ``RecomputeConfig``: ``full`` recomputes whole transformer
layers (``uniform``: the stage's layers in chunks of ``num_layers``, each chunk keeping only
its input; ``block``: the first ``num_layers`` layers of the stage, one by one, the rest as
usual); ``selective`` recomputes only the core attention. ``torch.utils.checkpoint``
restores the RNG state before recomputing, so dropout masks, losses and gradients are the
same as without recomputation.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class RecomputeConfig:
    granularity: str | None = None  # None | "full" | "selective"
    method: str = "uniform"  # "uniform" | "block" (full only)
    num_layers: int = 1


def recompute_from_args(args: argparse.Namespace) -> RecomputeConfig:
    """Megatron-DeepSpeed's flags: --checkpoint-activations (+ --checkpoint-num-layers, also
    under --deepspeed-activation-checkpointing) or --recompute-granularity/-method/-num-layers."""
    if args.checkpoint_activations:
        return RecomputeConfig("full", "uniform", args.checkpoint_num_layers)
    if args.recompute_granularity == "full":
        return RecomputeConfig("full", args.recompute_method, args.recompute_num_layers)
    if args.recompute_granularity == "selective":
        return RecomputeConfig("selective")
    return RecomputeConfig()


def _chain(layers: Sequence[torch.nn.Module], rope, segments) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            x = layer(x, rope, segments)
        return x
    return run


def run_layers(layers: Sequence[torch.nn.Module], x: torch.Tensor, rope, cfg: RecomputeConfig,
               segments: torch.Tensor | None = None) -> torch.Tensor:
    """Apply ``layers`` in order, recomputing as ``cfg`` says when gradients are being recorded.
    ``rope`` and ``segments`` (document ids for the attention mask, or None) are passed to every layer."""
    if cfg.granularity != "full" or not torch.is_grad_enabled():
        return _chain(layers, rope, segments)(x)
    if cfg.method == "uniform":
        for start in range(0, len(layers), cfg.num_layers):
            x = checkpoint(_chain(layers[start:start + cfg.num_layers], rope, segments), x, use_reentrant=False)
        return x
    for i, layer in enumerate(layers):
        x = checkpoint(_chain([layer], rope, segments), x, use_reentrant=False) if i < cfg.num_layers \
            else layer(x, rope, segments)
    return x


def maybe_recompute(enabled: bool, fn: Callable, *args: torch.Tensor) -> torch.Tensor:
    """``fn(*args)``, recomputed in backward when ``enabled`` and gradients are recorded."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
