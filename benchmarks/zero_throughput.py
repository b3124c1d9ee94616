"""Training throughput at DP2 (two gloo ranks on CPU): our ZeRO-1 and ZeRO-3 vs real DeepSpeed
engines at ZeRO-1 and ZeRO-3, on the same model, data and batch sizes.

    python benchmarks/zero_throughput.py [--layers 4 --hidden 256 --heads 8 --seq 256 --vocab 50257
                                          --micro-batch 4 --global-batch 8 --runs 5 --steps 2
                                          --overlap-grad-reduce --overlap-param-gather]

The model is the GPT-2 shape of ``tokens_per_second.py`` (learned positions, LayerNorm, GeLU
tanh, tied embeddings). DeepSpeed trains it through ``megatron.testing.deepspeed_engine``: our
model's math under Megatron-DeepSpeed's parameter names, with DeepSpeed's own ZeRO partitioning,
gradient reduction, clipping and torch's AdamW on its flat partitions; the first step's losses
are printed so one can see both sides train the same model on the same batch. Both ranks
build all four implementations, then every run times ``--steps`` global steps of each in turn
(so machine noise hits them alike); the 1-minute load average is printed beside each figure,
and tokens per CPU-second of both ranks together beside tokens/s (steadier on a shared
machine: another job's burst stretches the wall clock, not the CPU seconds a rank used).
Each rank runs one thread (``megatron.testing.distributed``).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.testing.distributed import run_distributed  # noqa: E402
from megatron.testing.throughput import add_model_shape_args, print_figures, print_ratios  # noqa: E402

Step = Callable[[], float]


def our_flags(a: argparse.Namespace, stage: int) -> list[str]:
    flags = (f"--num-layers {a.layers} --hidden-size {a.hidden} --num-attention-heads {a.heads} "
             f"--seq-length {a.seq} --max-position-embeddings {a.seq} --vocab-size {a.vocab} "
             f"--make-vocab-size-divisible-by 1 --openai-gelu --micro-batch-size {a.micro_batch} "
             f"--global-batch-size {a.global_batch} --lr 1e-4 --lr-decay-style constant --clip-grad 1.0 "
             f"--train-iters 1000000 --mock-data --hidden-dropout 0 --attention-dropout 0 --log-interval 1000000 "
             f"--eval-interval 0 --num-workers 0 --zero-stage {stage}").split()
    return (flags + (["--overlap-grad-reduce"] if a.overlap_grad_reduce else [])
            + (["--overlap-param-gather"] if a.overlap_param_gather and stage == 3 else []))


def ours(argv: list[str]) -> Step:
    from megatron.training import build_trainer
    trainer = build_trainer(argv)

    def step() -> float:
        """One global step as ``Trainer.train`` takes it (data, forward-backward, optimizer)."""
        loss, _, _ = trainer.train_step()
        trainer.state.iteration += 1
        trainer.state.consumed_samples += trainer.args.global_batch_size
        return loss
    return step


def theirs(rank: int, world: int, argv: list[str], stage: int) -> Step:
    from megatron.testing.deepspeed_engine import build_for_deepspeed, deepspeed_engine, deepspeed_train_step
    trainer = build_for_deepspeed(rank, world, argv)
    engine = deepspeed_engine(trainer, {"zero_optimization": {"stage": stage}})
    iteration = [0]

    def step() -> float:
        loss = deepspeed_train_step(engine, trainer, iteration[0])
        iteration[0] += 1
        return loss
    return step


def _worker(rank: int, world: int, a: argparse.Namespace) -> dict:
    runs: dict[str, Step] = {}
    for stage in (1, 3):
        runs[f"ours ZeRO-{stage}"] = ours(our_flags(a, stage))
        if a.deepspeed:
            runs[f"DeepSpeed ZeRO-{stage}"] = theirs(rank, world, our_flags(a, 1), stage)
    first_loss = {name: step() for name, step in runs.items()}  # warm-up: the same first batch everywhere
    figures: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(a.runs):
        for name, step in runs.items():
            torch.distributed.barrier()
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(a.steps):
                step()
            cpu = time.process_time() - cpu
            torch.distributed.barrier()
            figures[name].append((time.perf_counter() - start, cpu, os.getloadavg()[0]))
    return {"first_loss": first_loss, "figures": figures}


def main() -> None:
    p = argparse.ArgumentParser()
    add_model_shape_args(p)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--runs", type=int, default=5, help="timed runs per implementation (median reported)")
    p.add_argument("--steps", type=int, default=2, help="global steps per timed run")
    p.add_argument("--overlap-grad-reduce", action="store_true", help="our --overlap-grad-reduce")
    p.add_argument("--overlap-param-gather", action="store_true",
                   help="our --overlap-param-gather at ZeRO-3 (DeepSpeed's ZeRO-3 prefetches by default)")
    a = p.parse_args()
    a.deepspeed = importlib.util.find_spec("deepspeed") is not None
    if a.deepspeed:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before the workers import deepspeed
    ranks = run_distributed(_worker, 2, a, timeout=3600)
    tokens = a.global_batch * a.seq * a.steps
    # Wall clock from rank 0 (both leave the last barrier together); CPU seconds summed over the ranks.
    figures = {name: [(tokens / wall, tokens / sum(r["figures"][name][i][1] for r in ranks), load)
                      for i, (wall, _, load) in enumerate(figs)]
               for name, figs in ranks[0]["figures"].items()}
    print(f"DP2 (gloo, CPU, 1 thread per rank): {a.layers} layers, hidden {a.hidden}, heads {a.heads}, "
          f"seq {a.seq}, vocab {a.vocab}, micro-batch {a.micro_batch}, global batch {a.global_batch}, fp32; "
          f"{a.runs} runs x {a.steps} steps each{'; ours with --overlap-grad-reduce' * a.overlap_grad_reduce}"
          f"{'; ours ZeRO-3 with --overlap-param-gather' * a.overlap_param_gather}")
    print("  first-step loss: " + ", ".join(f"{n} {v:.6f}" for n, v in ranks[0]["first_loss"].items()))
    print_figures(figures, 20, " (both ranks)")
    if not a.deepspeed:
        print("deepspeed is not installed: only our figures are shown")
        return
    for stage in (1, 3):
        print_ratios(figures[f"ours ZeRO-{stage}"], figures[f"DeepSpeed ZeRO-{stage}"], f"DeepSpeed at ZeRO-{stage}")

if __name__ == "__main__":
    main()
