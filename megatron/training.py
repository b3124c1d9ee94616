"""The training loop; it reads like the data flow of DESIGN §2.

args -> Topology -> model (this rank's stage) -> optimizer (fragments) -> resume ->
loop (global sample order from consumed samples) -> save.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial

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
from megatron.data.prefetch import Prefetcher
from megatron.deepspeed_lr import DeepSpeedLRSchedule
from megatron.flops import training_flops_per_iteration
from megatron.metrics_writer import MetricsWriter
from megatron.initialize import initialize_distributed, set_random_seeds
from megatron.model.config import ModelConfig
from megatron.model.gpt import GPTModel
from megatron.model.recompute import recompute_from_args


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
        rotary_base=args.rotary_base, embed_layernorm=args.embed_layernorm, openai_gelu=args.openai_gelu, tie_embeddings=not args.untie_embeddings_and_output_weights,
        add_bias_linear=not args.disable_bias_linear, layernorm_epsilon=args.layernorm_epsilon,
        init_method_std=args.init_method_std, hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)


def build_loss_scaler(args: argparse.Namespace) -> LossScaler:
    """Static when a loss scale is given (Megatron's --loss-scale, or a DeepSpeed fp16
    loss_scale > 0), dynamic for fp16 otherwise, none (1.0) for bf16 / fp32."""
    min_scale = getattr(args, "min_loss_scale", 1.0)
    if args.loss_scale is not None:
        return LossScaler(scale=args.loss_scale, dynamic=False, min_scale=min_scale)
    return LossScaler(scale=args.initial_loss_scale if args.fp16 else 1.0, dynamic=args.fp16,
                      growth_interval=args.loss_scale_window, hysteresis=args.hysteresis,
                      hysteresis_tracker=args.hysteresis, min_scale=min_scale)


def build_lr_schedule(args: argparse.Namespace) -> LRSchedule | DeepSpeedLRSchedule:
    """The DeepSpeed config's scheduler when it has one (DeepSpeed prefers it too), else Megatron's."""
    ds = getattr(args, "ds_scheduler", None)
    if ds is not None:
        return DeepSpeedLRSchedule(ds["type"], ds["params"], args.lr)
    return LRSchedule(args.lr, args.min_lr, args.lr_warmup_iters, args.lr_decay_iters, args.lr_decay_style)


class Trainer:
    """Owns the objects of one run and the loop over iterations."""

    def __init__(self, args: argparse.Namespace, rank: int, world: int, device: torch.device) -> None:
        self.args, self.device, self.rank, self.world = args, device, rank, world
        self.topo = Topology(ParallelDims(world, args.tensor_model_parallel_size,
                                          args.pipeline_model_parallel_size), rank)
        set_random_seeds(args.seed + 100 * self.topo.pp_rank)
        self.datasets, vocab_size = build_datasets(args)
        self.cfg = model_config_from_args(args, vocab_size)
        self.model = GPTModel(self.cfg, self.topo, args.seed).to(device)
        self.model.set_recompute(recompute_from_args(args, zero3=args.zero_stage == 3))
        self.dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
        self.scaler = build_loss_scaler(args)
        adam = AdamConfig(lr=args.lr, weight_decay=args.weight_decay, beta1=args.adam_beta1,
                          beta2=args.adam_beta2, eps=args.adam_eps, clip_grad=args.clip_grad,
                          bucket_numel=args.ddp_bucket_size, optimizer=args.optimizer,
                          sgd_momentum=args.sgd_momentum)
        # The optimizer copies the fp32 canonical init before the model is cast down.
        self.optimizer = DistributedOptimizer(list(self.model.named_parameters()), self.topo, args.zero_stage,
                                              adam, self.scaler)
        self.model.to(self.dtype)
        if args.zero_stage == 3:  # keep only this rank's shard of each parameter from here on
            partition_parameters(self.model, self.topo, self.optimizer.fragments())
        self.schedule = build_lr_schedule(args)
        self.state = TrainState()
        self.loaded: checkpointing.Loaded | None = None  # what _resume read, for logs and benchmarks
        self.writer = MetricsWriter(args, rank)
        if args.save:
            checkpointing.check_save_folder(args.save)
        self.prefetcher = Prefetcher(partial(micro_batches, self.datasets[0], global_batch=args.global_batch_size,
                                             micro=args.micro_batch_size, topo=self.topo, device=device),
                                     args.global_batch_size, enabled=args.num_workers > 0)
        self.flops_per_iteration = training_flops_per_iteration(self.cfg, args.global_batch_size,
                                                                self.model.padded_vocab)
        if args.load:
            self._resume()

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

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
            "optimizer": a.optimizer,
        }

    def save(self) -> None:
        path = checkpointing.save_checkpoint(self.args.save, self._global_state(), self.model, self.optimizer,
                                             self.topo)
        self.log(f"saved checkpoint at iteration {self.state.iteration} to {path}")

    def _resume(self) -> None:
        a = self.args
        self.loaded = loaded = checkpointing.load_checkpoint(a.load, self.model, self.optimizer, self.topo,
                                               universal=a.universal_checkpoint, tag=a.load_tag,
                                               load_optimizer=not a.no_load_optim, load_rng=not a.no_load_rng,
                                               validate=self._validate_checkpoint,
                                               start_fresh=self._start_fresh_policy())
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
        saved_optimizer = saved.get("optimizer", "adam")
        if saved_optimizer != self.args.optimizer and not self.args.no_load_optim:
            raise checkpointing.CheckpointError(
                f"checkpoint under {self.args.load} holds {saved_optimizer} optimizer state, this run uses "
                f"--optimizer {self.args.optimizer}; use the same optimizer or pass --no-load-optim")
        imported = saved["global_batch_size"] is None  # weights imported from another tool: no batch size yet
        if not imported and saved["global_batch_size"] != self.args.global_batch_size \
                and not self.args.override_global_batch_size:
            raise checkpointing.CheckpointError(
                f"checkpoint under {self.args.load} was trained with global batch size {saved['global_batch_size']}, "
                f"this run uses {self.args.global_batch_size}; pass --override-global-batch-size to continue anyway")

    # --- the loop ----------------------------------------------------------------------

    def train_step(self) -> tuple[float, float, bool]:
        a = self.args
        batches = self.prefetcher.get(self.state.consumed_samples)
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

    def _log_iteration(self, it: int, seconds: float, lr: float, loss: float, grad_norm: float, ok: bool) -> None:
        """Megatron's iteration line, with throughput per rank (model FLOPs, see megatron/flops.py)."""
        a, world = self.args, self.world
        tokens = a.global_batch_size * a.seq_length
        self.log(f" iteration {it:8d}/{a.train_iters:8d} | consumed samples: {self.state.consumed_samples:10d}"
                 f" | elapsed time per iteration (ms): {1000 * seconds:.1f}"
                 f" | learning rate: {lr:.3E} | global batch size: {a.global_batch_size:5d}"
                 f" | lm loss: {loss:.6E} | loss scale: {self.scaler.scale:.1f}"
                 f" | grad norm: {grad_norm:.3f} | skipped: {int(not ok)}"
                 f" | tokens per second: {tokens / seconds:.1f}"
                 f" | tokens per second per rank: {tokens / seconds / world:.1f}"
                 f" | TFLOP/s per rank: {self.flops_per_iteration / seconds / world / 1e12:.3f}")

    def train(self) -> TrainState:
        a = self.args
        tokens_per_iter = a.global_batch_size * a.seq_length
        if getattr(a, "loss_scale_not_used", None) is not None:
            self.log(f"note: --loss-scale {a.loss_scale_not_used:g} is not used: with a DeepSpeed config its fp16 "
                     f"section governs loss scaling (bf16 and fp32 are not scaled), as in Megatron-DeepSpeed")
        self.log(f"training {self.cfg.num_layers}-layer model on {self.topo.describe()} with ZeRO stage "
                 f"{a.zero_stage}, {self.dtype}, from iteration {self.state.iteration} to {a.train_iters}")
        resumed_into_same_folder = bool(a.load and a.save) and os.path.realpath(a.load) == os.path.realpath(a.save)
        saved_at = self.state.iteration if resumed_into_same_folder else -1
        window_start, window_iters = time.perf_counter(), 0
        while self.state.iteration < a.train_iters:
            step_start = time.perf_counter()
            loss, grad_norm, ok = self.train_step()
            self.state.iteration += 1
            self.state.consumed_samples += a.global_batch_size
            self.state.consumed_tokens += tokens_per_iter
            self.state.losses.append(loss)
            window_iters += 1
            it = self.state.iteration
            lr = self.schedule.lr(self.schedule.num_steps)
            if it % a.log_interval == 0 or it == a.train_iters:
                elapsed = time.perf_counter() - window_start
                self._log_iteration(it, elapsed / window_iters, lr, loss, grad_norm, ok)
                window_start, window_iters = time.perf_counter(), 0
            self.writer.training(it, self.state.consumed_samples, self.state.consumed_tokens, {
                "lm loss": loss, "learning rate": lr, "batch size": a.global_batch_size,
                "loss scale": self.scaler.scale, "grad norm": grad_norm, "world size": self.world,
                "iteration time": time.perf_counter() - step_start})
            if a.eval_interval and it % a.eval_interval == 0 and self.datasets[1] is not None:
                val = self.evaluate()
                self.log(f" validation loss at iteration {it} | lm loss value: {val:.6E}")
                self.writer.validation(it, self.state.consumed_samples, self.state.consumed_tokens, val)
            if a.save and a.save_interval and it % a.save_interval == 0:
                self.save()
                saved_at = it
            if a.exit_interval and it % a.exit_interval == 0:
                break
        if a.save and saved_at != self.state.iteration:
            self.save()
        self.writer.close()
        self.prefetcher.close()
        return self.state


