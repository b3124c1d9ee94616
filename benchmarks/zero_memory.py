"""Per-rank memory of parameters, gradients and optimizer state for ZeRO stages 0-3.

Trains a bf16 GPT for one step on DP ranks (gloo, CPU), then sums the bytes of the
tensors each rank holds between steps (``megatron.core.optimizer.footprint``) and
prints them next to the ZeRO paper's ideal (stage 1 divides the optimizer state by DP,
stage 2 also the gradients, stage 3 also the parameters) and its model-state formulas
(ZeRO-1 4N + 12N/D, ZeRO-2 2N + 14N/D, ZeRO-3 16N/D bytes).

Then the peak resident memory of start-up (building the trainer: data, model, optimizer)
above what the process held before, for ZeRO-0 and ZeRO-3 on a larger model: ZeRO-3 builds
the model on the meta device and generates only its chunks of the canonical init, so its
peak stays under the ZeRO-3 formula plus one canonical tensor (fp32).

    python benchmarks/zero_memory.py --dp 2 4 --startup-dp 4 --startup-hidden-size 768
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core.optimizer.footprint import resident_bytes  # noqa: E402
from megatron.testing.distributed import run_distributed  # noqa: E402
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


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _startup_peak(rank: int, world: int, argv: list[str]) -> dict:
    """Bytes of peak RSS while building the trainer, above the RSS before it (Linux: writing 5
    to clear_refs resets the peak), and the model's sizes."""
    from megatron.training import build_trainer
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    trainer = build_trainer(argv)
    peak = _status_kib("VmHWM")
    params = list(trainer.model.parameters())
    return {"peak": 1024 * (peak - before), "numel": sum(math.prod(p.sharding.local_shape) for p in params),
            "largest": max(math.prod(s.shape) for p in params for s in p.sharding.specs.values())}


def startup_table(dp: int, hidden: int, layers: int) -> str:
    """ZeRO-0 and ZeRO-3 start-up peaks; the fixed cost of a start-up (imports, data, process
    groups: a 1-layer hidden-32 ZeRO-3 run) is counted as the interpreter's own."""
    def peak(stage: int, h: int, n_layers: int) -> dict:
        return run_distributed(_startup_peak, dp, model_flags(h, n_layers) + ["--zero-stage", str(stage)])[0]
    fixed = peak(3, 32, 1)["peak"]
    rows = {stage: peak(stage, hidden, layers) for stage in (0, 3)}
    n, largest = rows[3]["numel"], rows[3]["largest"]
    bound = formula_bytes(3, n, dp) + 4 * largest
    z0, z3 = rows[0]["peak"] - fixed, rows[3]["peak"] - fixed
    return (f"peak RSS while building the trainer above the interpreter's (a tiny model's start-up: "
            f"{fixed / 2**20:.1f} MiB), DP={dp}, bf16, {n:,} parameters\n"
            f"| ZeRO-0 MiB | ZeRO-3 MiB | ZeRO-3 / ZeRO-0 | ZeRO-3 bound MiB (16N/D + one fp32 canonical tensor) "
            f"| ZeRO-3 / bound |\n|---|---|---|---|---|\n"
            f"| {z0 / 2**20:.1f} | {z3 / 2**20:.1f} | {z3 / z0:.3f} | {bound / 2**20:.1f} | {z3 / bound:.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dp", type=int, nargs="+", default=[2, 4])
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--startup-dp", type=int, default=4)
    p.add_argument("--startup-hidden-size", type=int, default=768)
    p.add_argument("--startup-num-layers", type=int, default=8)
    a = p.parse_args()
    for dp in a.dp:
        rows = {stage: measure(dp, stage, a.hidden_size, a.num_layers) for stage in (0, 1, 2, 3)}
        print(table(rows, dp))
    print(startup_table(a.startup_dp, a.startup_hidden_size, a.startup_num_layers))


if __name__ == "__main__":
    main()
