"""Megatron's ``--rampup-batch-size START INCREMENT SAMPLES``: the global batch size as a
pure function of consumed samples, so a resume on any layout picks up the same size."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchRampup:
    start: int
    increment: int
    samples: int
    final: int

    def __post_init__(self) -> None:
        diff = self.final - self.start
        if self.start <= 0 or self.increment <= 0 or self.samples < 0 or diff < 0 or diff % self.increment:
            raise ValueError(f"--rampup-batch-size {self.start} {self.increment} {self.samples}: needs "
                             f"0 < start <= --global-batch-size {self.final}, increment > 0 dividing "
                             f"{self.final} - start, and samples >= 0")

    def global_batch(self, consumed_samples: int) -> int:
        """Upstream's ``RampupBatchsizeNumMicroBatches.update``."""
        increments = (self.final - self.start) // self.increment
        if consumed_samples > self.samples or increments == 0:
            return self.final
        per_increment = self.samples / increments
        return self.start + int(consumed_samples / per_increment) * self.increment
