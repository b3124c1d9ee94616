"""Megatron's ``OptimizerParamScheduler``: learning rate and weight decay as functions of
the number of samples trained (and, optionally, tokens).

Megatron-DeepSpeed counts the schedule in samples (``step(increment=global batch)``),
so a resume with another global batch size keeps its position. The LR an optimizer
step uses is the one computed *before* it: the first step runs at ``num_steps == 0``
(warmup starts at ``--lr-warmup-init``). Token budgets (``--lr-warmup-tokens``,
``--lr-decay-tokens``) replace the sample counts where given, as in Megatron-DeepSpeed.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, fields

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
WD_INCR_STYLES = ("constant", "linear", "cosine")


class SchedulerMismatch(ValueError):
    """The checkpoint's schedule differs from the command line's, and no flag says which wins."""


@dataclass(frozen=True)
class ScheduleShape:
    """What the flags say about the schedule; the checkpoint must agree on every field."""

    max_lr: float
    min_lr: float = 0.0
    init_lr: float = 0.0
    lr_warmup_steps: float = 0  # samples (a fraction of the decay may give a float, as upstream)
    lr_decay_steps: int = 1  # samples
    lr_decay_style: str = "linear"
    lr_warmup_tokens: int | None = None
    lr_decay_tokens: int | None = None
    start_wd: float = 0.01
    end_wd: float = 0.01
    wd_incr_steps: int = 1  # samples
    wd_incr_style: str = "constant"

    def __post_init__(self) -> None:
        if self.lr_decay_style not in DECAY_STYLES:
            raise ValueError(f"--lr-decay-style must be one of {', '.join(DECAY_STYLES)}, got {self.lr_decay_style!r}")
        if self.wd_incr_style not in WD_INCR_STYLES:
            raise ValueError(f"--weight-decay-incr-style must be one of {', '.join(WD_INCR_STYLES)}, "
                             f"got {self.wd_incr_style!r}")
        if not 0.0 <= self.min_lr <= self.max_lr:
            raise ValueError(f"--min-lr {self.min_lr} must lie in [0, --lr {self.max_lr}]")
        if self.lr_decay_steps <= 0:
            raise ValueError(f"the LR decay must last at least one sample, got {self.lr_decay_steps} "
                             f"(check --lr-decay-iters / --lr-decay-samples)")
        if self.lr_warmup_steps >= self.lr_decay_steps:
            raise ValueError(f"LR warmup ({self.lr_warmup_steps} samples) must end before the decay does "
                             f"({self.lr_decay_steps} samples)")
        if not 0.0 <= self.start_wd <= self.end_wd:
            raise ValueError(f"--start-weight-decay {self.start_wd} must lie in [0, --end-weight-decay {self.end_wd}]")
        if self.wd_incr_style == "constant" and self.start_wd != self.end_wd:
            raise ValueError(f"--weight-decay-incr-style constant needs --start-weight-decay ({self.start_wd}) "
                             f"equal to --end-weight-decay ({self.end_wd})")


class OptimizerParamScheduler:
    """LR and WD at ``num_steps`` samples and ``num_tokens`` tokens trained."""

    def __init__(self, shape: ScheduleShape) -> None:
        self.shape = shape
        self.num_steps = 0
        self.num_tokens = 0
        # Warmup by samples with decay by tokens: the decay starts at the tokens seen when
        # warmup ended (Megatron-DeepSpeed records them then).
        self.warmup_end_tokens: int | None = shape.lr_warmup_tokens

    def step(self, increment: int, num_tokens: int) -> None:
        """After a successful optimizer step of ``increment`` samples; ``num_tokens`` is the total so far."""
        self.num_steps += increment
        self.num_tokens = num_tokens
        s = self.shape
        if (s.lr_warmup_tokens is None and s.lr_decay_tokens is not None and s.lr_warmup_steps > 0
                and self.num_steps == s.lr_warmup_steps):
            self.warmup_end_tokens = self.num_tokens

    def lr(self) -> float:
        s = self.shape
        if s.lr_warmup_tokens is None:
            if s.lr_warmup_steps > 0 and self.num_steps <= s.lr_warmup_steps:
                return s.init_lr + (s.max_lr - s.init_lr) * self.num_steps / s.lr_warmup_steps
        elif s.lr_warmup_tokens > 0 and self.num_tokens <= s.lr_warmup_tokens:
            return s.init_lr + (s.max_lr - s.init_lr) * self.num_tokens / s.lr_warmup_tokens
        if s.lr_decay_style == "constant":
            return s.max_lr
        by_tokens = s.lr_decay_tokens is not None
        now, end = (self.num_tokens, s.lr_decay_tokens) if by_tokens else (self.num_steps, s.lr_decay_steps)
        if now > end:
            return s.min_lr
        warmup_tokens = self.warmup_end_tokens or 0
        if s.lr_decay_style == "inverse-square-root":
            warm = max(s.lr_warmup_steps if s.lr_warmup_tokens is None else s.lr_warmup_tokens, 1)
            at = max(self.num_steps if s.lr_warmup_tokens is None else self.num_tokens, 1)
            return max(s.min_lr, s.max_lr * math.sqrt(warm) / math.sqrt(at))
        start = warmup_tokens if by_tokens else s.lr_warmup_steps
        ratio = (now - start) / (end - start)
        coeff = 1.0 - ratio if s.lr_decay_style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return s.min_lr + coeff * (s.max_lr - s.min_lr)

    def weight_decay(self) -> float:
        s = self.shape
        if self.num_steps > s.wd_incr_steps or s.wd_incr_style == "constant":
            return s.end_wd
        ratio = self.num_steps / s.wd_incr_steps
        coeff = ratio if s.wd_incr_style == "linear" else 0.5 * (math.cos(math.pi * (1 - ratio)) + 1.0)
        return s.start_wd + coeff * (s.end_wd - s.start_wd)

    def state_dict(self) -> dict:
        return {**asdict(self.shape), "num_steps": self.num_steps, "num_tokens": self.num_tokens,
                "warmup_end_tokens": self.warmup_end_tokens}

    def load_state_dict(self, state: dict, policy: str = "strict") -> list[str]:
        """Continue from a saved schedule. ``policy``: ``strict`` (the shapes must agree),
        ``override`` (the command line wins) or ``checkpoint`` (the checkpoint wins).
        Returns the differences found, as readable lines, for the log."""
        saved = ScheduleShape(**{f.name: state[f.name] for f in fields(ScheduleShape)})
        differences = [f"{name}: checkpoint {getattr(saved, name)!r}, command line {getattr(self.shape, name)!r}"
                       for name in _effective_fields(saved, self.shape)
                       if getattr(saved, name) != getattr(self.shape, name)]
        if differences and policy == "strict":
            raise SchedulerMismatch(
                "the checkpoint's learning-rate / weight-decay schedule differs from the command line's:\n  "
                + "\n  ".join(differences)
                + "\npass --override-opt_param-scheduler to use the command line's values, or "
                  "--use-checkpoint-opt_param-scheduler to keep the checkpoint's (schedules count samples: "
                  "iteration-based flags change with --global-batch-size; give --train-samples, "
                  "--lr-decay-samples and --lr-warmup-samples to change the batch size freely)")
        if policy == "checkpoint" or not differences:  # keep the saved values that had no effect too
            self.shape = saved
        self.num_steps, self.num_tokens = int(state["num_steps"]), int(state["num_tokens"])
        given = self.shape.lr_warmup_tokens
        self.warmup_end_tokens = given if given is not None else state["warmup_end_tokens"]
        return differences


def _effective_fields(a: ScheduleShape, b: ScheduleShape) -> list[str]:
    """The fields to compare: all of them (as upstream), except the WD increment length when
    both keep the weight decay constant, where it changes nothing (--train-iters may grow)."""
    names = [f.name for f in fields(ScheduleShape)]
    if a.wd_incr_style == b.wd_incr_style == "constant":
        names.remove("wd_incr_steps")
    return names


def schedule_shape_from_args(args: argparse.Namespace) -> ScheduleShape:
    """Megatron's ``get_optimizer_param_scheduler``: iteration flags become samples at this
    run's global batch size; sample flags are taken as they are."""
    if args.train_iters is not None:
        # --train-iters 0 (save the initial weights) trains nothing: a one-sample schedule
        decay = max(1, (args.lr_decay_iters or args.train_iters) * args.global_batch_size)
        wd_steps = args.train_iters * args.global_batch_size
        warmup = args.lr_warmup_iters * args.global_batch_size
    else:
        decay = args.lr_decay_samples or args.train_samples
        wd_steps = args.train_samples
        warmup = args.lr_warmup_samples
    if args.lr_warmup_fraction is not None:
        warmup = args.lr_warmup_fraction * decay
    return ScheduleShape(max_lr=args.lr, min_lr=args.min_lr, init_lr=args.lr_warmup_init,
                         lr_warmup_steps=warmup, lr_decay_steps=decay, lr_decay_style=args.lr_decay_style,
                         lr_warmup_tokens=args.lr_warmup_tokens, lr_decay_tokens=args.lr_decay_tokens,
                         start_wd=args.start_weight_decay, end_wd=args.end_weight_decay, wd_incr_steps=wd_steps,
                         wd_incr_style=args.weight_decay_incr_style)


def scheduler_policy(args: argparse.Namespace) -> str:
    if args.override_opt_param_scheduler:
        return "override"
    return "checkpoint" if args.use_checkpoint_opt_param_scheduler else "strict"
