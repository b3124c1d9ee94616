"""The training loop; it reads like the data flow of DESIGN §2.

args -> Topology -> model (this rank's stage) -> optimizer (fragments) -> resume ->
loop (global sample order from consumed samples) -> save.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial

import torch

from megatron import checkpointing
from megatron.core import comm
from megatron.core.optimizer.distributed_optimizer import AdamConfig, DistributedOptimizer, Precision
from megatron.core.batch_rampup import BatchRampup
from megatron.core.optimizer.grad_scaler import loss_scaler_from_args, resume_loss_scaler
from megatron.core.optimizer.lr_scheduler import (OptimizerParamScheduler, schedule_shape_from_args,
                                                  scheduler_policy)
from megatron.core.optimizer.zero3 import partition_parameters, placeholder_parameters
from megatron.core.parallel_state import ParallelDims, Topology
from megatron.core.documents import DocumentMasking
from megatron.core.schedules import forward_backward, loss_denominator, micro_batches
from megatron.core.tensor_parallel import parameters_on_meta
from megatron.arguments import planned_train_iters
from megatron.data.build import build_datasets
from megatron.data.prefetch import Prefetcher
from megatron.deepspeed_lr import DeepSpeedLRSchedule
from megatron.flops import training_flops_per_iteration
from megatron.metrics_writer import MetricsWriter
from megatron.data.identity import identity_differences, run_identity
from megatron.initialize import initialize_distributed, set_random_seeds, shutdown_distributed
from megatron.model.config import ModelConfig
from megatron.model.gpt import GPTModel
from megatron.model.moe_config import moe_config_from_args
from megatron.model.recompute import RecomputeConfig, recompute_from_args


@dataclass
class TrainState:
    """Progress that must survive a resume on any layout."""

    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    consumed_valid_samples: int = 0  # the validation set is walked forward, as in Megatron
    losses: list[float] = field(default_factory=list)
    moe_metrics: list[dict[str, float]] = field(default_factory=list)  # per iteration (MoE models)
    stop_reason: str | None = None  # why the loop ended before the last iteration, if it did


def model_config_from_args(args: argparse.Namespace, vocab_size: int) -> ModelConfig:
    return ModelConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        vocab_size=vocab_size, seq_length=args.seq_length, ffn_hidden_size=args.ffn_hidden_size,
        num_key_value_heads=args.num_key_value_heads, max_position_embeddings=args.max_position_embeddings,
        normalization=args.normalization, swiglu=args.swiglu, position_embedding_type=args.position_embedding_type,
        rotary_base=args.rotary_base, embed_layernorm=args.embed_layernorm, openai_gelu=args.openai_gelu, tie_embeddings=not args.untie_embeddings_and_output_weights,
        add_bias_linear=not args.disable_bias_linear, layernorm_epsilon=args.layernorm_epsilon,
        init_method_std=args.init_method_std, hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        moe=moe_config_from_args(args))


def build_lr_schedule(args: argparse.Namespace) -> OptimizerParamScheduler | DeepSpeedLRSchedule:
    """The DeepSpeed config's scheduler when it has one (DeepSpeed prefers it too), else Megatron's."""
    ds = getattr(args, "ds_scheduler", None)
    if ds is not None:
        return DeepSpeedLRSchedule(ds["type"], ds["params"], args.lr, args.weight_decay)
    return OptimizerParamScheduler(schedule_shape_from_args(args))


class Trainer:
    """Owns the objects of one run and the loop over iterations."""

    def __init__(self, args: argparse.Namespace, rank: int, world: int, device: torch.device) -> None:
        self.args, self.device, self.rank, self.world = args, device, rank, world
        self.topo = Topology(ParallelDims(world, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                          cp=args.context_parallel_size, sp=args.ds_sequence_parallel_size,
                                          ep=args.expert_model_parallel_size,
                                          etp=args.expert_tensor_parallel_size), rank)
        set_random_seeds(args.seed + 100 * self.topo.pp_rank)
        self.datasets, vocab_size, eod = build_datasets(args)
        self.documents = DocumentMasking(eod, args.reset_position_ids, args.reset_attention_mask, args.eod_mask_loss)
        self.cfg = model_config_from_args(args, vocab_size)
        self.moe_metrics: dict[str, float] = {}  # the last step's MoE losses and loads (MoEStats.summary)
        zero3 = args.zero_stage == 3
        with parameters_on_meta(zero3):  # ZeRO-3: no rank materialises its whole local model
            self.model = GPTModel(self.cfg, self.topo, args.seed, args.sequence_parallel,
                                  args.virtual_pipeline_model_parallel_size)
        self.dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
        if zero3:
            placeholder_parameters(self.model, self.dtype, device)
        self.model.to(device)
        recompute = recompute_from_args(args)
        # ZeRO-3 units recompute themselves (zero3.py): full recomputation is theirs, not the model's.
        units_recompute = zero3 and recompute.granularity == "full"
        self.model.set_recompute(RecomputeConfig() if units_recompute else recompute)
        self.scaler = loss_scaler_from_args(args)
        adam = AdamConfig(lr=args.lr, weight_decay=args.weight_decay, beta1=args.adam_beta1,
                          beta2=args.adam_beta2, eps=args.adam_eps, clip_grad=args.clip_grad,
                          bucket_numel=args.ddp_bucket_size, optimizer=args.optimizer,
                          sgd_momentum=args.sgd_momentum, overlap_grad_reduce=args.overlap_grad_reduce)
        # The optimizer copies the fp32 canonical init before the model is cast down (ZeRO-3:
        # generates its chunks of it).
        precision = Precision(self.dtype, torch.float32 if args.accumulate_allreduce_grads_in_fp32 else self.dtype)
        self.optimizer = DistributedOptimizer(list(self.model.named_parameters()), self.topo, args.zero_stage,
                                              adam, self.scaler, precision, device,
                                              canonical_seed=args.seed if zero3 else None)
        self.model.to(self.dtype)
        self.p2p_clock = comm.WaitClock() if self.topo.pp > 1 else None  # training steps' pipeline waits
        self.param_gather = None  # ZeRO-3: gathers the parameters around each unit of the model
        if zero3:  # the parameters live as the optimizer's shards from here on
            self.param_gather = partition_parameters(self.model, self.topo, self.optimizer,
                                                     overlap=args.overlap_param_gather, recompute=units_recompute,
                                                     max_live=args.zero3_max_live_parameters)
        self.schedule = build_lr_schedule(args)
        self.rampup = BatchRampup(*args.rampup_batch_size, args.global_batch_size) if args.rampup_batch_size else None
        self.identity = run_identity(args, vocab_size)
        self.state = TrainState()
        self.loaded: checkpointing.Loaded | None = None  # what _resume read, for logs and benchmarks
        self.writer = MetricsWriter(args, rank)
        if args.save:
            self._claim_save_folder()
        self.async_saver = (checkpointing.AsyncSaver(self.topo, device, self.log)
                            if args.async_save and args.save else None)
        if self.async_saver is not None:  # its host buffer is allocated while training starts
            self.async_saver.prepare(self.model, self.optimizer, save_optim=not args.no_save_optim)
        self.prefetcher = Prefetcher(partial(micro_batches, self.datasets[0], micro=args.micro_batch_size,
                                             topo=self.topo, device=device, masking=self.documents),
                                     self.global_batch_at, enabled=args.num_workers > 0)
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
            "consumed_valid_samples": self.state.consumed_valid_samples, "identity": self.identity,
            "optimizer_step": self.optimizer.step_count, "seed": a.seed,
            "tokenizer": {"type": "mock" if a.mock_data else a.tokenizer_type, "vocab_size": self.cfg.vocab_size,
                          "padded_vocab_size": self.model.padded_vocab},
            "global_batch_size": a.global_batch_size, "micro_batch_size": a.micro_batch_size,
            "zero_stage": a.zero_stage, "precision": str(self.dtype).replace("torch.", ""),
            "optimizer": a.optimizer,
            # --no-save-optim leaves out what upstream's leaves out with it: optimizer and schedule.
            **({} if a.no_save_optim else {"opt_param_scheduler": self.schedule.state_dict(),
                                          "loss_scaler": self.scaler.state_dict()}),
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
        a = self.args
        if self.async_saver is not None:
            self.async_saver.save(a.save, self._global_state(), self.model, self.optimizer,
                                  save_optim=not a.no_save_optim, save_rng=not a.no_save_rng, keep_last_k=a.keep_last_k)
            return
        path = checkpointing.save_checkpoint(a.save, self._global_state(), self.model, self.optimizer, self.topo,
                                             save_optim=not a.no_save_optim, save_rng=not a.no_save_rng,
                                             keep_last_k=a.keep_last_k, log=self.log)
        self.log(f"saved checkpoint at iteration {self.state.iteration} to {path}")

    def _resume(self) -> None:
        """Megatron's switches: --finetune loads weights only and starts over; --no-load-optim
        skips optimizer, loss scaler and schedule; --no-load-rng skips the RNG states."""
        a = self.args
        load_optim = not (a.no_load_optim or a.finetune)
        loaded, error = None, None
        try:
            loaded = checkpointing.load_checkpoint(
                a.load, self.model, self.optimizer, self.topo, universal=a.universal_checkpoint, tag=a.load_tag,
                load_optimizer=load_optim, load_rng=not (a.no_load_rng or a.finetune),
                validate=self._validate_checkpoint, start_fresh=self._start_fresh_policy(), log=self.log,
                progress=None if self.rank == 0 else False)
        except (OSError, checkpointing.CheckpointError) as e:
            error = checkpointing.as_checkpoint_error(e, f"loading {a.load}")
        checkpointing.raise_if_any_failed(error)  # every rank stops with the same one-line message
        self.loaded = loaded
        if loaded is None:
            self.log(f"no checkpoint found under {a.load}: starting from scratch")
            return
        g = loaded.state
        if a.finetune:
            self.log(f"--finetune: loaded the weights of {loaded.path}; starting at iteration 0")
            return
        self.state.iteration = g["iteration"]
        self.state.consumed_samples = g["consumed_samples"]
        self.state.consumed_tokens = g["consumed_tokens"]
        self.state.consumed_valid_samples = g.get("consumed_valid_samples", 0)
        if load_optim:
            self._resume_schedule_and_scaler(g)
        if not loaded.rng_restored:
            set_random_seeds(a.seed + 100 * self.topo.pp_rank + 7919 * self.state.iteration)
        self.log(f"resumed from {loaded.path} ({loaded.kind}) at iteration {self.state.iteration}, "
                 f"consumed samples {self.state.consumed_samples}; RNG "
                 f"{'restored exactly (same layout)' if loaded.rng_restored else 're-derived from the seed'}")

    def _resume_schedule_and_scaler(self, g: dict) -> None:
        self.optimizer.step_count = g["optimizer_step"]  # Adam's bias correction continues, imported or not
        if "opt_param_scheduler" not in g:  # imported weights: the schedule and the scaler start afresh
            return
        for difference in self.schedule.load_state_dict(g["opt_param_scheduler"], scheduler_policy(self.args)):
            self.log(f"notice: LR schedule {difference} ({scheduler_policy(self.args)} wins)")
        self.log("loss scaling: " + resume_loss_scaler(self.scaler, g["loss_scaler"], g["precision"], self.args))

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
        """Refuse a checkpoint of another model shape, or of another seed, data or tokenizer
        (unless --finetune / --override-data-position); a global batch change gets a notice."""
        a = self.args
        difference = self.cfg.first_shape_difference(ModelConfig.from_json(saved["model_config"]))
        if difference:
            raise checkpointing.CheckpointError(f"checkpoint under {a.load} is of another model shape: "
                                                f"{difference}")
        load_optim = not (a.no_load_optim or a.finetune)
        saved_optimizer = saved.get("optimizer", "adam")
        if saved_optimizer != a.optimizer and load_optim:
            raise checkpointing.CheckpointError(
                f"checkpoint under {a.load} holds {saved_optimizer} optimizer state, this run uses "
                f"--optimizer {a.optimizer}; use the same optimizer or pass --no-load-optim")
        imported = saved["global_batch_size"] is None  # weights imported from another tool: nothing trained yet
        if load_optim and "opt_param_scheduler" not in saved and not imported:
            raise checkpointing.CheckpointError(f"checkpoint under {a.load} was saved with --no-save-optim: pass "
                                                f"--no-load-optim or --finetune to start the optimizer afresh")
        if a.finetune:
            return
        if "identity" in saved and not a.override_data_position:
            changes = identity_differences(saved["identity"], self.identity)
            if changes:
                raise checkpointing.CheckpointError(
                    f"checkpoint under {a.load} was trained with another seed, data or tokenizer:\n  "
                    + "\n  ".join(changes) + "\npass --override-data-position to continue from its consumed "
                    "samples anyway, or --finetune to start a new run from its weights")
        if not imported and saved["global_batch_size"] != a.global_batch_size:
            self.log(f"notice: global batch size {saved['global_batch_size']} in the checkpoint, "
                     f"{a.global_batch_size} now; the LR schedule counts samples and the data continues "
                     f"from consumed sample {saved['consumed_samples']}")

    # --- the loop ----------------------------------------------------------------------

    def global_batch_at(self, consumed: int) -> int:
        """The global batch after ``consumed`` samples (``--rampup-batch-size`` grows it)."""
        if self.rampup is None:
            return self.args.global_batch_size
        gbs = self.rampup.global_batch(consumed)
        if gbs % (self.args.micro_batch_size * self.topo.dp):
            raise ValueError(f"--rampup-batch-size gives global batch {gbs} at consumed sample "
                             f"{consumed}, not divisible by --micro-batch-size "
                             f"{self.args.micro_batch_size} x data-parallel size {self.topo.dp}")
        return gbs

    def _apply_schedule(self) -> float:
        """Set this step's weight decay on the decayed group (Megatron's ``wd_mult``); return its LR."""
        wd = self.schedule.weight_decay()
        for g in self.optimizer.groups:
            g.hyper["weight_decay"] = wd if g.decay else 0.0
        return self.schedule.lr()

    def train_step(self) -> tuple[float, float, bool]:
        a = self.args
        gbs = self.global_batch_at(self.state.consumed_samples)
        batches = self.prefetcher.get(self.state.consumed_samples)
        self.optimizer.zero_grad()
        self.optimizer.expect_backwards(len(batches))
        self.model.train()
        self.model.dropout_rng.iteration = self.state.iteration
        moe = self.model.moe_stats
        if moe is not None:  # the auxiliary losses' share of the global batch, at the loss scale
            moe.begin_step(self.scaler.scale, gbs // a.micro_batch_size)
        denom = loss_denominator(batches, gbs, a.seq_length, self.topo, self.device)
        loss_sum = forward_backward(self.model, batches, self.topo, self.scaler.scale, denom, self.device,
                                    p2p_clock=self.p2p_clock)
        self.moe_metrics = moe.summary(self.cfg.num_layers, self.device) if moe is not None else {}
        ok, grad_norm = self.optimizer.step(self._apply_schedule())
        if ok:  # Megatron steps the schedule by the samples of a successful update only
            self.schedule.step(gbs, self.state.consumed_tokens + gbs * a.seq_length)
        return float(loss_sum), grad_norm, ok

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over --eval-iters batches, continuing the walk through the validation set."""
        a = self.args
        valid = self.datasets[1]
        self.model.eval()
        total = torch.zeros(1, device=self.device)
        # The iteration line times training steps only.
        with nullcontext() if self.param_gather is None else self.param_gather.clock.paused():
            for _ in range(a.eval_iters):
                batches = micro_batches(valid, self.state.consumed_valid_samples, a.global_batch_size,
                                        a.micro_batch_size, self.topo, self.device, self.documents)
                denom = loss_denominator(batches, a.global_batch_size, a.seq_length, self.topo, self.device)
                total += forward_backward(self.model, batches, self.topo, 1.0, denom, self.device, backward=False)
                self.state.consumed_valid_samples += a.global_batch_size
        return float(total) / a.eval_iters

    def _log_iteration(self, it: int, planned: int, gbs: int, seconds: float, lr: float, loss: float,
                       grad_norm: float, ok: bool, iterations: int = 1) -> None:
        """Megatron's iteration line, with throughput per rank (model FLOPs, see megatron/flops.py)."""
        a, world = self.args, self.world
        tokens = gbs * a.seq_length
        waits = {"grad-reduce": self.optimizer.grad_clock,
                 "param-gather": None if self.param_gather is None else self.param_gather.clock, "p2p": self.p2p_clock}
        exposed_waits = "".join(f" | exposed {name} time (ms): {1000 * clock.take() / max(1, iterations):.1f}"
                                for name, clock in waits.items() if clock is not None)
        flops = self.flops_per_iteration * gbs / a.global_batch_size
        self.log(f" iteration {it:8d}/{planned:8d} | consumed samples: {self.state.consumed_samples:10d}"
                 f" | elapsed time per iteration (ms): {1000 * seconds:.1f}"
                 f" | learning rate: {lr:.3E} | global batch size: {gbs:5d}"
                 f" | lm loss: {loss:.6E} | loss scale: {self.scaler.scale:.1f}"
                 f" | grad norm: {grad_norm:.3f} | skipped: {int(not ok)}"
                 + "".join(f" | {k}: {v:.6E}" for k, v in self.moe_metrics.items())
                 + f" | tokens per second: {tokens / seconds:.1f}"
                 f" | tokens per second per rank: {tokens / seconds / world:.1f}"
                 f" | TFLOP/s per rank: {flops / seconds / world / 1e12:.3f}"
                 + (exposed_waits if a.timing_log_level >= 1 else ""))

    def _report_validation(self, it: int) -> None:
        val = self.evaluate()
        ppl = math.exp(min(20.0, val))  # Megatron clips the exponent at 20
        self.log(f" validation loss at iteration {it} | lm loss value: {val:.6E} | lm loss PPL: {ppl:.6E}")
        self.writer.validation(it, self.state.consumed_samples, self.state.consumed_tokens, val)

    def _finished(self) -> bool:
        a = self.args
        if a.train_iters is not None and self.state.iteration >= a.train_iters:
            return True
        if a.train_samples is not None and self.state.consumed_samples >= a.train_samples:
            return True
        return a.train_tokens is not None and self.state.consumed_tokens >= a.train_tokens

    def _should_exit(self, start_time: float) -> str | None:
        """Why to save and stop now (SIGTERM, --exit-duration-in-mins), agreed by every rank."""
        a = self.args
        if not (a.exit_signal_handler or a.exit_duration_in_mins):
            return None
        overtime = bool(a.exit_duration_in_mins) and time.time() - start_time > 60.0 * a.exit_duration_in_mins
        flags = torch.tensor([float(self._sigterm.received), float(overtime)], device=self.device)
        comm.world_all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        if flags[0] > 0:
            return "exiting program after receiving SIGTERM"
        if flags[1] > 0:
            return f"exiting program after {a.exit_duration_in_mins} minutes"
        return None

    def train(self) -> TrainState:
        a = self.args
        planned = planned_train_iters(a)
        if getattr(a, "loss_scale_not_used", None) is not None:
            self.log(f"note: --loss-scale {a.loss_scale_not_used:g} is not used: with a DeepSpeed config its fp16 "
                     f"section governs loss scaling (bf16 and fp32 are not scaled), as in Megatron-DeepSpeed")
        self.log(f"training {self.cfg.num_layers}-layer model on {self.topo.describe()} with ZeRO stage "
                 f"{a.zero_stage}, {self.dtype}, from iteration {self.state.iteration} to {planned}")
        self._sigterm = _SigtermFlag() if a.exit_signal_handler else _NO_SIGNAL
        start_time = time.time()
        resumed_into_same_folder = bool(a.load and a.save) and os.path.realpath(a.load) == os.path.realpath(a.save)
        saved_at = self.state.iteration if resumed_into_same_folder else -1
        window_start, window_iters = time.perf_counter(), 0
        while not self._finished():
            step_start = time.perf_counter()
            lr = self.schedule.lr()
            gbs = self.global_batch_at(self.state.consumed_samples)
            loss, grad_norm, ok = self.train_step()
            self.state.iteration += 1
            self.state.consumed_samples += gbs
            self.state.consumed_tokens += gbs * a.seq_length
            self.state.losses.append(loss)
            if self.moe_metrics:
                self.state.moe_metrics.append(self.moe_metrics)
            window_iters += 1
            it = self.state.iteration
            if it % a.log_interval == 0 or it == planned:
                elapsed = time.perf_counter() - window_start
                self._log_iteration(it, planned, gbs, elapsed / window_iters, lr, loss, grad_norm, ok, window_iters)
                window_start, window_iters = time.perf_counter(), 0
            optimizer_states = (self.optimizer.state_norms() if a.log_optimizer_states_to_tensorboard
                                and it % a.tensorboard_log_interval == 0 else {})
            self.writer.training(it, self.state.consumed_samples, self.state.consumed_tokens, {
                "lm loss": loss, "learning rate": lr, "batch size": gbs,
                "loss scale": self.scaler.scale, "grad norm": grad_norm, "world size": self.world,
                "iteration time": time.perf_counter() - step_start, "moe": self.moe_metrics,
                "optimizer": optimizer_states})
            if a.eval_interval and it % a.eval_interval == 0 and self.datasets[1] is not None:
                self._report_validation(it)
            if self.async_saver is not None:
                self.async_saver.poll()  # commits a finished background save
            if a.save and a.save_interval and it % a.save_interval == 0:
                self.save()
                saved_at = it
            reason = self._should_exit(start_time)
            if reason or (a.exit_interval and it % a.exit_interval == 0):
                self.state.stop_reason = reason or f"exiting program at iteration {it}"
                break
        if a.save and saved_at != self.state.iteration:
            self.save()
        if self.async_saver is not None:
            self.async_saver.close()  # the job ends only once its last save is committed
        if self.state.stop_reason:
            self.log(self.state.stop_reason)
        self._sigterm.restore()
        self.writer.close()
        self.prefetcher.close()
        if a.save:
            checkpointing.release_folder_lock(a.save)
        return self.state


