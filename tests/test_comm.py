"""Collective wrappers: the gloo all-gather by broadcasts gives all_gather_into_tensor's bytes, on
the world and on a subgroup; an optimizer detached from its model no longer takes gradients."""
from __future__ import annotations

import gc
import weakref

import pytest

from megatron.testing.distributed import run_distributed
from megatron.testing.training import TINY_GPT


def _gathers(rank: int, world: int) -> list[bool]:
    import torch
    import torch.distributed as dist

    from megatron.core import comm

    results = []
    odd = dist.new_group([r for r in range(world) if r % 2 == 1])  # a subgroup: global ranks 1, 3, ...
    for group in (dist.group.WORLD, odd if rank % 2 == 1 else None):
        if group is None:
            continue
        n = comm.group_size(group)
        shard = torch.arange(5, dtype=torch.float32) + 100 * rank
        expected = torch.empty(5 * n)
        dist.all_gather_into_tensor(expected, shard, group=group)
        sync = torch.full((5 * n,), -1.0)
        comm.all_gather_flat(sync, shard, group)
        later = torch.full((5 * n,), -1.0)
        work = comm.all_gather_flat(later, shard, group, async_op=True)
        if work is not None:  # None for a group of one: done already
            work.wait()
        results += [torch.equal(sync, expected), torch.equal(later, expected)]
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_gloo_all_gather_flat_equals_all_gather_into_tensor(world: int) -> None:
    for got in run_distributed(_gathers, world):
        assert got and all(got)


def _detached(rank: int, world: int, argv: list[str]) -> tuple[bool, bool]:
    import torch

    from megatron.training import build_trainer

    trainer = build_trainer(argv)
    optimizer = trainer.optimizer
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    before = [g.clone() for g in optimizer.main_grads.values()]
    optimizer.detach_from_model()
    sum(p.sum() for p in params).backward()
    untouched = all(torch.equal(a, b) for a, b in zip(before, optimizer.main_grads.values()))
    kept_grads = all(p.grad is not None for p in params)  # the hook no longer takes (and clears) them
    gone = weakref.ref(optimizer)
    trainer.optimizer = optimizer = None
    gc.collect()
    return untouched and kept_grads, gone() is None


def test_detached_optimizer_takes_no_gradients_and_is_freed() -> None:
    untouched, freed = run_distributed(_detached, 1, list(TINY_GPT) + ["--train-iters", "1"])[0]
    assert untouched and freed
