"""The forward-backward pass over the micro-batches of a global batch (see ``micro_batches``
for which samples each rank takes and how the loss is normalised)."""
from __future__ import annotations

import torch
from torch import nn

from megatron.core import comm
from megatron.core.dropout import begin_micro_batch
from megatron.core.micro_batches import MicroBatch, loss_denominator, micro_batch_loss, micro_batches
from megatron.core.parallel_state import Topology
from megatron.core.pipeline_interleaved import forward_backward_interleaved
from megatron.core.pipeline_parallel import forward_backward_pipelined

__all__ = ["MicroBatch", "forward_backward", "loss_denominator", "micro_batch_loss", "micro_batches"]


def forward_backward(model: nn.Module, batches: list[MicroBatch], topo: Topology,
                     loss_scale: float, denom: int, device: torch.device, backward: bool = True,
                     p2p_clock: comm.WaitClock | None = None) -> torch.Tensor:
    """Run every micro-batch; returns the global batch's mean loss (the same on every rank).
    ``p2p_clock`` adds the time the pipeline waited for its point-to-point traffic."""
    if len(getattr(model, "chunks", ())) > 1:
        local = forward_backward_interleaved(model, batches, topo, loss_scale, denom, device, backward,
                                             clock=p2p_clock)
    elif topo.pp > 1:
        local = forward_backward_pipelined(model, batches, topo, loss_scale, denom, device, backward,
                                           clock=p2p_clock)
    else:
        local = torch.zeros(1, device=device)
        for batch in batches:
            begin_micro_batch(model, batch.first_sample)
            with torch.set_grad_enabled(backward):
                loss = micro_batch_loss(model, batch, batch.tokens, denom)
            if backward:
                (loss * loss_scale).backward()
            local += loss.detach()
    # Only one TP rank of the last stage contributes, so the world sum is the global-batch loss.
    if not (topo.is_last_stage and topo.tp_rank == 0):
        local.zero_()
    return comm.world_all_reduce(local)
