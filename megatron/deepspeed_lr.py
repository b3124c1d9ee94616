"""DeepSpeed's LR schedulers (WarmupLR, WarmupDecayLR, WarmupCosineLR) with DeepSpeed's formulas.

Same interface as ``LRSchedule`` (``lr(step)``, ``step()``, ``num_steps``, state dicts), so
the training loop and checkpoints treat both alike. DeepSpeed's scheduler starts at
``last_batch_iteration = -1`` and is stepped after every applied optimizer step, so
optimizer step ``k`` (1-based) runs with ``last_batch_iteration = k - 2``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron.core.optimizer.lr_scheduler import SchedulerMismatch


@dataclass
class DeepSpeedLRSchedule:
    kind: str  # WarmupLR | WarmupDecayLR | WarmupCosineLR
    params: dict
    base_lr: float  # the optimizer's lr: WarmupLR's default max, WarmupCosineLR's reference
    base_weight_decay: float  # DeepSpeed's schedulers leave weight decay constant
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

    def weight_decay(self) -> float:
        return self.base_weight_decay

    def step(self, samples: int = 0, tokens: int = 0) -> None:
        """One applied optimizer step; DeepSpeed counts steps, not the ``samples`` or ``tokens``
        that Megatron's scheduler counts (taken for the same call)."""
        self.num_steps += 1

    def state_dict(self) -> dict:
        return {"kind": self.kind, "params": self.params, "base_lr": self.base_lr, "num_steps": self.num_steps,
                "last_batch_iteration": self.num_steps - 1}

    def load_state_dict(self, state: dict, policy: str = "strict") -> list[str]:
        """Resume: the step count continues. As with Megatron's scheduler, a schedule that differs
        from the checkpoint's is refused under ``strict``; ``checkpoint`` keeps the saved one."""
        saved = (state.get("kind"), state.get("params"))
        differences = [] if saved == (self.kind, self.params) else [
            f"scheduler: checkpoint {saved[0] or 'Megatron'} {saved[1] or ''}, command line {self.kind} {self.params}"]
        if differences and policy == "strict":
            raise SchedulerMismatch(differences[0] + "\npass --override-opt_param-scheduler to use the DeepSpeed "
                                    "config's scheduler, or --use-checkpoint-opt_param-scheduler to keep the saved one")
        if differences and policy == "checkpoint" and saved[0] is not None:
            self.kind, self.params = saved
        self.num_steps = int(state["num_steps"])
        return differences