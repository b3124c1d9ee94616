"""Megatron's OptimizerParamScheduler: LR and WD sequences against values worked out by
hand from its formulas (``lr`` is read before each step, ``step(global batch)`` after)."""
from __future__ import annotations

import math

import pytest

from megatron.arguments import parse_args
from megatron.core.batch_rampup import BatchRampup
from megatron.core.optimizer.lr_scheduler import (OptimizerParamScheduler, ScheduleShape, SchedulerMismatch,
                                                  schedule_shape_from_args)
from megatron.testing.training import TINY_GPT

# Exact formulas evaluated in floating point: tolerance for rounding only.
EXACT = 1e-12


def lrs(sched: OptimizerParamScheduler, batches: list[int]) -> list[float]:
    """The LR each of these iterations trains with, stepping by its global batch."""
    out = []
    for gbs in batches:
        out.append(sched.lr())
        sched.step(gbs, sched.num_tokens + gbs * 16)
    return out


def shape_from(flags: str, world: int = 1) -> ScheduleShape:
    return schedule_shape_from_args(parse_args(TINY_GPT + flags.split(), world))


# --lr 1 --min-lr 0.1, global batch 8, --lr-warmup-iters 2, --train-iters 10: in samples warmup
# 16, decay 80. Iteration k trains at num_steps = 8k.
#   warmup  k=0,1,2: 0, 8/16, 16/16 (num_steps <= warmup is still warmup)
#   linear  k=3: ratio (24-16)/64 = 1/8 -> 0.1 + 0.9 * 7/8 = 0.8875; k=6: ratio 1/2 -> 0.55
#   cosine  k=3: 0.1 + 0.9 * (cos(pi/8) + 1) / 2;                 k=6: 0.55
#   inverse-square-root k=3..10: sqrt(16)/sqrt(8k) (k=10 is still inside the decay)
#   k=10: num_steps 80 = decay end -> linear/cosine coefficient 0 -> 0.1; k=11: past the end -> min 0.1
ITER_FLAGS = "--lr 1 --min-lr 0.1 --lr-warmup-iters 2 --train-iters 10"
EXPECTED = {
    "constant": [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    "linear": [0.0, 0.5, 1.0, 0.8875, 0.775, 0.6625, 0.55, 0.4375, 0.325, 0.2125, 0.1, 0.1],
    "cosine": [0.0, 0.5, 1.0] + [0.1 + 0.45 * (math.cos(math.pi * (8 * k - 16) / 64) + 1) for k in range(3, 10)]
              + [0.1, 0.1],
    "inverse-square-root": [0.0, 0.5, 1.0] + [max(0.1, 4 / math.sqrt(8 * k)) for k in range(3, 11)] + [0.1],
}


@pytest.mark.parametrize("style", sorted(EXPECTED))
def test_iteration_based_lr_matches_megatron_formulas(style: str) -> None:
    sched = OptimizerParamScheduler(shape_from(f"{ITER_FLAGS} --lr-decay-style {style}"))
    got = lrs(sched, [8] * 12)
    assert len(got) == len(EXPECTED[style])
    assert got == pytest.approx(EXPECTED[style], abs=EXACT)


@pytest.mark.parametrize("style", sorted(EXPECTED))
def test_sample_based_lr_matches_and_a_batch_change_keeps_the_position(style: str) -> None:
    """--train-samples 80 --lr-warmup-samples 16 is the same schedule in samples; after 3
    iterations of 8 the batch drops to 4, so iteration k >= 3 trains at 24 + 4 (k - 3) samples."""
    shape = shape_from(f"--lr 1 --min-lr 0.1 --lr-warmup-samples 16 --train-samples 80 --lr-decay-style {style}")
    assert (shape.lr_warmup_steps, shape.lr_decay_steps, shape.wd_incr_steps) == (16, 80, 80)
    sched = OptimizerParamScheduler(shape)
    got = lrs(sched, [8, 8, 8, 4, 4, 4])
    positions = [24, 28, 32]
    decayed = {"constant": [1.0] * 3,
               "linear": [0.1 + 0.9 * (1 - (n - 16) / 64) for n in positions],
               "cosine": [0.1 + 0.45 * (math.cos(math.pi * (n - 16) / 64) + 1) for n in positions],
               "inverse-square-root": [4 / math.sqrt(n) for n in positions]}[style]
    assert got == pytest.approx([0.0, 0.5, 1.0] + decayed, abs=EXACT)
    assert sched.num_steps == 36


def test_warmup_fraction_and_warmup_init() -> None:
    # fraction 0.25 of decay 80 samples = 20; init 0.2: lr(8) = 0.2 + 0.8 * 8/20 = 0.52
    sched = OptimizerParamScheduler(shape_from(f"{ITER_FLAGS.replace('--lr-warmup-iters 2', '')} "
                                               "--lr-warmup-fraction 0.25 --lr-warmup-init 0.2"))
    assert lrs(sched, [8, 8, 8]) == pytest.approx([0.2, 0.52, 0.84], abs=EXACT)


def test_decay_by_samples_with_iteration_training() -> None:
    with pytest.raises(ValueError, match="--train-iters counts iterations: use --lr-decay-iters"):
        parse_args(TINY_GPT + "--train-iters 10 --lr-decay-samples 40".split(), 1)


@pytest.mark.parametrize("style,expected", [
    # WD incr steps = train 10 iters x 8 = 80 samples; start 0, end 0.1; iteration k at 8k samples
    ("linear", [0.1 * 8 * k / 80 for k in range(11)] + [0.1]),
    ("cosine", [0.05 * (math.cos(math.pi * (1 - 8 * k / 80)) + 1) for k in range(11)] + [0.1]),
])
def test_weight_decay_increment_styles(style: str, expected: list[float]) -> None:
    sched = OptimizerParamScheduler(shape_from(f"{ITER_FLAGS} --weight-decay-incr-style {style} "
                                               "--start-weight-decay 0 --end-weight-decay 0.1"))
    got = []
    for _ in range(12):
        got.append(sched.weight_decay())
        sched.step(8, 0)
    assert len(got) == len(expected)
    assert got == pytest.approx(expected, abs=EXACT)


def test_token_budgets_warmup_and_decay_by_tokens() -> None:
    """Megatron-DeepSpeed: --lr-warmup-tokens / --lr-decay-tokens replace samples. Tokens per
    iteration 8 x 16 = 128; warmup 256 tokens, decay 1280: iteration k at 128k tokens."""
    sched = OptimizerParamScheduler(shape_from(f"{ITER_FLAGS} --lr-warmup-tokens 256 --lr-decay-tokens 1280"))
    got = lrs(sched, [8] * 4)
    # k=3: ratio (384 - 256) / (1280 - 256) = 1/8 -> 0.8875
    assert got == pytest.approx([0.0, 0.5, 1.0, 0.8875], abs=EXACT)


def test_sample_warmup_then_token_decay_starts_where_warmup_ended() -> None:
    # warmup by 16 samples ends at k=2 with 256 tokens; decay to 1280 tokens; k=3: 384 tokens -> 0.8875
    sched = OptimizerParamScheduler(shape_from(f"{ITER_FLAGS} --lr-decay-tokens 1280"))
    got = lrs(sched, [8] * 4)
    assert sched.warmup_end_tokens == 256
    assert got == pytest.approx([0.0, 0.5, 1.0, 0.8875], abs=EXACT)


def test_resume_with_another_schedule_is_refused_naming_the_values() -> None:
    saved = OptimizerParamScheduler(shape_from(ITER_FLAGS))
    lrs(saved, [8] * 3)
    state = saved.state_dict()
    other = OptimizerParamScheduler(shape_from(ITER_FLAGS.replace("--lr 1 ", "--lr 2 ")))
    with pytest.raises(SchedulerMismatch, match=r"max_lr: checkpoint 1\.0, command line 2\.0[\s\S]*"
                                                r"--override-opt_param-scheduler"):
        other.load_state_dict(state)
    assert other.load_state_dict(state, "override") == ["max_lr: checkpoint 1.0, command line 2.0"]
    assert (other.shape.max_lr, other.num_steps, other.lr()) == (2.0, 24, pytest.approx(0.1 + 1.9 * 0.875))
    kept = OptimizerParamScheduler(shape_from(ITER_FLAGS.replace("--lr 1 ", "--lr 2 ")))
    kept.load_state_dict(state, "checkpoint")
    assert (kept.shape.max_lr, kept.lr()) == (1.0, pytest.approx(0.8875))


def test_both_scheduler_flags_are_refused() -> None:
    with pytest.raises(ValueError, match="exclude each other"):
        parse_args(TINY_GPT + ("--train-iters 10 --override-opt_param-scheduler "
                                "--use-checkpoint-opt_param-scheduler").split(), 1)


def test_rampup_batch_size_is_a_function_of_consumed_samples() -> None:
    # start 4, +4 up to 12 over 16 samples: 2 increments, one per 8 samples
    r = BatchRampup(4, 4, 16, 12)
    assert [r.global_batch(n) for n in (0, 7, 8, 15, 16, 17, 100)] == [4, 4, 8, 8, 12, 12, 12]
    with pytest.raises(ValueError, match="increment > 0 dividing"):
        BatchRampup(4, 3, 16, 12)


def test_training_logs_the_lr_each_iteration_trained_with(tmp_path) -> None:
    """The loop reads the LR before the step: iteration 1 trains at warmup's start (0)."""
    from megatron.metrics_io import read_scalars
    from megatron.testing.training import train_losses
    train_losses(1, TINY_GPT + f"{ITER_FLAGS} --lr-decay-style linear --tensorboard-dir {tmp_path}".split())
    logged = read_scalars(str(tmp_path), "learning-rate/learning-rate")
    assert sorted(logged) == list(range(1, 11))
    assert [logged[k] for k in range(1, 11)] == pytest.approx(EXPECTED["linear"][:10], abs=1e-9)


def test_rampup_run_resumes_on_another_layout(tmp_path) -> None:
    """Batch 4 -> 8 -> 12 over 16 samples (one step per 8): 4, 4, 8, 12, 12, 12 per iteration,
    52 samples in 6 iterations (the last batch overshoots 48, as upstream); saved at iteration 2 on DP 2, resumed on DP 1, the curve
    continues (fp32 reduction order only: 1e-5 relative)."""
    from megatron.testing.training import inspect_trained, train_losses
    flags = TINY_GPT + "--train-samples 48 --rampup-batch-size 4 4 16 --global-batch-size 12".split()
    whole = inspect_trained(1, flags, lambda t: (t.state.losses, t.state.consumed_samples))[0]
    assert whole[1] == 52 and len(whole[0]) == 6
    train_losses(2, flags + ["--exit-interval", "2", "--save", str(tmp_path)])
    resumed = train_losses(1, flags + ["--load", str(tmp_path)])
    assert len(resumed) == 4
    for a, b in zip(resumed, whole[0][2:], strict=True):
        assert abs(a - b) <= 1e-5 * abs(b)


def test_a_longer_run_with_constant_weight_decay_is_the_same_schedule() -> None:
    """Only --train-iters grows (the decay length is pinned by --lr-decay-iters): with a constant
    WD the WD increment length changes nothing, so the resume is accepted."""
    saved = OptimizerParamScheduler(shape_from(ITER_FLAGS + " --lr-decay-iters 10")).state_dict()
    longer = OptimizerParamScheduler(shape_from(ITER_FLAGS.replace("--train-iters 10", "--train-iters 20")
                                                + " --lr-decay-iters 10"))
    assert longer.load_state_dict(saved) == []
    ramped = OptimizerParamScheduler(shape_from(ITER_FLAGS.replace("--train-iters 10", "--train-iters 20")
                                                + " --lr-decay-iters 10 --weight-decay-incr-style linear "
                                                  "--start-weight-decay 0 --end-weight-decay 0.1"))
    with pytest.raises(SchedulerMismatch, match="wd_incr_style: checkpoint 'constant', command line 'linear'"):
        ramped.load_state_dict(saved)
