"""Megatron sequence parallelism (``--sequence-parallel``): peak activation memory per rank and
communication volume per step, SP off and on at TP 1, 2, 4, beside the ideal curve and the
formulas of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models"). Ulysses and ring attention have their own benchmark.

Memory: the peak bytes autograd keeps saved for backward during one forward+backward of one
micro-batch (``SavedTensorMeter``: storages deduplicated, parameters excluded), on every TP
rank (gloo, one process per rank). Ideal with SP: TP 1's peak / TP.

Communication: every TP collective of the forward+backward, counted where the model calls it
(``megatron.core.comm``) as the elements a rank sends in the ring algorithm: all-reduce of n
elements 2(t-1)/t n, all-gather to n elements and reduce-scatter of n elements (t-1)/t n each.
The paper's count per layer is 8 (t-1)/t sbh for TP and for TP+SP (4 all-reduces vs. 4
all-gathers + 4 reduce-scatters); SP here also gathers each column-parallel input again in
backward (as Megatron: the paper's "extra all-gather", overlapped with compute), 2 more per layer.
The model-level formulas below add the embedding, the output layer and the cross-entropy's
three [b, s] all-reduces; the optimizer's TP sum of replicated SP gradients (norms, biases) is
listed apart (it is per step, not per micro-batch).

    python benchmarks/megatron_sp_memory.py [--seq 2048 --layers 2 --hidden 128 --heads 8 --tp 1 2 4]
"""
from __future__ import annotations

import argparse
import sys
from functools import wraps

import torch

from megatron.core import comm
from megatron.core.parallel_state import ParallelDims, Topology
from megatron.model.config import ModelConfig
from megatron.model.gpt import GPTModel
from megatron.testing.activation_memory import (SavedTensorMeter, add_sequence_model_args, peak_over_ranks,
                                                 sequence_model_config)
from megatron.testing.distributed import run_distributed


def _count_collectives(counts: dict[str, float]) -> None:
    """Wrap the TP collectives of ``comm`` to add each call's ring send volume (elements) to ``counts``."""
    volume = {"all_reduce": lambda t, n: 2 * (n - 1) / n * t.numel(),
              "all_gather_dim": lambda t, n: (n - 1) * t.numel(),  # t is this rank's 1/n of the result
              "reduce_scatter_dim": lambda t, n: (n - 1) / n * t.numel()}
    for name, size in volume.items():
        original = getattr(comm, name)

        def counted(t, group, *args, _original=original, _name=name, _size=size, **kwargs):
            n = comm.group_size(group)
            if n > 1:
                counts[_name] = counts.get(_name, 0.0) + _size(t, n)
            return _original(t, group, *args, **kwargs)
        setattr(comm, name, wraps(original)(counted))


def _measure(rank: int, world: int, cfg: ModelConfig, sp: bool) -> dict:
    torch.manual_seed(0)
    topo = Topology(ParallelDims(world, tp=world), rank)
    model = GPTModel(cfg, topo, seed=1, sequence_parallel=sp)
    tokens = torch.randint(0, cfg.vocab_size, (1, cfg.seq_length + 1), generator=torch.Generator().manual_seed(0))
    counts: dict[str, float] = {}
    _count_collectives(counts)
    meter = SavedTensorMeter(model)
    with meter.hooks():
        model(tokens[:, :-1], tokens[:, 1:]).float().mean().backward()
    replicated_sp_grads = sum(p.numel() for p in model.parameters() if p.sharding.partial_sums)
    return {"peak": meter.peak, "live_after": meter.live, "comm": counts, "sp_grad_elements": replicated_sp_grads}


def formulas(cfg: ModelConfig, t: int, sp: bool) -> tuple[float, float]:
    """(the paper's per-layer count x layers, the model-level count of this implementation), in
    elements sent per rank per micro-batch forward+backward."""
    f, n, sb = (t - 1) / t, cfg.seq_length * cfg.hidden_size, cfg.seq_length
    paper = 8 * f * n * cfg.num_layers
    if sp:  # per layer 6 AG + 4 RS; embedding RS + AG; output layer AG fwd, AG + RS bwd
        model = (10 * cfg.num_layers + 5) * f * n
    else:  # per layer 4 AR; embedding AR fwd; output layer AR bwd
        model = (8 * cfg.num_layers + 4) * f * n
    return paper, model + 3 * 2 * f * sb


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sequence_model_args(p)
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    a = p.parse_args(argv)
    cfg = sequence_model_config(a, hidden_dropout=0.1)
    print(f"GPT layers {a.layers} hidden {a.hidden} heads {a.heads} vocab {a.vocab}, sequence {a.seq}, "
          f"micro-batch 1, fp32, hidden dropout 0.1; one forward+backward per rank")
    print(f"{'TP':>3} {'SP':>4} {'peak MiB/rank':>14} {'vs TP1':>7} {'ideal 1/TP':>10} "
          f"{'comm MiB/rank':>14} {'paper layers MiB':>17} {'model formula MiB':>18} {'SP grad sum MiB':>16}")
    base = None
    for t in a.tp:
        for sp in ((False, True) if t > 1 else (False,)):
            results = run_distributed(_measure, t, cfg, sp)
            peak = peak_over_ranks(results)
            base = peak if base is None else base
            sent = max(sum(r["comm"].values()) for r in results) * 4
            paper, model = (x * 4 for x in formulas(cfg, t, sp))
            grad_sum = 2 * (t - 1) / t * results[0]["sp_grad_elements"] * 4
            print(f"{t:>3} {'on' if sp else 'off':>4} {peak / 2**20:>14.2f} {peak / base:>7.3f} {1 / t:>10.3f} "
                  f"{sent / 2**20:>14.3f} {paper / 2**20:>17.3f} {model / 2**20:>18.3f} {grad_sum / 2**20:>16.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
