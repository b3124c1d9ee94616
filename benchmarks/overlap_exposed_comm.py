"""Exposed (non-overlapped) communication time per iteration with and without overlap, on
forked gloo CPU ranks: the ZeRO-3 parameter all-gather (``--overlap-param-gather``) at DP2 and
the pipeline's point-to-point waits (asynchronous against awaiting every batch) at PP2.

    python benchmarks/overlap_exposed_comm.py [--layers 4 --hidden 256 --seq 256 --micro 4 --gbs 16
                                               --iters 6 --rounds 2 --only zero3|pp2]

The compared runs alternate (round by round) and each figure is printed with the 1-minute load
average at its run; per run: the median over iterations (the first left out: warm-up) of each
rank's figures, averaged over ranks. Exposed time is what ``--timing-log-level 1`` logs: the
time the computation was blocked in waits and synchronous collectives.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.testing.distributed import run_distributed  # noqa: E402
from megatron.testing.throughput import add_model_shape_args  # noqa: E402


def _measure(rank: int, world: int, argv: list[str], asynchronous: bool, iters: int) -> list[tuple[float, float]]:
    """(iteration ms, exposed ms) of every training step on this rank."""
    from megatron.core import schedules
    from megatron.training import build_trainer

    # The synchronous pipeline path has no flag (as in Megatron): the schedule's own switch.
    schedules.forward_backward_pipelined = partial(schedules.forward_backward_pipelined, asynchronous=asynchronous)
    trainer = build_trainer(argv)
    clock = trainer.param_gather.clock if trainer.param_gather is not None else trainer.p2p_clock
    rows = []
    for _ in range(iters):
        clock.take()
        start = time.perf_counter()
        trainer.train_step()
        rows.append((1000 * (time.perf_counter() - start), 1000 * clock.take()))
    return rows


def _summary(per_rank: list[list[tuple[float, float]]]) -> tuple[float, float]:
    iteration = statistics.mean(statistics.median(ms for ms, _ in rows[1:]) for rows in per_rank)
    exposed = statistics.mean(statistics.median(ms for _, ms in rows[1:]) for rows in per_rank)
    return iteration, exposed


def main() -> None:
    p = argparse.ArgumentParser()
    add_model_shape_args(p)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--gbs", type=int, default=16)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--only", choices=["zero3", "pp2"], default=None, help="run one comparison only")
    a = p.parse_args()
    if a.iters < 2:
        p.error(f"--iters {a.iters}: need at least 2 (the first iteration is left out as warm-up)")
    model = (f"--num-layers {a.layers} --hidden-size {a.hidden} --num-attention-heads {a.heads} "
             f"--seq-length {a.seq} --max-position-embeddings {a.seq} --micro-batch-size {a.micro} "
             f"--global-batch-size {a.gbs} --lr 1e-4 --mock-data --vocab-size 1024 --hidden-dropout 0 "
             f"--attention-dropout 0 --train-iters {a.iters} --timing-log-level 1 --log-interval 1000").split()
    cases = {  # name -> (flags, asynchronous pipeline, what is compared)
        "zero3 dp2 sync gather": (["--zero-stage", "3"], True, "zero3"),
        "zero3 dp2 --overlap-param-gather": (["--zero-stage", "3", "--overlap-param-gather"], True, "zero3"),
        "pp2 synchronous p2p": (["--pipeline-model-parallel-size", "2"], False, "pp2"),
        "pp2 asynchronous p2p": (["--pipeline-model-parallel-size", "2"], True, "pp2"),
    }
    cases = {name: case for name, case in cases.items() if a.only in (None, case[2])}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    print(f"model: {' '.join(model)}")
    for round_ in range(a.rounds):
        for name, (flags, asynchronous, _) in cases.items():
            figures = _summary(run_distributed(_measure, 2, model + flags, asynchronous, a.iters))
            results[name].append(figures)
            print(f"round {round_ + 1} | {name:34s} | iteration {figures[0]:8.1f} ms | exposed {figures[1]:8.2f} ms"
                  f" | load {os.getloadavg()[0]:.2f}", flush=True)
    print("\nmedian over rounds (ms per iteration):")
    medians = {name: (statistics.median(i for i, _ in rows), statistics.median(e for _, e in rows))
               for name, rows in results.items()}
    for name, (iteration, exposed) in medians.items():
        print(f"  {name:34s} iteration {iteration:8.1f}  exposed {exposed:8.2f}")
    names = list(cases)
    for base, overlapped in zip(names[::2], names[1::2]):
        (bi, be), (oi, oe) = medians[base], medians[overlapped]
        print(f"  {overlapped} / {base}: exposed x{oe / be:.2f}, iteration x{oi / bi:.2f}")


if __name__ == "__main__":
    main()
