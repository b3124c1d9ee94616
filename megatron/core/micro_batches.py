"""Micro-batches of a global batch and one micro-batch's loss share.

The global batch at ``consumed_samples`` is samples ``[consumed, consumed + global)``
of the dataset whatever the layout; DP rank ``d`` takes micro-batch ``m`` as samples
``consumed + (m * dp + d) * micro + [0, micro)``; its Ulysses and context-parallel ranks
keep their tokens of those samples (``SequenceLayout``). Each token's loss is divided by the
number of tokens in the global batch (with ``--eod-mask-loss``: of loss-bearing tokens), so
summing gradients over micro-batches and DP ranks gives the gradient of the global mean on
every layout.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from megatron.core import comm
from megatron.core.documents import DocumentLayout, DocumentMasking
from megatron.core.parallel_state import Topology
from megatron.core.sequence_layout import SequenceLayout


class MicroBatch(NamedTuple):
    tokens: torch.Tensor  # [micro, seq] inputs
    labels: torch.Tensor  # [micro, seq]
    first_sample: int  # global index of the first sample (keys dropout)
    documents: DocumentLayout | None = None  # positions / attention / loss mask of its documents


def micro_batches(dataset, consumed: int, global_batch: int, micro: int, topo: Topology,
                  device: torch.device, masking: DocumentMasking | None = None) -> list[MicroBatch]:
    """This DP rank's micro-batches of the global batch at ``consumed``."""
    count = global_batch // (micro * topo.dp)
    layout = SequenceLayout.of(topo)  # Ulysses / ring ranks of a replica read the same samples, keep their tokens
    out = []
    for m in range(count):
        first = consumed + (m * topo.dp + topo.dp_rank) * micro
        samples = np.stack([dataset[(first + j) % len(dataset)] for j in range(micro)])
        t = torch.from_numpy(samples).to(device)
        documents = masking.layout(t[:, :-1]) if masking is not None else None  # of the whole samples
        out.append(MicroBatch(layout.shard(t[:, :-1]), layout.shard(t[:, 1:]), first,
                              None if documents is None else documents.sharded(layout.shard)))
    return out


def loss_denominator(batches: list[MicroBatch], global_batch: int, seq_length: int, topo: Topology,
                     device: torch.device) -> int:
    """Tokens whose loss counts in the global batch: all of them, or with a loss mask the
    unmasked ones of the whole samples summed over the data-parallel ranks (at least 1)."""
    if not batches or batches[0].documents is None or batches[0].documents.loss_mask is None:
        return global_batch * seq_length
    local = torch.tensor([sum(b.documents.loss_tokens for b in batches)], dtype=torch.float64, device=device)
    return max(1, int(comm.all_reduce(local, topo.dp_group).item()))


def micro_batch_loss(model: nn.Module, batch: MicroBatch, inputs: torch.Tensor, denom: int,
                     chunk: int = 0) -> torch.Tensor:
    """The last stage's share of the global-batch mean loss for one micro-batch (``inputs``:
    its tokens on the first stage, the received hidden states on the others; ``chunk``: the
    stage's model chunk holding the head)."""
    losses = model(inputs, batch.labels, batch.documents, chunk).float()
    if batch.documents is not None and batch.documents.loss_mask is not None:
        losses = losses * batch.documents.loss_mask
    return losses.sum() / denom
