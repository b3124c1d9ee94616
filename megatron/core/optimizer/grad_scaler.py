"""Loss scaling for fp16: dynamic with hysteresis (Megatron's ``DynamicGradScaler``), or a
static ``--loss-scale``. bf16 and fp32 train unscaled."""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass


@dataclass
class LossScaler:
    """A constant scale of 1 for fp32/bf16; dynamic (or static ``--loss-scale``) for fp16."""

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


def loss_scaler_from_args(args: argparse.Namespace) -> LossScaler:
    """Megatron's choice: fp16 with ``--loss-scale S`` is static, otherwise dynamic from
    ``--initial-loss-scale`` (window, hysteresis and floor from their flags)."""
    if not args.fp16:
        return LossScaler()
    if args.loss_scale is not None:
        return LossScaler(scale=args.loss_scale, dynamic=False)
    return LossScaler(scale=args.initial_loss_scale, dynamic=True, growth_interval=args.loss_scale_window,
                      hysteresis=args.hysteresis, min_scale=args.min_loss_scale,
                      hysteresis_tracker=args.hysteresis)


def resume_loss_scaler(scaler: LossScaler, saved: dict, saved_precision: str, args: argparse.Namespace) -> str:
    """Continue the saved scaler only where it means something: fp16 -> fp16 with dynamic
    scaling on both sides. bf16/fp32 checkpoints carry a scale of 1 that must not reach an
    fp16 run. The window, hysteresis and floor always come from this run's flags.
    Returns what was done, for the log."""
    if not args.fp16:
        return "not used (no fp16)"
    if not scaler.dynamic:
        return f"static --loss-scale {scaler.scale:g}"
    if saved_precision != "float16" or not saved.get("dynamic", False):
        return (f"dynamic from --initial-loss-scale {scaler.scale:g} (the checkpoint was {saved_precision}"
                f"{'' if saved_precision != 'float16' else ' with a static scale'})")
    scaler.scale = float(saved["scale"])
    scaler.growth_tracker = int(saved["growth_tracker"])
    scaler.hysteresis_tracker = min(int(saved["hysteresis_tracker"]), scaler.hysteresis)
    return f"continued from the checkpoint (scale {scaler.scale:g})"
