"""Layout-invariant dropout: with Megatron's default dropout on, every layout trains the
same curve, and a resume on another layout continues it."""
from __future__ import annotations


import pytest
import torch

from megatron.checkpointing import convert_to_universal
from megatron.core.dropout import DropoutRNG
from megatron.testing.training import train_losses

# Vocabulary 101 padded to a multiple of TP only (divisible-by 1): at TP 2 and 3 the last rank's
# rows straddle the logical end. Six heads and FFN 192 split over TP 2 and 3; batch 12 over DP 3.
DROPOUT_GPT = ("--num-layers 2 --hidden-size 48 --num-attention-heads 6 --seq-length 16 --micro-batch-size 2 "
               "--global-batch-size 12 --lr 1e-2 --mock-data --vocab-size 101 --make-vocab-size-divisible-by 1 "
               "--hidden-dropout 0.1 --attention-dropout 0.1 --log-interval 1000").split()
STEPS = 12
# fp32: layouts differ only in reduction order (TP all-reduce, DP gradient sums), ~1e-6 relative
# after 12 steps; 1e-5 relative is the project's fp32 layout tolerance.
REL_TOL = 1e-5


def run(world: int, *extra: str, steps: int = STEPS) -> list[float]:
    return train_losses(world, DROPOUT_GPT + ["--train-iters", str(steps), *extra])


def assert_same_curve(got: list[float], want: list[float], rel: float = REL_TOL) -> None:
    assert len(got) == len(want), f"{len(got)} losses, expected {len(want)}"
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert abs(a - b) <= rel * abs(b), f"iteration {i + 1}: {a} vs {b} (relative {abs(a - b) / abs(b):.2e})"


@pytest.fixture(scope="module")
def reference() -> list[float]:
    return run(1)


def test_dropout_is_active(reference: list[float]) -> None:
    """Else the layout tests below could not fail: dropout must change the curve."""
    without = run(1, "--hidden-dropout", "0", "--attention-dropout", "0", steps=1)
    assert abs(without[0] - reference[0]) > 10 * REL_TOL * abs(reference[0])  # the first forward already differs (by ~1e-3)


@pytest.mark.parametrize("name,world,flags", [
    ("tp2", 2, ["--tensor-model-parallel-size", "2"]),
    ("tp3", 3, ["--tensor-model-parallel-size", "3"]),
    ("pp2", 2, ["--pipeline-model-parallel-size", "2"]),
    ("dp3", 3, []),
    ("dp3-zero2", 3, ["--zero-stage", "2"]),
    ("micro1", 1, ["--micro-batch-size", "1"]),  # 12 micro-batches instead of 6
])
def test_dropout_curve_is_layout_invariant(reference: list[float], name: str, world: int, flags: list[str]) -> None:
    assert_same_curve(run(world, *flags), reference)


def test_resume_tp2dp2_to_tp3_continues_the_dropout_curve(reference: list[float], tmp_path) -> None:
    half = STEPS // 2
    run(4, "--tensor-model-parallel-size", "2", "--exit-interval", str(half), "--save", str(tmp_path))
    resumed = run(3, "--tensor-model-parallel-size", "3", "--load", str(tmp_path))
    assert_same_curve(resumed, reference[half:])


def test_universal_resume_on_the_saving_layout_is_bit_exact(tmp_path) -> None:
    half, layout = STEPS // 2, ["--tensor-model-parallel-size", "2"]
    uninterrupted = run(4, *layout)
    run(4, *layout, "--exit-interval", str(half), "--save", str(tmp_path))
    convert_to_universal(str(tmp_path / f"global_step{half}"), str(tmp_path / f"global_step{half}_universal"))
    resumed = run(4, *layout, "--load", str(tmp_path), "--universal-checkpoint")
    assert len(resumed) == half
    assert resumed == uninterrupted[half:]  # the same layout: the same operations, bit for bit


def test_a_tp_shard_of_the_attention_mask_is_a_slice_of_the_whole() -> None:
    rng = DropoutRNG(seed=7, iteration=3, first_sample=40)
    probs = torch.ones(2, 6, 5, 5)
    whole = rng.attention(probs, 0.3, layer=1, head_offset=0, num_heads=6)
    shard = rng.attention(probs[:, 2:4], 0.3, layer=1, head_offset=2, num_heads=6)
    assert torch.equal(shard, whole[:, 2:4])
    rng.first_sample = 41  # the second sample of the batch, as the next micro-batch sees it
    assert torch.equal(rng.attention(probs[:1], 0.3, 1, 0, 6), whole[1:])
    dropped = (whole == 0).float().mean().item()
    assert abs(dropped - 0.3) < 0.08  # 300 draws: binomial std 0.026, 3 sigma
