"""Learning-rate schedule: linear warmup, then linear or cosine decay to ``min_lr``."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class LRSchedule:
    max_lr: float
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay_steps: int = 0
    decay_style: str = "linear"  # constant | linear | cosine
    num_steps: int = 0

    def __post_init__(self) -> None:
        if self.decay_style not in ("constant", "linear", "cosine"):
            raise ValueError(f"--lr-decay-style must be constant, linear or cosine, got {self.decay_style!r}")
        if self.min_lr > self.max_lr:
            raise ValueError(f"--min-lr {self.min_lr} is larger than --lr {self.max_lr}")

    def lr(self, step: int | None = None) -> float:
        """The learning rate of optimizer step ``step`` (1-based; defaults to the next one)."""
        step = self.num_steps + 1 if step is None else step
        if self.warmup_steps and step <= self.warmup_steps:
            return self.max_lr * step / self.warmup_steps
        if self.decay_style == "constant" or self.decay_steps <= self.warmup_steps:
            return self.max_lr
        if step > self.decay_steps:
            return self.min_lr
        ratio = (step - self.warmup_steps) / (self.decay_steps - self.warmup_steps)
        if self.decay_style == "linear":
            coeff = 1.0 - ratio
        else:
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def step(self) -> None:
        self.num_steps += 1

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        """Resume: the step count continues; the schedule's shape comes from the current flags."""
        self.num_steps = int(state["num_steps"])
