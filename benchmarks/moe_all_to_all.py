"""MoE token dispatch: training tokens per second and all-to-all bytes per step at EP 1, 2, 4 (CPU, gloo).

    python benchmarks/moe_all_to_all.py [--layers 2 --hidden 64 --experts 8 --topk 2 --seq 64 --iters 5]

Each EP size trains the same model on EP ranks (expert-parallel over data-parallel ranks) with
the same global batch. The forward's all-to-all traffic is counted at
``torch.distributed.all_to_all_single`` (hidden rows only; the int64 split-size exchange is
reported apart) and printed beside the formula 2 x tokens x topk x hidden x bytes per element
per MoE layer (dispatch and return; dropless routing, so every assignment travels). "rows"
counts every row handed to the collective, "off-rank" only those sent to another rank.
At EP 1 nothing is exchanged: every expert is local.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.testing.distributed import run_distributed  # noqa: E402


def _counting_all_to_all(counts: dict[str, int]):
    original = dist.all_to_all_single

    def call(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        if torch._C._current_graph_task_id() == -1:  # forward only
            nbytes = input.numel() * input.element_size()
            if input.dtype == torch.int64:
                counts["split sizes"] += nbytes
            else:
                counts["rows"] += nbytes
                row = input[0].numel() * input.element_size() if input.shape[0] else 0
                me = dist.get_rank(group)
                counts["off-rank"] += nbytes - (input_split_sizes[me] * row if input_split_sizes else 0)
        return original(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)
    return call


def _run(rank: int, world: int, argv: list[str], iters: int) -> dict:
    from megatron.training import build_trainer
    trainer = build_trainer(argv)
    trainer.train_step()  # warm up
    counts = {"rows": 0, "off-rank": 0, "split sizes": 0}
    dist.all_to_all_single = _counting_all_to_all(counts)
    start = time.perf_counter()
    for _ in range(iters):
        trainer.train_step()
    seconds = time.perf_counter() - start
    totals = torch.tensor([counts["rows"], counts["off-rank"], counts["split sizes"]], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(totals)
    return {"seconds": seconds, "rows": totals[0].item() / iters, "off-rank": totals[1].item() / iters,
            "split sizes": totals[2].item() / iters}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--iters", type=int, default=5)
    a = p.parse_args()
    tokens = a.global_batch * a.seq
    formula = 2 * tokens * a.topk * a.hidden * 4 * a.layers  # fp32, every layer an MoE layer
    print(f"{a.layers} MoE layers, hidden {a.hidden}, {a.experts} experts, top-{a.topk}, {tokens} tokens per step, fp32")
    for ep in (1, 2, 4):
        argv = (f"--num-layers {a.layers} --hidden-size {a.hidden} --num-attention-heads 4 --seq-length {a.seq} "
                f"--micro-batch-size {a.global_batch // 4} --global-batch-size {a.global_batch} --mock-data "
                f"--vocab-size 256 --hidden-dropout 0 --attention-dropout 0 --train-iters {a.iters + 1} "
                f"--num-experts {a.experts} --moe-router-topk {a.topk} --expert-model-parallel-size {ep} "
                f"--log-interval 1000").split()
        results = run_distributed(_run, ep, argv, a.iters)
        seconds = max(r["seconds"] for r in results)
        r = results[0]
        print(f"EP {ep}: {tokens * a.iters / seconds:9.1f} tokens/s | forward all-to-all bytes per step: "
              f"rows {r['rows']:.0f} (off-rank {r['off-rank']:.0f}), split sizes {r['split sizes']:.0f} | "
              f"formula 2 x {tokens} x {a.topk} x {a.hidden} x 4 x {a.layers} = {formula}"
              + (" (all local at EP 1)" if ep == 1 else f" | rows / formula = {r['rows'] / formula:.3f}"))


if __name__ == "__main__":
    main()
