"""The training loop: layout invariance of the loss curve, precision, flags, logging, learning."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from megatron.arguments import parse_args
from megatron.core.optimizer.grad_scaler import LossScaler
from megatron.metrics_io import read_scalars
from megatron.testing.training import TINY_GPT, train_losses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["--train-iters", "20"]


@pytest.fixture(scope="module")
def reference() -> list[float]:
    return train_losses(1, TINY_GPT + STEPS)


@pytest.mark.parametrize("tp,dp", [(2, 1), (1, 2), (2, 2), (1, 4)])
@pytest.mark.parametrize("zero", [0, 1])
def test_loss_curve_is_layout_invariant(reference: list[float], tp: int, dp: int, zero: int) -> None:
    losses = train_losses(tp * dp, TINY_GPT + STEPS + ["--tensor-model-parallel-size", str(tp),
                                                       "--zero-stage", str(zero)])
    assert len(losses) == 20
    # fp32, only the reduction order differs (TP all-reduce, DP sums): ~1e-6 per step, 1e-4 after 20
    assert max(abs(a - b) for a, b in zip(losses, reference, strict=True)) < 1e-4


def test_micro_batch_count_does_not_change_the_loss(reference: list[float]) -> None:
    losses = train_losses(1, TINY_GPT + STEPS + ["--micro-batch-size", "1"])  # 8 micro-batches, not 4
    # fp32 gradient accumulation in another order: the same bound as the layout test
    assert max(abs(a - b) for a, b in zip(losses, reference, strict=True)) < 1e-4


def test_bf16_stays_close_to_fp32(reference: list[float]) -> None:
    losses = train_losses(2, TINY_GPT + STEPS + ["--bf16", "--tensor-model-parallel-size", "2"])
    # bf16 keeps 8 mantissa bits (relative 4e-3 per op); 2e-2 absolute on a loss of ~4 over 20 steps
    assert max(abs(a - b) for a, b in zip(losses, reference, strict=True)) < 2e-2


def test_fp16_with_dynamic_loss_scaling_trains(reference: list[float]) -> None:
    losses = train_losses(2, TINY_GPT + STEPS + ["--fp16", "--initial-loss-scale", "65536"])
    finite = [x for x in losses if math.isfinite(x)]
    assert len(finite) == 20
    # fp16 activations with fp32 master weights: looser than bf16 here because early skipped
    # steps (overflow at 65536) shift the curve by a step or two
    assert max(abs(a - b) for a, b in zip(losses, reference, strict=True)) < 5e-2


def test_loss_scaler_halves_after_hysteresis_and_grows_after_window() -> None:
    s = LossScaler(scale=1024.0, dynamic=True, growth_interval=2, hysteresis=2, hysteresis_tracker=2)
    s.update(found_inf=True)
    assert s.scale == 1024.0  # the first overflow is absorbed by hysteresis
    s.update(found_inf=True)
    assert s.scale == 512.0
    s.update(found_inf=False)
    s.update(found_inf=False)
    assert s.scale == 1024.0


@pytest.mark.parametrize("extra,message", [
    (["--global-batch-size", "6"], "--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2"),
    (["--hidden-size", "30"], "--hidden-size 30 is not divisible by --num-attention-heads 4"),
    (["--tensor-model-parallel-size", "3"], "world size 2 is not divisible by --tensor-model-parallel-size 3"),
    (["--bf16", "--fp16"], "mutually exclusive"),
])
def test_inconsistent_flags_are_refused(extra: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_args(TINY_GPT + STEPS + extra, world_size=2)


def test_deepspeed_config_gives_batch_sizes_precision_and_zero_stage(tmp_path) -> None:
    cfg = tmp_path / "ds_config.json"
    cfg.write_text(json.dumps({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2,
                               "zero_optimization": {"stage": 1}, "bf16": {"enabled": True},
                               "gradient_clipping": 0.5}))
    argv = _without(TINY_GPT, "--micro-batch-size", "--global-batch-size")
    args = parse_args(argv + STEPS + ["--deepspeed", "--deepspeed_config", str(cfg)], world_size=4)
    assert (args.global_batch_size, args.micro_batch_size, args.zero_stage, args.bf16, args.clip_grad) == (16, 2, 1, True, 0.5)
    with pytest.raises(ValueError, match="disagrees"):
        parse_args(TINY_GPT + STEPS + ["--deepspeed_config", str(cfg)], world_size=4)


def _without(argv: list[str], *flags: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        else:
            out.append(a)
    return out


def test_torchrun_tp2_dp2_learns_below_half_ln_vocab(tmp_path) -> None:
    """The issue's acceptance run: 4 processes, TP=2, 200 iterations, loss < ln(V)/2, logged and in TensorBoard."""
    tb = tmp_path / "tb"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
           os.path.join(REPO, "pretrain_gpt.py"), "--tensor-model-parallel-size", "2",
           "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
           "--micro-batch-size", "4", "--global-batch-size", "16", "--train-iters", "200", "--lr", "3e-3",
           "--lr-warmup-iters", "10", "--lr-decay-style", "cosine", "--min-lr", "3e-4", "--mock-data",
           "--vocab-size", "256", "--log-interval", "50", "--zero-stage", "1", "--eval-interval", "100",
           "--eval-iters", "2", "--tensorboard-dir", str(tb)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if "iteration" in line and "lm loss:" in line]
    assert len(lines) == 4 and "iteration      200/     200" in lines[-1]
    for field in ("learning rate:", "grad norm:", "tokens per second:"):
        assert field in lines[-1]
    final = float(lines[-1].split("lm loss:")[1].split("|")[0])
    assert final < 0.5 * math.log(256)
    curve = read_scalars(str(tb), "lm-loss-training/lm loss")
    assert len(curve) == 200 and abs(curve[200] - final) < 1e-5 * final
    assert "validation loss at iteration 200" in out.stdout
