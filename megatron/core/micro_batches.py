"""Micro-batches of a global batch and one micro-batch's loss share.

The global batch at ``consumed_samples`` is samples ``[consumed, consumed + global)``
of the dataset whatever the layout; DP rank ``d`` takes micro-batch ``m`` as samples
``consumed + (m * dp + d) * micro + [0, micro)``; its Ulysses and context-parallel ranks
keep their tokens of those samples (``SequenceLayout``). Each token's loss is divided by the
number of tokens in the global batch, so summing gradients over micro-batches and DP
ranks gives the gradient of the global mean on every layout.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from megatron.core.parallel_state import Topology
from megatron.core.sequence_layout import SequenceLayout


def micro_batches(dataset, consumed: int, global_batch: int, micro: int, topo: Topology,
                  device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """This DP rank's (tokens, labels, global index of the first sample) micro-batches of the
    global batch at ``consumed``."""
    count = global_batch // (micro * topo.dp)
    out = []
    for m in range(count):
        first = consumed + (m * topo.dp + topo.dp_rank) * micro
        samples = np.stack([dataset[(first + j) % len(dataset)] for j in range(micro)])
        t = torch.from_numpy(samples).to(device)
        layout = SequenceLayout.of(topo)  # Ulysses / ring ranks of a replica read the same samples, keep their tokens
        out.append((layout.shard(t[:, :-1]), layout.shard(t[:, 1:]), first))
    return out


def micro_batch_loss(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, denom: int) -> torch.Tensor:
    """The last stage's share of the global-batch mean loss for one micro-batch."""
    return model(inputs, labels).float().sum() / denom
