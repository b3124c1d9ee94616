"""--deepspeed_config in full or refused, and DeepSpeed's LR schedulers.

Every setting DeepSpeed would take from the file is taken with DeepSpeed's defaults;
what cannot be honoured is refused naming the key; a value that disagrees with a typed
flag is refused. The scheduler values are those DeepSpeed 0.x's own classes produce
(computed once from deepspeed/runtime/lr_schedules.py and written down here).
"""
from __future__ import annotations

import json

import pytest

from megatron.arguments import parse_args
from megatron.deepspeed_lr import DeepSpeedLRSchedule
from megatron.testing.training import TINY_GPT, train_losses
from megatron.core.optimizer.grad_scaler import loss_scaler_from_args
from megatron.training import build_lr_schedule

STEPS = ["--train-iters", "4"]
_FROM_CONFIG = ("--micro-batch-size", "--global-batch-size", "--lr")
NO_BATCH = [a for i, a in enumerate(TINY_GPT) if a not in _FROM_CONFIG and TINY_GPT[i - 1] not in _FROM_CONFIG]


def ds_args(tmp_path, config: dict, extra: list[str] = (), world: int = 1, base: list[str] = NO_BATCH):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(config))
    return parse_args(list(base) + STEPS + ["--deepspeed", f"--deepspeed_config={path}", *extra], world)


def test_gradient_accumulation_steps_multiply_the_global_batch(tmp_path) -> None:
    # The case: micro 2 x GA 4 on one rank is a global batch of 8 (it used to be 2).
    args = ds_args(tmp_path, {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4})
    assert (args.micro_batch_size, args.global_batch_size) == (2, 8)
    args = ds_args(tmp_path, {"train_batch_size": 24, "gradient_accumulation_steps": 3}, world=4)
    assert (args.micro_batch_size, args.global_batch_size) == (2, 24)


def test_train_batch_size_must_equal_micro_x_ga_x_dp(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"train_batch_size 16 != train_micro_batch_size_per_gpu 2 x "
                                         r"gradient_accumulation_steps 4 x data-parallel size 1"):
        ds_args(tmp_path, {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2,
                           "gradient_accumulation_steps": 4})


