"""Run ``pretrain`` on N forked gloo ranks and return rank 0's loss curve (for tests)."""
from __future__ import annotations

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
