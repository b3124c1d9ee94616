"""Bytes of training state a rank holds between steps, by kind: what ZeRO partitions.

Counted from the tensors that stay alive: model parameters (or their ZeRO-3 shards),
gradient buffers (the full accumulators of stages 0-1, the reduced gradient partitions of
stages 2-3, any ``.grad`` or step copy left), and the optimizer's fp32 master weights and
Adam moments. Views of one storage are
counted once, so a buffer shared by two roles is not double counted.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import torch
from torch import nn

from megatron.core.optimizer.distributed_optimizer import DistributedOptimizer


@dataclass(frozen=True)
class Footprint:
    params: int  # model-dtype parameters, or this rank's ZeRO-3 shards of them
    grads: int  # gradient accumulation and reduced-gradient partitions
    optimizer: int  # fp32 master weights, exp_avg, exp_avg_sq

    def to_json(self) -> dict:
        return asdict(self)


def _storage_bytes(tensors: Iterable[torch.Tensor | None], seen: set[int]) -> int:
    """Bytes of the distinct storages behind ``tensors`` not yet in ``seen``."""
    total = 0
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def resident_bytes(model: nn.Module, optimizer: DistributedOptimizer) -> Footprint:
    """What this rank holds now; call it between steps."""
    seen: set[int] = set()
    params = list(model.parameters())
    param_bytes = _storage_bytes([p.data for p in params] + [g.param_shard for g in optimizer.groups], seen)
    grad_tensors = [p.grad for p in params] + list(optimizer.main_grads.values())
    grad_tensors += [t for g in optimizer.groups for t in (g.main_grad_flat, g.grad_shard, g.grad)]
    grad_bytes = _storage_bytes(grad_tensors, seen)
    state_bytes = _storage_bytes([t for g in optimizer.groups for t in (g.master, g.exp_avg, g.exp_avg_sq)], seen)
    return Footprint(param_bytes, grad_bytes, state_bytes)