@pytest.mark.parametrize("config,key", [
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "zero_optimization.offload_optimizer"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/x"}}},
     "zero_optimization.offload_param"),
    ({"zero_optimization": {"stage": 1, "zero_quantized_weights": True}}, "zero_optimization.zero_quantized_weights"),
    ({"fancy_feature": 1}, "'fancy_feature'"),
    ({"optimizer": {"type": "Lamb", "params": {}}}, "optimizer.type 'Lamb'"),
    ({"optimizer": {"type": "Adam", "params": {"adam_w_mode": False}}}, "adam_w_mode"),
    ({"scheduler": {"type": "OneCycle", "params": {}}}, "scheduler.type 'OneCycle'"),
    ({"fp16": {"enabled": True, "consecutive_hysteresis": True}}, "fp16.consecutive_hysteresis"),
    ({"data_types": {"grad_accum_dtype": "bf16"}}, "data_types.grad_accum_dtype"),
    ({"tensorboard": {"enabled": True, "output_path": "x"}}, "tensorboard.enabled"),
])
def test_unsupported_keys_are_refused_by_name(tmp_path, config: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.").replace("(", r"\(")):
        ds_args(tmp_path, {"train_micro_batch_size_per_gpu": 2, **config})


@pytest.mark.parametrize("config,flags,message", [
    ({"train_micro_batch_size_per_gpu": 4}, ["--micro-batch-size", "2"], "train_micro_batch_size_per_gpu = 4 disagrees"),
    ({"zero_optimization": {"stage": 2}}, ["--zero-stage", "1"], "zero_optimization.stage = 2 disagrees"),
    ({"gradient_clipping": 0.5}, ["--clip-grad", "1.0"], "gradient_clipping = 0.5 disagrees"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, ["--lr", "2e-3"], "optimizer.params.lr = 0.001 disagrees"),
    ({"bf16": {"enabled": False}}, ["--bf16"], "--bf16 on the command line but bf16.enabled"),
    ({"scheduler": {"type": "WarmupLR", "params": {}}}, ["--lr-warmup-iters", "3"],
     "replaces Megatron's LR schedule, so --lr-warmup-iters"),
])
def test_config_and_command_line_that_disagree_are_refused(tmp_path, config, flags, message) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        ds_args(tmp_path, {"train_micro_batch_size_per_gpu": 2, **config}, flags)


def test_optimizer_section_sets_type_and_params_with_deepspeed_defaults(tmp_path) -> None:
    args = ds_args(tmp_path, {"train_micro_batch_size_per_gpu": 2, "optimizer": {
        "type": "AdamW", "params": {"lr": 3e-4, "betas": [0.8, 0.95], "eps": 1e-6}}})
    # weight_decay absent: DeepSpeed's (torch's) default 0, not Megatron's 0.01.
    assert (args.optimizer, args.lr, args.adam_beta1, args.adam_beta2, args.adam_eps, args.weight_decay) == \
        ("adam", 3e-4, 0.8, 0.95, 1e-6, 0.0)
    args = ds_args(tmp_path, {"train_micro_batch_size_per_gpu": 2, "optimizer": {
        "type": "SGD", "params": {"lr": 0.1, "momentum": 0.5, "weight_decay": 1e-4}}})
    assert (args.optimizer, args.lr, args.sgd_momentum, args.weight_decay) == ("sgd", 0.1, 0.5, 1e-4)


def test_fp16_dynamic_scaling_takes_deepspeed_defaults_and_static_scale(tmp_path) -> None:
    args = ds_args(tmp_path, {"train_micro_batch_size_per_gpu": 2, "fp16": {"enabled": True}})
    scaler = loss_scaler_from_args(args)
    assert args.fp16 and scaler.dynamic
    assert (scaler.scale, scaler.growth_interval, scaler.hysteresis, scaler.min_scale) == (2.0 ** 16, 1000, 2, 1.0)
    # Upstream's run_fp16.sh: loss_scale 0 (dynamic) from 2^12, while --loss-scale 12 is Megatron's
    # optimizer flag that DeepSpeed never reads.
    args = ds_args(tmp_path, {"train_micro_batch_size_per_gpu": 2, "fp16": {
        "enabled": True, "loss_scale": 0, "loss_scale_window": 50, "hysteresis": 2, "min_loss_scale": 1,
        "initial_scale_power": 12}}, ["--loss-scale", "12"])
    scaler = loss_scaler_from_args(args)
    assert scaler.dynamic and (scaler.scale, scaler.growth_interval) == (4096.0, 50)
    assert args.loss_scale_not_used == 12.0
    args = ds_args(tmp_path, {"train_micro_batch_size_per_gpu": 2, "fp16": {"enabled": True, "loss_scale": 128}})
    scaler = loss_scaler_from_args(args)
    assert not scaler.dynamic and scaler.scale == 128.0


def test_zero_sizes_and_no_op_keys(tmp_path) -> None:
    args = ds_args(tmp_path, {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 1, "wall_clock_breakdown": False,
                              "zero_optimization": {"stage": 2, "reduce_bucket_size": 5000, "overlap_comm": True,
                                                    "contiguous_gradients": True, "allgather_bucket_size": 9}})
    assert (args.zero_stage, args.ddp_bucket_size) == (2, 5000)


# (DeepSpeed class, params, learning rate of optimizer steps 1..10 as DeepSpeed produces them, base lr 5e-3)
DEEPSPEED_VALUES = [
    ("WarmupLR", {"warmup_min_lr": 1e-4, "warmup_max_lr": 1e-2, "warmup_num_steps": 5, "warmup_type": "log"},
     [0.0001, 0.0001, 0.004363697925, 0.006857801325, 0.00862739585, 0.01, 0.01, 0.01, 0.01, 0.01]),
    ("WarmupDecayLR", {"total_num_steps": 8, "warmup_min_lr": 0, "warmup_max_lr": 3e-3, "warmup_num_steps": 3,
                       "warmup_type": "linear"},
     [0, 0.0, 0.001, 0.002, 0.003, 0.0024, 0.0018, 0.0012, 0.0006, 0.0]),
    ("WarmupCosineLR", {"total_num_steps": 8, "warmup_min_ratio": 0.1, "warmup_num_steps": 3, "cos_min_ratio": 0.01,
                        "warmup_type": "log"},
     [0.0, 0.0005, 0.003339183891, 0.005, 0.004527317061, 0.003289817061, 0.001760182939, 0.000522682939,
      5e-05, 5e-05]),
]


@pytest.mark.parametrize("kind,params,expected", DEEPSPEED_VALUES, ids=[c[0] for c in DEEPSPEED_VALUES])
def test_scheduler_matches_deepspeed_formulas(tmp_path, kind: str, params: dict, expected: list[float]) -> None:
    args = ds_args(tmp_path, {"train_micro_batch_size_per_gpu": 2, "scheduler": {"type": kind, "params": params}},
                   ["--lr", "5e-3"])
    schedule = build_lr_schedule(args)
    assert isinstance(schedule, DeepSpeedLRSchedule)
    got = []
    for _ in expected:
        got.append(schedule.lr())
        schedule.step()
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_scheduler_from_config_drives_training_and_resumes(tmp_path) -> None:
    """A run whose LR comes from a WarmupDecayLR section trains differently from the same run
    with Megatron's schedule, so the section is not dropped."""
    config = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2,
              "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 4, "warmup_max_lr": 0.05,
                                                                "warmup_num_steps": 2, "warmup_type": "linear"}}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    with_section = train_losses(1, NO_BATCH + STEPS + ["--lr", "0.05", "--deepspeed", "--deepspeed_config", str(path)])
    frozen = train_losses(1, TINY_GPT + STEPS + ["--lr", "0"])
    megatron_schedule = train_losses(1, TINY_GPT + STEPS)
    # Steps 1 and 2 run at lr 0 under DeepSpeed's WarmupDecayLR (from warmup_min_lr 0), step 3 does not.
    assert with_section[:3] == frozen[:3] and with_section[3] != frozen[3]
    assert megatron_schedule[1] != frozen[1]


@pytest.mark.parametrize("data_types,bf16,fp32", [
    ({}, True, False), ({"grad_accum_dtype": "fp32"}, True, True), ({"grad_accum_dtype": "bf16"}, True, False),
    ({"grad_accum_dtype": "fp32"}, False, True)])
def test_grad_accum_dtype_is_fp32_accumulation_or_the_model_dtype(tmp_path, data_types, bf16, fp32) -> None:
    config = {"train_micro_batch_size_per_gpu": 2, "data_types": data_types, "bf16": {"enabled": bf16}}
    assert ds_args(tmp_path, config).accumulate_allreduce_grads_in_fp32 is fp32
