"""Ulysses (``--ds-sequence-parallel-size S``) and ring attention (``--context-parallel-size C``):
peak activation memory per rank and communication volume per micro-batch, beside the ideal 1/S
curve and the formulas of the papers (Megatron SP has its own benchmark).

Memory: the peak bytes autograd keeps saved for backward during one forward+backward of one
micro-batch (``SavedTensorMeter``: storages deduplicated, parameters excluded), the largest over
the ranks (gloo, one process per rank, each holding its share of the sequence).

Communication, counted as the elements a rank sends:
* Ulysses: each attention all-to-alls q, k, v from sequence to head shards and the output back,
  in forward and again in backward; a rank sends (S-1)/S of each. The DeepSpeed-Ulysses paper
  (Jacobs et al. 2023) counts 4Nh/S per layer per direction for the whole group, i.e. per rank
  4 (S-1)/S x (N/S) h per layer forward; with backward, twice that.
* Ring: K and V of a rank's N/C tokens go C-1 hops around the ring in forward; in backward K and V
  go C-1 hops again and their gradients C hops (they come home to their owner): per layer and rank
  4(C-1) + 2C blocks of (N/C) h elements.

    python benchmarks/ulysses_cp_memory.py [--seq 2048 --layers 2 --hidden 128 --heads 8 --splits 1 2 4]
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from megatron.core.parallel_state import ParallelDims, Topology
from megatron.core.sequence_layout import SequenceLayout
from megatron.model.config import ModelConfig
from megatron.model.gpt import GPTModel
from megatron.testing.activation_memory import (SavedTensorMeter, add_sequence_model_args, peak_over_ranks,
                                                 sequence_model_config)
from megatron.testing.distributed import run_distributed


def _count_sends(counts: dict[str, float]) -> None:
    """Wrap the all-to-all and the ring's batched sends to add what this rank sends to ``counts``."""
    all_to_all, batch = dist.all_to_all_single, dist.batch_isend_irecv

    def counted_all_to_all(out, x, *args, group=None, **kwargs):
        n = dist.get_world_size(group)
        counts["all_to_all"] = counts.get("all_to_all", 0.0) + (n - 1) / n * x.numel()
        return all_to_all(out, x, *args, group=group, **kwargs)

    def counted_batch(ops):
        for op in ops:
            if op.op is dist.isend:
                tensors = op.tensor if isinstance(op.tensor, (list, tuple)) else [op.tensor]
                counts["ring"] = counts.get("ring", 0.0) + sum(t.numel() for t in tensors)
        return batch(ops)

    dist.all_to_all_single, dist.batch_isend_irecv = counted_all_to_all, counted_batch


def _measure(rank: int, world: int, cfg: ModelConfig, mode: str) -> dict:
    dims = ParallelDims(world, sp=world) if mode == "ulysses" else ParallelDims(world, cp=world)
    topo = Topology(dims, rank)
    model = GPTModel(cfg, topo, seed=1)
    tokens = torch.randint(0, cfg.vocab_size, (1, cfg.seq_length + 1), generator=torch.Generator().manual_seed(0))
    layout = SequenceLayout.of(topo)
    counts: dict[str, float] = {}
    _count_sends(counts)
    meter = SavedTensorMeter(model)
    with meter.hooks():
        model(layout.shard(tokens[:, :-1]), layout.shard(tokens[:, 1:])).float().mean().backward()
    return {"peak": meter.peak, "live_after": meter.live, "comm": counts}


def formula(cfg: ModelConfig, mode: str, s: int) -> float:
    """Elements a rank sends per micro-batch forward+backward, by the formulas above."""
    block = cfg.seq_length // s * cfg.hidden_size  # a rank's tokens x hidden
    if s == 1:
        return 0.0
    if mode == "ulysses":
        return 2 * 4 * (s - 1) / s * block * cfg.num_layers
    return (4 * (s - 1) + 2 * s) * block * cfg.num_layers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sequence_model_args(p)
    p.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4])
    a = p.parse_args(argv)
    cfg = sequence_model_config(a)
    print(f"GPT layers {a.layers} hidden {a.hidden} heads {a.heads} vocab {a.vocab}, sequence {a.seq}, "
          f"micro-batch 1, fp32; one forward+backward per rank")
    print(f"{'mode':>8} {'S/C':>4} {'peak MiB/rank':>14} {'vs 1':>7} {'ideal 1/S':>10} {'comm MiB/rank':>14} "
          f"{'formula MiB':>12}")
    for mode in ("ulysses", "ring"):
        base = None
        for s in a.splits:
            results = run_distributed(_measure, s, cfg, mode)
            peak = peak_over_ranks(results)
            base = peak if base is None else base
            sent = max(sum(r["comm"].values()) for r in results) * 4
            print(f"{mode:>8} {s:>4} {peak / 2**20:>14.2f} {peak / base:>7.3f} {1 / s:>10.3f} "
                  f"{sent / 2**20:>14.3f} {formula(cfg, mode, s) * 4 / 2**20:>12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
