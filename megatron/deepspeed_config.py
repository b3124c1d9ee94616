"""DeepSpeed's JSON config (``--deepspeed_config``), taken in full or refused key by key.

Every key either sets the training setting DeepSpeed would set (with DeepSpeed's
defaults for what the file leaves out), is a documented no-op here (it changes only
communication scheduling, memory layout or DeepSpeed's own console output, never the
numbers), or is refused with a message naming it. A value that disagrees with a flag the
user typed is refused too: two sources for one setting must not silently race.
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Callable

# Keys that change neither the math nor our logs' content: DeepSpeed's own progress print,
# timers and profiling switches, and the permission to use a client optimizer.
NO_OP_KEYS = {"steps_per_print", "wall_clock_breakdown", "memory_breakdown", "zero_allow_untested_optimizer",
              "dump_state"}
# zero_optimization keys that only chunk or overlap communication or lay out memory.
ZERO_NO_OP_KEYS = {"allgather_bucket_size", "allgather_partitions", "overlap_comm", "contiguous_gradients",
                   "reduce_scatter", "round_robin_gradients", "sub_group_size", "stage3_prefetch_bucket_size",
                   "stage3_param_persistence_threshold", "stage3_max_reuse_distance",
                   "stage3_gather_16bit_weights_on_model_save", "stage3_gather_fp16_weights_on_model_save",
                   "elastic_checkpoint", "ignore_unused_parameters", "cpu_offload", "load_from_fp32_weights"}
# (key, value DeepSpeed would use if absent, values accepted here): settings we implement one way only.
FIXED_VALUES = {
    # Each rank's loss is already divided by the global batch's token count before backward,
    # so gradients are always scaled by 1/DP before the reduce: DeepSpeed's prescale (true) and
    # its default (divide after the reduce) agree here up to rounding.
    "prescale_gradients": (False, {False, True}),
    "gradient_predivide_factor": (1.0, {1.0}),
    "communication_data_type": (None, {None, "fp32", "float32"}),
    "sparse_gradients": (False, {False}),
}
# Sections accepted only when switched off.
SWITCHED_OFF_SECTIONS = {"amp", "tensorboard", "wandb", "csv_monitor", "comet", "flops_profiler", "compression_training",
                         "curriculum_learning", "data_efficiency", "elasticity", "autotuning", "sparse_attention",
                         "pipeline", "nebula", "aio", "quantize_training", "hybrid_engine", "checkpoint"}
SCHEDULER_DEFAULTS = {  # DeepSpeed's defaults (deepspeed/runtime/lr_schedules.py)
    "WarmupLR": {"warmup_min_lr": 0.0, "warmup_max_lr": None, "warmup_num_steps": 1000, "warmup_type": "log"},
    "WarmupDecayLR": {"total_num_steps": None, "warmup_min_lr": 0.0, "warmup_max_lr": 0.001,
                      "warmup_num_steps": 1000, "warmup_type": "log"},
    "WarmupCosineLR": {"total_num_steps": None, "warmup_min_ratio": 0.0, "warmup_num_steps": 1000,
                       "cos_min_ratio": 0.0001, "warmup_type": "log"},
}
MEGATRON_SCHEDULE_FLAGS = {"lr_warmup_iters": "--lr-warmup-iters", "lr_decay_style": "--lr-decay-style",
                           "lr_decay_iters": "--lr-decay-iters", "min_lr": "--min-lr"}


class _Merger:
    """Applies one config to the parsed flags; ``fail`` raises the caller's error type."""

    def __init__(self, args: argparse.Namespace, path: str, explicit: set[str], error: Callable[[str], Exception]):
        self.args, self.path, self.explicit, self.error = args, path, explicit, error

    def fail(self, message: str) -> None:
        raise self.error(f"{self.path}: {message}")

    def set(self, dest: str, value: Any, key: str) -> None:
        """Set ``args.dest`` from config key ``key`` unless the user typed a different value."""
        current = getattr(self.args, dest, None)
        if dest in self.explicit and current != value:
            flag = "--" + dest.replace("_", "-")
            self.fail(f"{key} = {value!r} disagrees with {flag} {current!r} on the command line: make them equal "
                      f"or drop one")
        setattr(self.args, dest, value)

    def only_known(self, section: dict, known: set[str], where: str) -> None:
        for key in section:
            if key not in known:
                self.fail(f"{where}{key} is not supported here (known: {', '.join(sorted(known))})")


