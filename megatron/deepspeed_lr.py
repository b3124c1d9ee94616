"""DeepSpeed's LR schedulers (WarmupLR, WarmupDecayLR, WarmupCosineLR) with DeepSpeed's formulas.

Same interface as ``LRSchedule`` (``lr(step)``, ``step()``, ``num_steps``, state dicts), so
the training loop and checkpoints treat both alike. DeepSpeed's scheduler starts at
``last_batch_iteration = -1`` and is stepped after every applied optimizer step, so
optimizer step ``k`` (1-based) runs with ``last_batch_iteration = k - 2``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class DeepSpeedLRSchedule:
    kind: str  # WarmupLR | WarmupDecayLR | WarmupCosineLR
    params: dict
    base_lr: float  # the optimizer's lr: WarmupLR's default max, WarmupCosineLR's reference
    num_steps: int = 0
    _warmup: int = field(init=False)

    def __post_init__(self) -> None:
        self._warmup = max(2, int(self.params["warmup_num_steps"]))  # DeepSpeed clamps to 2

    def _warmup_gamma(self, it: int) -> float:
        if self.params["warmup_type"] == "log":
            return math.log(it + 1) / math.log(self._warmup)
        return it / self._warmup

    def lr(self, step: int | None = None) -> float:
        """The learning rate of optimizer step ``step`` (1-based; defaults to the next one)."""
        step = self.num_steps + 1 if step is None else step
        it = step - 2  # DeepSpeed's last_batch_iteration during that step
        p = self.params
        if self.kind == "WarmupCosineLR":
            return self.base_lr * self._cosine_ratio(it)
        low = p["warmup_min_lr"]
        high = p["warmup_max_lr"] if p["warmup_max_lr"] is not None else self.base_lr
        if it < 0:
            return low
        if it < self._warmup:
            gamma = self._warmup_gamma(it)
        elif self.kind == "WarmupLR":
            gamma = 1.0
        else:
            total = p["total_num_steps"]
            gamma = max(0.0, (total - it) / max(1.0, total - self._warmup))
        return low + (high - low) * gamma

    def _cosine_ratio(self, it: int) -> float:
        p = self.params
        if it < 0:
            return 0.0
        if it < self._warmup:
            return p["warmup_min_ratio"] + self._warmup_gamma(it) * (1.0 - p["warmup_min_ratio"])
        progress = min(1.0, (it - self._warmup + 1) / max(1, p["total_num_steps"] - self._warmup))
        ratio = (1 + math.cos(math.pi * progress)) / 2
        return max(0.0, p["cos_min_ratio"] + (1.0 - p["cos_min_ratio"]) * ratio)

    def step(self) -> None:
        self.num_steps += 1

    def state_dict(self) -> dict:
        return {"kind": self.kind, "params": self.params, "base_lr": self.base_lr, "num_steps": self.num_steps,
                "last_batch_iteration": self.num_steps - 1}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the step count continues; the schedule's shape comes from the current config."""
        self.num_steps = int(state["num_steps"])
