"""TensorBoard (and optional wandb) scalars with Megatron-DeepSpeed's tags and switches.

Tags are those upstream's ``training_log`` and ``evaluate_and_print_results`` write
(``lm-loss-training/lm loss``, ``learning-rate/learning-rate``, ``... vs samples`` against
consumed samples, ``... vs tokens`` against consumed tokens), behind the same
``--log-*-to-tensorboard`` flags. Iteration-indexed values also go to ``metrics.jsonl``,
which ``tools/compare_loss_curves.py`` reads as well.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch


class MetricsWriter:
    """Rank 0's writer; a no-op object on the other ranks or without --tensorboard-dir."""

    def __init__(self, args: argparse.Namespace, rank: int) -> None:
        self.args, self.tb, self.wandb = args, None, None
        if rank != 0:
            return
        if args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            os.makedirs(args.tensorboard_dir, exist_ok=True)
            self.tb = SummaryWriter(args.tensorboard_dir, max_queue=args.tensorboard_queue_size)
        if args.wandb_project:
            self.wandb = _start_wandb(args)

    def _scalar(self, tag: str, value: float, iteration: int, samples: int, tokens: int, jsonl: dict) -> None:
        """``tag`` against iterations, ``tag vs samples`` and ``tag vs tokens`` (as upstream)."""
        if self.tb is not None:
            self.tb.add_scalar(tag, value, iteration)
            self.tb.add_scalar(f"{tag} vs samples", value, samples)
            self.tb.add_scalar(f"{tag} vs tokens", value, tokens)
        jsonl[tag] = value

    def training(self, iteration: int, samples: int, tokens: int, values: dict[str, float]) -> None:
        """``values``: lm loss, learning rate, batch size, loss scale, grad norm, world size,
        iteration time (s); each written when its switch is on."""
        a = self.args
        if iteration % a.tensorboard_log_interval:
            return
        row: dict[str, float] = {}
        if self.tb is not None:
            self.tb.add_scalar("steps-vs-samples/y=steps,x=samples", iteration, samples)
            self.tb.add_scalar("steps-vs-samples/y=samples,x=steps", samples, iteration)
            self.tb.add_scalar("steps-vs-tokens/y=steps,x=tokens", iteration, tokens)
            self.tb.add_scalar("steps-vs-tokens/y=tokens,x=steps", tokens, iteration)
        scalar = lambda tag, value: self._scalar(tag, value, iteration, samples, tokens, row)  # noqa: E731
        if a.log_learning_rate_to_tensorboard:
            scalar("learning-rate/learning-rate", values["learning rate"])
        if a.log_batch_size_to_tensorboard:
            scalar("batch-size/batch-size", values["batch size"])
        scalar("lm-loss-training/lm loss", values["lm loss"])
        if a.log_loss_scale_to_tensorboard:
            scalar("loss-scale/loss-scale", values["loss scale"])
        if a.log_world_size_to_tensorboard:
            scalar("world-size/world-size", values["world size"])
        if math.isfinite(values["grad norm"]):
            scalar("grad-norm/grad-norm", values["grad norm"])
        for name, value in values.get("moe", {}).items():  # MoE: auxiliary losses, expert load per layer
            scalar(f"moe/{name}", value)
        for name, value in values.get("optimizer", {}).items():  # --log-optimizer-states-to-tensorboard
            scalar(f"optimizer/{name}", value)
        if a.log_timers_to_tensorboard:
            scalar("iteration-time/iteration-time", values["iteration time"])
        if a.log_memory_to_tensorboard and torch.cuda.is_available() and torch.cuda.is_initialized():
            stats = torch.cuda.memory_stats()
            for tag, key in (("mem-reserved-bytes", "reserved_bytes.all.current"),
                             ("mem-allocated-bytes", "allocated_bytes.all.current"),
                             ("mem-allocated-count", "allocation.all.current")):
                row[tag] = stats[key]
                if self.tb is not None:
                    self.tb.add_scalar(tag, stats[key], iteration)
        self._flush(iteration, row)

    def validation(self, iteration: int, samples: int, tokens: int, loss: float) -> None:
        row: dict[str, float] = {}
        self._scalar("lm-loss-validation/lm loss validation", loss, iteration, samples, tokens, row)
        if self.args.log_validation_ppl_to_tensorboard:
            ppl = math.exp(min(20.0, loss))  # upstream caps the exponent at 20
            self._scalar("lm-loss-validation/lm loss validation ppl", ppl, iteration, samples, tokens, row)
        self._flush(iteration, row)

    def _flush(self, iteration: int, row: dict[str, float]) -> None:
        if self.wandb is not None:
            self.wandb.log(row, step=iteration)
        if self.tb is None:
            return
        self.tb.flush()
        with open(os.path.join(self.args.tensorboard_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"iteration": iteration, **row}) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(args: argparse.Namespace):
    try:
        import wandb
    except ImportError:
        raise ValueError("--wandb-project needs the wandb package (pip install wandb)") from None
    return wandb.init(project=args.wandb_project, name=args.wandb_exp_name or None,
                      dir=args.wandb_save_dir or None, config=vars(args))
