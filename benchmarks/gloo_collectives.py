"""gloo's all-gather against one broadcast per rank, on the same bytes (why ``comm.all_gather_flat``
broadcasts on gloo).

    OMP_NUM_THREADS=1 python benchmarks/gloo_collectives.py [--ranks 2,4] [--mib 256,1024]

Prints, for each rank count and total size, the seconds of ``all_gather_into_tensor`` and of the
broadcasts (best of 3, all ranks in step) and their ratio.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.testing.distributed import run_distributed  # noqa: E402


def _timed(rank: int, world: int, numel: int) -> dict[str, float]:
    import torch
    import torch.distributed as dist

    from megatron.core.comm import _gather_by_broadcasts

    shard, out = torch.randn(numel), torch.empty(numel * world)
    ways = {"all_gather_into_tensor": lambda: dist.all_gather_into_tensor(out, shard),
            "one broadcast per rank": lambda: _gather_by_broadcasts(out, shard, dist.group.WORLD).wait()}
    best = {}
    for name, call in ways.items():
        for _ in range(3):
            dist.barrier()
            start = time.perf_counter()
            call()
            dist.barrier()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="2,4")
    p.add_argument("--mib", default="256,1024", help="total gathered sizes, MiB")
    a = p.parse_args()
    print("| ranks | gathered MiB | all_gather_into_tensor s | one broadcast per rank s | ratio |")
    print("|---|---|---|---|---|")
    for world in map(int, a.ranks.split(",")):
        for mib in map(int, a.mib.split(",")):
            t = max(run_distributed(_timed, world, (mib << 20) // 4 // world, timeout=900),
                    key=lambda r: r["one broadcast per rank"])
            ag, bc = t["all_gather_into_tensor"], t["one broadcast per rank"]
            print(f"| {world} | {mib} | {ag:.3f} | {bc:.3f} | {bc / ag:.2f}x |")


if __name__ == "__main__":
    main()
