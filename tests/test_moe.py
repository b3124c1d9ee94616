"""Mixture of Experts: the same losses on every EP / TP / PP / DP layout, resume across expert
layouts through native and universal checkpoints, and clear refusals of layouts that do not divide."""
from __future__ import annotations

import pytest

from megatron.testing.distributed import run_distributed

MOE = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --micro-batch-size 2 "
       "--global-batch-size 8 --lr 1e-2 --mock-data --vocab-size 97 --hidden-dropout 0 --attention-dropout 0 "
       "--log-interval 1000 --num-experts 4 --moe-aux-loss-coeff 0.01 --moe-z-loss-coeff 0.001").split()
ITERS, TOL = 12, 1e-5


def _train(rank: int, world: int, argv: list[str]) -> tuple[list[float], list[float]]:
    from megatron.training import pretrain
    state = pretrain(argv)
    return state.losses, [m["load balancing loss"] + m["z loss"] for m in state.moe_metrics]


def curves(world: int, flags: list[str], iters: int = ITERS) -> tuple[list[float], list[float]]:
    """(lm losses, auxiliary losses) of rank 0."""
    return run_distributed(_train, world, MOE + flags + ["--train-iters", str(iters)])[0]


def layout(tp: int = 1, pp: int = 1, ep: int = 1, dp: int = 1) -> tuple[int, list[str]]:
    return tp * pp * dp, ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
                          "--expert-model-parallel-size", str(ep)]


def assert_close(got: list[float], want: list[float], what: str) -> None:
    assert len(got) == len(want) > 0, f"{what}: {len(got)} values, expected {len(want)}"
    worst = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(got, want, strict=True))
    assert worst <= TOL, f"{what}: differ by up to {worst:.3e} relative (> {TOL})\n got  {got}\n want {want}"


def assert_same_run(got, want, what: str) -> None:
    assert_close(got[0], want[0], f"{what} lm loss")
    assert_close(got[1], want[1], f"{what} aux loss")


ROUTINGS = {"top2": ["--moe-router-topk", "2"],
            "top1_capacity": ["--moe-router-topk", "1", "--moe-expert-capacity-factor", "1.0"],
            "top2_capacity_position": ["--moe-router-topk", "2", "--moe-expert-capacity-factor", "0.5",
                                       "--moe-token-drop-policy", "position", "--moe-router-topk-then-softmax"]}


@pytest.fixture(scope="module")
def references() -> dict:
    return {name: curves(1, flags) for name, flags in ROUTINGS.items()}


@pytest.mark.parametrize("routing,dims", [
    ("top2", dict(ep=2, dp=2)),
    ("top2", dict(ep=4, dp=4)),
    ("top2", dict(tp=2, ep=2)),
    ("top2", dict(tp=2, pp=2, ep=2)),
    ("top1_capacity", dict(ep=4, tp=2, dp=2)),
    ("top1_capacity", dict(pp=2, ep=2, dp=2)),
    ("top2_capacity_position", dict(ep=2, dp=2, tp=2)),
])
def test_moe_losses_are_layout_invariant(references: dict, routing: str, dims: dict) -> None:
    world, flags = layout(**dims)
    assert_same_run(curves(world, flags + ROUTINGS[routing]), references[routing], f"{routing} {dims}")
