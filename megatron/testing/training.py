"""Run ``pretrain`` on N forked gloo ranks and return rank 0's loss curve, or inspect what
every rank holds after training (for tests)."""
from __future__ import annotations

from typing import Any, Callable

from megatron.testing.distributed import run_distributed

TINY_GPT = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --micro-batch-size 2 "
            "--global-batch-size 8 --lr 1e-2 --mock-data --vocab-size 97 --hidden-dropout 0 "
            "--attention-dropout 0 --log-interval 1000").split()


def _train(rank: int, world: int, argv: list[str]) -> list[float]:
    from megatron.training import pretrain
    return pretrain(argv).losses


def train_losses(world: int, argv: list[str]) -> list[float]:
    """Losses of every iteration this run trained (after any resume), as rank 0 logged them."""
    return run_distributed(_train, world, list(argv))[0]


def _train_and_inspect(rank: int, world: int, argv: list[str], inspect: Callable[[Any], Any]) -> Any:
    from megatron.training import build_trainer
    trainer = build_trainer(argv)
    trainer.train()
    return inspect(trainer)


def inspect_trained(world: int, argv: list[str], inspect: Callable[[Any], Any]) -> list[Any]:
    """Train as ``pretrain`` does, then return ``inspect(trainer)`` from every rank, by rank
    (the state between steps: after the last one)."""
    return run_distributed(_train_and_inspect, world, list(argv), inspect)