class _SigtermFlag:
    """``--exit-signal-handler``: SIGTERM only sets a flag; the loop saves and exits after
    the current iteration, as Megatron's ``DistributedSignalHandler`` does."""

    def __init__(self) -> None:
        self.received = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


class _NoSignal:
    received = False

    def restore(self) -> None:
        pass


_NO_SIGNAL = _NoSignal()

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
    """Build the run and train (raises on bad flags or checkpoints; see ``main``)."""
    state = build_trainer(argv).train()
    comm.barrier()
    return state


_LATE_RANK_REPORT_S = 3.0


def _report_checkpoint_error(exc: Exception, argv: list[str], rank: int) -> int:
    """Every rank holds the same message (``checkpointing.agree``): rank 0 prints it once."""
    if "--debug" in argv:
        raise exc
    if rank == 0:
        print(f"error: {exc}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str]) -> int:
    """``pretrain`` for the command line. An error in the configuration (flags, DeepSpeed
    config, layout, data files) found while building the run is one line on stderr, printed
    by rank 0 only (every rank exits 2); so is a checkpoint error (every rank holds the same
    message, see ``checkpointing.agree``). ``--debug`` shows the traceback instead. However
    it ends, the process groups go before the interpreter does (the TP3 SIGABRT, see
    ``shutdown_distributed``); only a clean finish waits for the other ranks."""
    code = None
    try:
        code = _run(argv, int(os.environ.get("RANK", "0")))
        return code
    finally:
        shutdown_distributed(wait=code == 0)


def _run(argv: list[str], rank: int) -> int:
    try:
        trainer = build_trainer(argv)
    except checkpointing.CheckpointError as exc:
        return _report_checkpoint_error(exc, argv, rank)
    except ValueError as exc:
        if "--debug" in argv:
            raise
        if rank != 0:
            # Rank 0 usually meets the same error and reports it; the launcher stops the other
            # ranks when it exits. A rank whose error rank 0 did not share still says so.
            time.sleep(_LATE_RANK_REPORT_S)
        print(f"error: {exc}" if rank == 0 else f"error (rank {rank}): {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        trainer.train()
    except checkpointing.CheckpointError as exc:
        return _report_checkpoint_error(exc, argv, rank)
    return 0
