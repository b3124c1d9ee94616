"""Peak activation memory per pipeline stage: 1F1B against all-forward-then-all-backward.

Runs one global batch through a P-stage pipeline (gloo, CPU, one process per stage) and
tracks, with saved-tensor hooks, the bytes autograd keeps alive for backward on each
stage (``megatron.testing.activation_memory``). 1F1B holds at most P - s micro-batches
on stage s, so its peak must not change with the number of micro-batches M; the
all-forward-first (GPipe) order holds all M.

    python benchmarks/pipeline_activation_memory.py --pp 4 --micro-batches 4 16
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.model.config import ModelConfig  # noqa: E402
from megatron.testing.activation_memory import stage_activation_peak  # noqa: E402
from megatron.testing.distributed import run_distributed  # noqa: E402

SCHEDULES = {"1f1b": False, "all-fwd-first": True}
MIB = 2.0 ** 20


def measure(pp: int, cfg: ModelConfig, micro: int, num_micro: int, all_forward_first: bool) -> list[int]:
    """Peak saved-activation bytes of every stage, in stage order."""
    results = run_distributed(stage_activation_peak, pp, cfg, micro, num_micro, all_forward_first)
    for r in results:
        if r["live_after"]:
            raise RuntimeError(f"stage {r['stage']}: {r['live_after']} bytes still saved after the schedule")
    return [r["peak"] for r in sorted(results, key=lambda r: r["stage"])]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pp", type=int, default=4)
    p.add_argument("--micro-batches", type=int, nargs="+", default=[4, 16])
    p.add_argument("--layers-per-stage", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-attention-heads", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=1024)
    a = p.parse_args(argv)
    cfg = ModelConfig(num_layers=a.pp * a.layers_per_stage, hidden_size=a.hidden_size,
                      num_attention_heads=a.num_attention_heads, vocab_size=a.vocab_size, seq_length=a.seq_length)
    start = time.perf_counter()
    one = measure(a.pp, cfg, a.micro_batch_size, 1, False)
    peaks = {(name, m): measure(a.pp, cfg, a.micro_batch_size, m, first)
             for name, first in SCHEDULES.items() for m in a.micro_batches}
    print(f"P={a.pp}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, seq {cfg.seq_length}, micro-batch "
          f"{a.micro_batch_size}, vocab {cfg.vocab_size}, fp32: peak saved activations per stage (MiB)")
    columns = [(name, m) for name in SCHEDULES for m in a.micro_batches]
    header = f"{'stage':>5} {'1 micro-batch':>14} " + " ".join(f"{f'{n} M={m}':>17}" for n, m in columns)
    print(header)
    print("-" * len(header))
    for s in range(a.pp):
        cells = " ".join(f"{peaks[c][s] / MIB:10.2f} ({peaks[c][s] / one[s]:4.1f}x)" for c in columns)
        print(f"{s:>5} {one[s] / MIB:14.2f} {cells}")
    worst = " ".join(f"{max(peaks[c]) / MIB:17.2f}" for c in columns)
    print(f"{'max':>5} {max(one) / MIB:14.2f} {worst}")
    print(f"(Nx = multiples of one micro-batch's activations on that stage; {time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
