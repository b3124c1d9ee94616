"""Loss scaling for fp16: dynamic, with hysteresis (Megatron's defaults)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class LossScaler:
    """A constant scale of 1 for fp32/bf16; dynamic for fp16."""

    scale: float = 1.0
    dynamic: bool = False
    growth_interval: int = 1000
    hysteresis: int = 2
    min_scale: float = 1.0
    growth_tracker: int = 0
    hysteresis_tracker: int = 2

    def update(self, found_inf: bool) -> None:
        if not self.dynamic:
            return
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale / 2.0, self.min_scale)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.growth_tracker = 0
                self.hysteresis_tracker = self.hysteresis
                self.scale *= 2.0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
