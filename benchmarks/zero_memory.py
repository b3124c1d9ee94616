"""Per-rank memory of parameters, gradients and optimizer state for ZeRO stages 0-3.

Trains a bf16 GPT for one step on DP ranks (gloo, CPU), then sums the bytes of the
tensors each rank holds between steps (``megatron.core.optimizer.footprint``) and
prints them next to the ZeRO paper's ideal (stage 1 divides the optimizer state by DP,
stage 2 also the gradients, stage 3 also the parameters) and its model-state formulas
(ZeRO-1 4N + 12N/D, ZeRO-2 2N + 14N/D, ZeRO-3 16N/D bytes).

    python benchmarks/zero_memory.py --dp 2 4
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core.optimizer.footprint import resident_bytes  # noqa: E402
from megatron.testing.training import inspect_trained  # noqa: E402

KINDS = ("params", "grads", "optimizer")
PARTITIONED_FROM = {"params": 3, "grads": 2, "optimizer": 1}  # the stage that first divides each kind


def model_flags(hidden: int, layers: int) -> list[str]:
    return (f"--num-layers {layers} --hidden-size {hidden} --num-attention-heads 4 --seq-length 32 "
            f"--micro-batch-size 1 --mock-data --vocab-size 1000 --train-iters 1 --bf16 "
            f"--hidden-dropout 0 --attention-dropout 0 --log-interval 1000").split()


def measure(dp: int, stage: int, hidden: int, layers: int) -> dict:
    """Rank 0's footprint (every rank holds the same sizes up to padding) and the parameter count."""
    def inspect(trainer) -> dict:
        count = sum(math.prod(p.sharding.piece_map.local_shape) for p in trainer.model.parameters())
        return {**resident_bytes(trainer.model, trainer.optimizer).to_json(), "numel": count}
    results = inspect_trained(dp, model_flags(hidden, layers) + ["--zero-stage", str(stage)], inspect)
    return results[0]


def formula_bytes(stage: int, n: int, dp: int) -> float:
    """The ZeRO paper's model-state bytes per rank for mixed-precision Adam (bf16 params and
    grads, fp32 master, exp_avg, exp_avg_sq: K = 12)."""
    return {0: 16 * n, 1: 4 * n + 12 * n / dp, 2: 2 * n + 14 * n / dp, 3: 16 * n / dp}[stage]


def table(rows: dict[int, dict], dp: int) -> str:
    base = rows[0]
    lines = [f"per-rank bytes held between steps, DP={dp}, bf16 model, {base['numel']:,} parameters",
             "| stage | " + " | ".join(f"{k} MiB | {k} vs 0 (ideal)" for k in KINDS)
             + " | total MiB | ZeRO paper formula MiB | measured / formula |",
             "|---|" + "---|---|" * len(KINDS) + "---|---|---|"]
    for stage, r in rows.items():
        cells = []
        for k in KINDS:
            ideal = 1.0 / dp if stage >= PARTITIONED_FROM[k] else 1.0
            cells.append(f"{r[k] / 2**20:.3f} | {r[k] / base[k]:.3f} ({ideal:.3f})")
        total = sum(r[k] for k in KINDS)
        formula = formula_bytes(stage, base["numel"], dp)
        lines.append(f"| {stage} | " + " | ".join(cells)
                     + f" | {total / 2**20:.3f} | {formula / 2**20:.3f} | {total / formula:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dp", type=int, nargs="+", default=[2, 4])
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    a = p.parse_args()
    for dp in a.dp:
        rows = {stage: measure(dp, stage, a.hidden_size, a.num_layers) for stage in (0, 1, 2, 3)}
        print(table(rows, dp))


if __name__ == "__main__":
    main()
