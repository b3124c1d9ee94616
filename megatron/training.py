"""The training loop; it reads like the data flow of DESIGN §2.

args -> Topology -> model (this rank's stage) -> optimizer (fragments) -> resume ->
loop (global sample order from consumed samples) -> save.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from megatron import checkpointing
from megatron.core import comm
from megatron.core.optimizer.distributed_optimizer import AdamConfig, DistributedOptimizer
from megatron.core.optimizer.grad_scaler import LossScaler
from megatron.core.optimizer.lr_scheduler import LRSchedule
from megatron.core.optimizer.zero3 import partition_parameters
from megatron.core.parallel_state import ParallelDims, Topology
from megatron.core.schedules import forward_backward, micro_batches
from megatron.data.build import build_datasets
from megatron.initialize import initialize_distributed, set_random_seeds
from megatron.model.config import ModelConfig
from megatron.model.gpt import GPTModel


@dataclass
class TrainState:
    """Progress that must survive a resume on any layout."""

    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    losses: list[float] = field(default_factory=list)


def model_config_from_args(args: argparse.Namespace, vocab_size: int) -> ModelConfig:
    return ModelConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        vocab_size=vocab_size, seq_length=args.seq_length, ffn_hidden_size=args.ffn_hidden_size,
        num_key_value_heads=args.num_key_value_heads, max_position_embeddings=args.max_position_embeddings,
        normalization=args.normalization, swiglu=args.swiglu, position_embedding_type=args.position_embedding_type,
        rotary_base=args.rotary_base, tie_embeddings=not args.untie_embeddings_and_output_weights,
        add_bias_linear=not args.disable_bias_linear, layernorm_epsilon=args.layernorm_epsilon,
        init_method_std=args.init_method_std, hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)


class Trainer:
    """Owns the objects of one run and the loop over iterations."""

    def __init__(self, args: argparse.Namespace, rank: int, world: int, device: torch.device) -> None:
        self.args, self.device, self.rank = args, device, rank
        self.topo = Topology(ParallelDims(world, args.tensor_model_parallel_size,
                                          args.pipeline_model_parallel_size), rank)
        set_random_seeds(args.seed + 100 * self.topo.pp_rank)
        self.datasets, vocab_size = build_datasets(args)
        self.cfg = model_config_from_args(args, vocab_size)
        self.model = GPTModel(self.cfg, self.topo, args.seed).to(device)
        self.dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
        self.scaler = LossScaler(scale=args.initial_loss_scale if args.fp16 else 1.0, dynamic=args.fp16,
                                 growth_interval=args.loss_scale_window, hysteresis=args.hysteresis,
                                 hysteresis_tracker=args.hysteresis)
        adam = AdamConfig(lr=args.lr, weight_decay=args.weight_decay, beta1=args.adam_beta1,
                          beta2=args.adam_beta2, eps=args.adam_eps, clip_grad=args.clip_grad,
                          bucket_numel=args.ddp_bucket_size)
        # The optimizer copies the fp32 canonical init before the model is cast down.
        self.optimizer = DistributedOptimizer(list(self.model.named_parameters()), self.topo, args.zero_stage,
                                              adam, self.scaler)
        self.model.to(self.dtype)
        if args.zero_stage == 3:  # keep only this rank's shard of each parameter from here on
            partition_parameters(self.model, self.topo, self.optimizer.fragments())
        self.schedule = LRSchedule(args.lr, args.min_lr, args.lr_warmup_iters, args.lr_decay_iters,
                                   args.lr_decay_style)
        self.state = TrainState()
        self.loaded: checkpointing.Loaded | None = None  # what _resume read, for logs and benchmarks
        self.writer = self._tensorboard()
        if args.save:
            self._claim_save_folder()
        if args.load:
            self._resume()

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    def _tensorboard(self):
        if not self.args.tensorboard_dir or self.rank != 0:
            return None
        from torch.utils.tensorboard import SummaryWriter
        os.makedirs(self.args.tensorboard_dir, exist_ok=True)
        return SummaryWriter(self.args.tensorboard_dir)

    def _write_metrics(self, iteration: int, scalars: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, iteration)
        self.writer.flush()
        with open(os.path.join(self.args.tensorboard_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"iteration": iteration, **scalars}) + "\n")

    # --- checkpoints -------------------------------------------------------------------

    def _global_state(self) -> dict:
        a = self.args
        return {
            "iteration": self.state.iteration, "consumed_samples": self.state.consumed_samples,
            "consumed_tokens": self.state.consumed_tokens, "model_config": self.cfg.to_json(),
            "lr_schedule": self.schedule.state_dict(), "loss_scaler": self.scaler.state_dict(),
            "optimizer_step": self.optimizer.step_count, "seed": a.seed,
            "tokenizer": {"type": "mock" if a.mock_data else a.tokenizer_type, "vocab_size": self.cfg.vocab_size,
                          "padded_vocab_size": self.model.padded_vocab},
            "global_batch_size": a.global_batch_size, "micro_batch_size": a.micro_batch_size,
            "zero_stage": a.zero_stage, "precision": str(self.dtype).replace("torch.", ""),
        }

    def _claim_save_folder(self) -> None:
        """Refuse an unusable --save folder, or one another job saves into, before any training."""
        error = None
        if self.rank == 0:
            try:
                checkpointing.check_save_folder(self.args.save)
                checkpointing.acquire_folder_lock(self.args.save)
            except (OSError, checkpointing.CheckpointError) as e:
                error = checkpointing.as_checkpoint_error(e, f"--save {self.args.save}")
        checkpointing.raise_if_any_failed(error)

    def save(self) -> None:
        path = checkpointing.save_checkpoint(self.args.save, self._global_state(), self.model, self.optimizer,
                                             self.topo, keep_last_k=self.args.keep_last_k)
        self.log(f"saved checkpoint at iteration {self.state.iteration} to {path}")

    def _resume(self) -> None:
        a = self.args
        loaded, error = None, None
        try:
            loaded = checkpointing.load_checkpoint(a.load, self.model, self.optimizer, self.topo,
                                                   universal=a.universal_checkpoint, tag=a.load_tag,
                                                   load_optimizer=not a.no_load_optim, load_rng=not a.no_load_rng,
                                                   validate=self._validate_checkpoint,
                                                   start_fresh=self._start_fresh_policy())
        except (OSError, checkpointing.CheckpointError) as e:
            error = checkpointing.as_checkpoint_error(e, f"loading {a.load}")
        checkpointing.raise_if_any_failed(error)  # every rank stops with the same one-line message
        self.loaded = loaded
        if loaded is None:
            self.log(f"no checkpoint found under {a.load}: starting from scratch")
            return
        g = loaded.state
        self.state.iteration = g["iteration"]
        self.state.consumed_samples = g["consumed_samples"]
        self.state.consumed_tokens = g["consumed_tokens"]
        self.schedule.load_state_dict(g["lr_schedule"])
        if not a.no_load_optim:
            self.scaler.load_state_dict(g["loss_scaler"])
            self.optimizer.step_count = g["optimizer_step"]
        if not loaded.rng_restored:
            set_random_seeds(a.seed + 100 * self.topo.pp_rank + 7919 * self.state.iteration)
        self.log(f"resumed from {loaded.path} ({loaded.kind}) at iteration {self.state.iteration}, "
                 f"consumed samples {self.state.consumed_samples}; RNG "
                 f"{'restored exactly (same layout)' if loaded.rng_restored else 're-derived from the seed (layout changed)'}")

    def _start_fresh_policy(self) -> str:
        """A missing checkpoint starts a new run only where the user plainly meant one (see ``locate``)."""
        a = self.args
        if a.exit_on_missing_checkpoint:
            return checkpointing.NEVER
        if a.allow_missing_checkpoint:
            return checkpointing.ALWAYS
        same = bool(a.save) and os.path.realpath(a.load) == os.path.realpath(a.save)
        return checkpointing.IF_NEW if same else checkpointing.NEVER

    def _validate_checkpoint(self, saved: dict) -> None:
        """Refuse a checkpoint of another model shape or (unless asked) another global batch size."""
        difference = self.cfg.first_shape_difference(ModelConfig.from_json(saved["model_config"]))
        if difference:
            raise checkpointing.CheckpointError(f"checkpoint under {self.args.load} is of another model shape: "
                                                f"{difference}")
        if saved["global_batch_size"] != self.args.global_batch_size and not self.args.override_global_batch_size:
            raise checkpointing.CheckpointError(
                f"checkpoint under {self.args.load} was trained with global batch size {saved['global_batch_size']}, "
                f"this run uses {self.args.global_batch_size}; pass --override-global-batch-size to continue anyway")

    # --- the loop ----------------------------------------------------------------------

    def train_step(self) -> tuple[float, float, bool]:
        a = self.args
        batches = micro_batches(self.datasets[0], self.state.consumed_samples, a.global_batch_size,
                                a.micro_batch_size, self.topo, self.device)
        self.optimizer.zero_grad()
        self.model.train()
        denom = a.global_batch_size * a.seq_length
        loss_sum = forward_backward(self.model, batches, self.topo, self.scaler.scale, denom, self.device)
        ok, grad_norm = self.optimizer.step(self.schedule.lr())
        if ok:
            self.schedule.step()
        return float(loss_sum), grad_norm, ok

    @torch.no_grad()
    def evaluate(self) -> float:
        a = self.args
        valid = self.datasets[1]
        self.model.eval()
        total = torch.zeros(1, device=self.device)
        for i in range(a.eval_iters):
            batches = micro_batches(valid, i * a.global_batch_size, a.global_batch_size, a.micro_batch_size,
                                    self.topo, self.device)
            total += forward_backward(self.model, batches, self.topo, 1.0, a.global_batch_size * a.seq_length,
                                      self.device, backward=False)
        return float(total) / a.eval_iters

    def train(self) -> TrainState:
        a = self.args
        tokens_per_iter = a.global_batch_size * a.seq_length
        self.log(f"training {self.cfg.num_layers}-layer model on {self.topo.describe()} with ZeRO stage "
                 f"{a.zero_stage}, {self.dtype}, from iteration {self.state.iteration} to {a.train_iters}")
        resumed_into_same_folder = bool(a.load and a.save) and os.path.realpath(a.load) == os.path.realpath(a.save)
        saved_at = self.state.iteration if resumed_into_same_folder else -1
        window_start, window_iters = time.perf_counter(), 0
        while self.state.iteration < a.train_iters:
            loss, grad_norm, ok = self.train_step()
            self.state.iteration += 1
            self.state.consumed_samples += a.global_batch_size
            self.state.consumed_tokens += tokens_per_iter
            self.state.losses.append(loss)
            window_iters += 1
            it = self.state.iteration
            if it % a.log_interval == 0 or it == a.train_iters:
                elapsed = time.perf_counter() - window_start
                lr = self.schedule.lr(self.schedule.num_steps)
                self.log(f" iteration {it:8d}/{a.train_iters:8d} | consumed samples: {self.state.consumed_samples:10d}"
                         f" | elapsed time per iteration (ms): {1000 * elapsed / window_iters:.1f}"
                         f" | learning rate: {lr:.3E} | global batch size: {a.global_batch_size:5d}"
                         f" | lm loss: {loss:.6E} | loss scale: {self.scaler.scale:.1f}"
                         f" | grad norm: {grad_norm:.3f} | skipped: {int(not ok)}"
                         f" | tokens per second: {tokens_per_iter * window_iters / elapsed:.1f}")
                window_start, window_iters = time.perf_counter(), 0
            self._write_metrics(it, {"lm-loss-training/lm loss": loss, "learning-rate/learning-rate":
                                     self.schedule.lr(self.schedule.num_steps), "grad-norm/grad-norm": grad_norm,
                                     "loss-scale/loss-scale": self.scaler.scale})
            if a.eval_interval and it % a.eval_interval == 0 and self.datasets[1] is not None:
                val = self.evaluate()
                self.log(f" validation loss at iteration {it} | lm loss value: {val:.6E}")
                self._write_metrics(it, {"lm-loss-validation/lm loss": val})
            if a.save and a.save_interval and it % a.save_interval == 0:
                self.save()
                saved_at = it
            if a.exit_interval and it % a.exit_interval == 0:
                break
        if a.save and saved_at != self.state.iteration:
            self.save()
        if self.writer is not None:
            self.writer.close()
        if a.save:
            checkpointing.release_folder_lock(a.save)
        return self.state


def build_trainer(argv: list[str] | None = None) -> Trainer:
    """Parse flags, join the process group torchrun (or a test) set up, build the run."""
    from megatron.arguments import parse_args

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
    args = parse_args(argv, world)
    rank, world, device = initialize_distributed(args.distributed_backend, args.device)
    return Trainer(args, rank, world, device)


def pretrain(argv: list[str] | None = None) -> TrainState:
    """Build the run and train (raises on bad flags or checkpoints; see ``main``)."""
    state = build_trainer(argv).train()
    comm.barrier()
    return state


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pretrain_gpt.py``: a checkpoint or flag error is one line on stderr, printed
    once per job (by rank 0; every rank holds the same message), exit status 2; ``--debug`` shows
    the traceback instead."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        pretrain(argv)
    except (checkpointing.CheckpointError, ValueError) as e:
        if "--debug" in argv:
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0