def merge_deepspeed_config(args: argparse.Namespace, dp: int, explicit: set[str],
                           error: Callable[[str], Exception]) -> None:
    """Merge ``args.deepspeed_config`` into ``args`` for a run with data-parallel size ``dp``."""
    path = args.deepspeed_config
    try:
        with open(path) as f:
            ds = json.load(f)
    except FileNotFoundError:
        raise error(f"--deepspeed_config {path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise error(f"--deepspeed_config {path}: not valid JSON: {exc}") from None
    if not isinstance(ds, dict):
        raise error(f"--deepspeed_config {path}: expected a JSON object")
    m = _Merger(args, path, explicit, error)
    handled = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "gradient_clipping", "zero_optimization", "bf16", "fp16", "optimizer", "scheduler", "data_types"}
    for key, value in ds.items():
        if key in handled or key in NO_OP_KEYS:
            continue
        if key in FIXED_VALUES:
            if value not in FIXED_VALUES[key][1]:
                m.fail(f"{key} = {value!r} is not supported here (only {FIXED_VALUES[key][0]!r})")
        elif key in SWITCHED_OFF_SECTIONS:
            if isinstance(value, dict) and value.get("enabled", False):
                hint = " (use --tensorboard-dir / --wandb-project)" if key in ("tensorboard", "wandb") else ""
                m.fail(f"{key}.enabled = true is not supported here{hint}")
        else:
            m.fail(f"key {key!r} is not supported here")
    _batch_sizes(m, ds, dp)
    _precision(m, ds)
    _zero(m, ds.get("zero_optimization", {}))
    if "gradient_clipping" in ds:  # absent: Megatron's --clip-grad stays (DeepSpeed alone would not clip)
        m.set("clip_grad", float(ds["gradient_clipping"]), "gradient_clipping")
    if "optimizer" in ds:
        _optimizer(m, ds["optimizer"])
    args.ds_scheduler = _scheduler(m, ds["scheduler"]) if "scheduler" in ds else None
    m.only_known(ds.get("data_types", {}), {"grad_accum_dtype"}, "data_types.")
    _grad_accum_dtype(m, ds.get("data_types", {}).get("grad_accum_dtype"))


def _grad_accum_dtype(m: _Merger, name: str | None) -> None:
    """fp32 is Megatron's --accumulate-allreduce-grads-in-fp32; the model's own dtype is the default."""
    a = m.args
    model = "bf16" if a.bf16 else "fp16" if a.fp16 else "fp32"
    if name in ("fp32", "float32"):
        m.set("accumulate_allreduce_grads_in_fp32", True, "data_types.grad_accum_dtype")
    elif name is not None and name != model:
        m.fail(f"data_types.grad_accum_dtype = {name!r}: gradients accumulate in fp32 or in the model's dtype "
               f"({model}) here; use \"fp32\" or \"{model}\"")


def _batch_sizes(m: _Merger, ds: dict, dp: int) -> None:
    """DeepSpeed's rule: train_batch_size = micro x gradient_accumulation_steps x DP; any two give the third."""
    a = m.args
    train = ds.get("train_batch_size", a.global_batch_size if "global_batch_size" in m.explicit else None)
    micro = ds.get("train_micro_batch_size_per_gpu", a.micro_batch_size if "micro_batch_size" in m.explicit else None)
    ga = ds.get("gradient_accumulation_steps")
    if train is None and micro is None:
        if ga is not None:
            m.fail("gradient_accumulation_steps needs train_batch_size or train_micro_batch_size_per_gpu")
        return
    if micro is None:
        ga = ga or 1
        micro = train // (dp * ga)
    elif train is None:
        train = micro * (ga or 1) * dp
    ga = ga if ga is not None else train // (micro * dp)
    if micro < 1 or ga < 1 or train != micro * ga * dp:
        m.fail(f"train_batch_size {train} != train_micro_batch_size_per_gpu {micro} x gradient_accumulation_steps "
               f"{ga} x data-parallel size {dp}")
    m.set("global_batch_size", int(train), "train_batch_size")
    m.set("micro_batch_size", int(micro), "train_micro_batch_size_per_gpu")


def _precision(m: _Merger, ds: dict) -> None:
    a = m.args
    bf16 = ds.get("bf16", ds.get("bfloat16", {}))
    fp16 = ds.get("fp16", {})
    m.only_known(bf16, {"enabled"}, "bf16.")
    m.only_known(fp16, {"enabled", "auto_cast", "loss_scale", "initial_scale_power", "loss_scale_window",
                        "hysteresis", "consecutive_hysteresis", "min_loss_scale", "fp16_master_weights_and_grads"},
                 "fp16.")
    for name, section in (("bf16", bf16), ("fp16", fp16)):
        enabled = bool(section.get("enabled", False))
        if name in m.explicit and getattr(a, name) and not enabled:
            m.fail(f"--{name} on the command line but {name}.enabled is not true in the config")
        if enabled:
            setattr(a, name, True)
    # Megatron's --loss-scale belongs to Megatron's optimizer, which DeepSpeed replaces.
    a.loss_scale_not_used = a.loss_scale
    a.loss_scale = None
    if not fp16.get("enabled", False):
        return
    for key in ("auto_cast", "consecutive_hysteresis", "fp16_master_weights_and_grads"):
        if fp16.get(key, False):
            m.fail(f"fp16.{key} = true is not supported here")
    if fp16.get("loss_scale", 0):
        a.loss_scale = float(fp16["loss_scale"])  # static
    a.initial_loss_scale = 2.0 ** fp16.get("initial_scale_power", 16)
    a.loss_scale_window = int(fp16.get("loss_scale_window", 1000))
    a.hysteresis = int(fp16.get("hysteresis", 2))
    a.min_loss_scale = float(fp16.get("min_loss_scale", 1.0))