def build_trainer(argv: list[str] | None = None) -> Trainer:
    """Parse flags, join the process group torchrun (or a test) set up, build the run."""
    from megatron.arguments import parse_args

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
    args = parse_args(argv, world)
    rank, world, device = initialize_distributed(args.distributed_backend, args.device, args.local_rank)
    return Trainer(args, rank, world, device)


def pretrain(argv: list[str] | None = None) -> TrainState:
    """Entry point of ``pretrain_gpt.py``: build the run and train."""
    state = build_trainer(argv).train()
    comm.barrier()
    return state


_LATE_RANK_REPORT_S = 3.0


def main(argv: list[str]) -> int:
    """``pretrain`` for the command line. An error in the configuration (flags, DeepSpeed
    config, layout, data files) found while building the run is one line on stderr, printed
    by rank 0 only (every rank exits 2); ``--debug`` shows the traceback instead."""
    try:
        trainer = build_trainer(argv)
    except ValueError as exc:
        if "--debug" in argv:
            raise
        rank = int(os.environ.get("RANK", "0"))
        if rank != 0:
            # Rank 0 usually meets the same error and reports it; the launcher stops the other
            # ranks when it exits. A rank whose error rank 0 did not share still says so.
            time.sleep(_LATE_RANK_REPORT_S)
        print(f"error: {exc}" if rank == 0 else f"error (rank {rank}): {exc}", file=sys.stderr, flush=True)
        return 2
    trainer.train()
    comm.barrier()
    return 0