def _zero(m: _Merger, zero: dict) -> None:
    m.only_known(zero, {"stage", "reduce_bucket_size", "stage3_max_live_parameters", "offload_optimizer",
                        "offload_param"} | ZERO_NO_OP_KEYS,
                 "zero_optimization.")
    for key in ("offload_optimizer", "offload_param"):
        device = zero.get(key, {}).get("device", "none") if isinstance(zero.get(key), dict) else "none"
        if key in zero and device not in ("none", None):
            m.fail(f"zero_optimization.{key} (device {device!r}): CPU/NVMe offload is not supported here; remove it")
    if zero.get("cpu_offload"):
        m.fail("zero_optimization.cpu_offload: CPU offload is not supported here; remove it")
    if zero.get("load_from_fp32_weights", True) is not True:
        m.fail("zero_optimization.load_from_fp32_weights = false: resume always restores the fp32 master weights")
    if "stage" in zero:
        m.set("zero_stage", int(zero["stage"]), "zero_optimization.stage")
    if "reduce_bucket_size" in zero:
        m.set("ddp_bucket_size", int(zero["reduce_bucket_size"]), "zero_optimization.reduce_bucket_size")
    if "stage3_max_live_parameters" in zero:
        m.set("zero3_max_live_parameters", int(zero["stage3_max_live_parameters"]),
              "zero_optimization.stage3_max_live_parameters")


def _optimizer(m: _Merger, opt: dict) -> None:
    m.only_known(opt, {"type", "params"}, "optimizer.")
    kind = str(opt.get("type", "")).lower()
    params = dict(opt.get("params", {}))
    if kind in ("adam", "adamw"):
        m.only_known(params, {"lr", "betas", "eps", "weight_decay", "adam_w_mode", "torch_adam", "fused",
                              "bias_correction", "amsgrad"}, "optimizer.params.")
        if kind == "adam" and params.get("adam_w_mode", True) is not True:
            m.fail("optimizer.params.adam_w_mode = false (Adam with L2 regularisation) is not supported: "
                   "Adam here decouples weight decay (AdamW), as DeepSpeed's default")
        if params.get("bias_correction", True) is not True or params.get("amsgrad", False):
            m.fail("optimizer.params: only bias_correction = true and amsgrad = false are supported")
        betas = params.get("betas", (0.9, 0.999))
        m.set("optimizer", "adam", "optimizer.type")
        m.set("adam_beta1", float(betas[0]), "optimizer.params.betas[0]")
        m.set("adam_beta2", float(betas[1]), "optimizer.params.betas[1]")
        m.set("adam_eps", float(params.get("eps", 1e-8)), "optimizer.params.eps")
    elif kind == "sgd":
        m.only_known(params, {"lr", "momentum", "weight_decay", "dampening", "nesterov"}, "optimizer.params.")
        if params.get("dampening", 0) or params.get("nesterov", False):
            m.fail("optimizer.params: SGD supports only dampening = 0 and nesterov = false here")
        m.set("optimizer", "sgd", "optimizer.type")
        m.set("sgd_momentum", float(params.get("momentum", 0.0)), "optimizer.params.momentum")
    else:
        m.fail(f"optimizer.type {opt.get('type')!r} is not supported here (Adam, AdamW or SGD)")
    if "lr" in params:
        m.set("lr", float(params["lr"]), "optimizer.params.lr")
    m.set("weight_decay", float(params.get("weight_decay", 0.0)), "optimizer.params.weight_decay")


def _scheduler(m: _Merger, sched: dict) -> dict:
    """The scheduler as {"type", "params"} with DeepSpeed's defaults filled in."""
    m.only_known(sched, {"type", "params"}, "scheduler.")
    kind = sched.get("type")
    if kind not in SCHEDULER_DEFAULTS:
        m.fail(f"scheduler.type {kind!r} is not supported here ({', '.join(SCHEDULER_DEFAULTS)})")
    given = dict(sched.get("params", {}))
    m.only_known(given, set(SCHEDULER_DEFAULTS[kind]), "scheduler.params.")
    params = {**SCHEDULER_DEFAULTS[kind], **given}
    if "total_num_steps" in params and params["total_num_steps"] is None:
        m.fail(f"scheduler {kind} needs params.total_num_steps")
    if not isinstance(params["warmup_num_steps"], int) or params["warmup_num_steps"] <= 0:
        m.fail(f"scheduler.params.warmup_num_steps must be a positive integer, got {params['warmup_num_steps']!r}")
    if params["warmup_type"] not in ("log", "linear"):
        m.fail(f"scheduler.params.warmup_type must be 'log' or 'linear', got {params['warmup_type']!r}")
    typed = [MEGATRON_SCHEDULE_FLAGS[d] for d in MEGATRON_SCHEDULE_FLAGS if d in m.explicit]
    if typed:
        m.fail(f"scheduler {kind} replaces Megatron's LR schedule, so {', '.join(typed)} would be ignored: "
               f"drop them or the scheduler section")
    return {"type": kind, "params": params}
