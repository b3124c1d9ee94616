"""Universal checkpointing cost on a ~124M-parameter GPT (GPT-2 small shape), CPU.

    python benchmarks/ucp_conversion.py [--workdir /tmp/ucp_bench] [--num-workers 2]

1. trains one step at TP=2 DP=2 ZeRO-1 and saves a native checkpoint;
2. times `cat`-ing the checkpoint's files to /dev/null (the floor for reading it once) and
   `cp -r` + sync (reading it once and writing it once);
3. converts it to universal in a child process: wall time and peak RSS;
4. loads it on TP=1 DP=4 ZeRO-1 directly from the native files and from the universal
   one, and reports the bytes each rank read next to the checkpoint's size.
"""
from __future__ import annotations

import argparse
import glob
import os
import resource
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.testing.distributed import run_distributed  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ("--num-layers 12 --hidden-size 768 --num-attention-heads 12 --seq-length 64 --micro-batch-size 1 "
         "--global-batch-size 4 --mock-data --vocab-size 50257 --hidden-dropout 0 --attention-dropout 0 "
         "--log-interval 1 --zero-stage 1").split()


def _train_and_save(rank: int, world: int, argv: list[str]) -> None:
    from megatron.training import pretrain
    pretrain(argv)


def _load_only(rank: int, world: int, argv: list[str]) -> int:
    """Build the target layout, which resumes from the checkpoint; returns the bytes this rank read."""
    from megatron.training import build_trainer

    return build_trainer(argv).loaded.bytes_read


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", default="/tmp/ucp_bench")
    p.add_argument("--num-workers", type=int, default=2)
    a = p.parse_args()
    shutil.rmtree(a.workdir, ignore_errors=True)
    ckpt = os.path.join(a.workdir, "ckpt")
    start = time.perf_counter()
    run_distributed(_train_and_save, 4, MODEL + ["--tensor-model-parallel-size", "2", "--train-iters", "1",
                                                 "--save", ckpt], timeout=1800)
    print(f"train 1 step + save at TP2 DP2 ZeRO-1: {time.perf_counter() - start:.1f} s")
    native = os.path.join(ckpt, "global_step1")
    files = sorted(glob.glob(os.path.join(native, "*")))
    size = sum(os.path.getsize(f) for f in files)

    start = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    cat_s = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run(["cp", "-r", native, native + "_copy"], check=True)
    subprocess.run(["sync"], check=True)
    cp_s = time.perf_counter() - start
    shutil.rmtree(native + "_copy")

    start = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_to_universal.py"), "--input_folder", native,
                    "--output_folder", native + "_universal", "--num_workers", str(a.num_workers), "--no-progress"],
                   check=True)
    convert_s = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    largest = 50257 * 768 * 4 / 2**20

    target = MODEL + ["--tensor-model-parallel-size", "1", "--train-iters", "2", "--load", ckpt]
    native_reads = run_distributed(_load_only, 4, target, timeout=1800)
    universal_reads = run_distributed(_load_only, 4, target + ["--universal-checkpoint"], timeout=1800)
    usize = sum(os.path.getsize(f) for f in glob.glob(os.path.join(native + "_universal", "*")))

    print(f"\ncheckpoint: {size / 2**20:.0f} MiB native ({len(files)} files), {usize / 2**20:.0f} MiB universal")
    print(f"{'':40s}{'seconds':>10s}{'ratio':>8s}")
    print(f"{'cat native files > /dev/null':40s}{cat_s:10.2f}{1.0:8.2f}")
    print(f"{'cp -r native folder + sync':40s}{cp_s:10.2f}{cp_s / cat_s:8.2f}")
    print(f"{'convert_to_universal (' + str(a.num_workers) + ' workers)':40s}{convert_s:10.2f}{convert_s / cat_s:8.2f}")
    print(f"converter peak RSS: {peak_mib:.0f} MiB, memory-mapped input pages included "
          f"(largest tensor {largest:.0f} MiB, x{a.num_workers} workers)")
    print("\nbytes read per rank, loading TP2 DP2 -> TP1 DP4 (ZeRO-1):")
    for name, reads, total in (("native", native_reads, size), ("universal", universal_reads, usize)):
        per = ", ".join(f"{r / 2**20:.0f}" for r in reads)
        print(f"  from {name:9s}: [{per}] MiB; sum {sum(reads) / 2**20:.0f} MiB = "
              f"{sum(reads) / total:.2f} x checkpoint; each rank {max(reads) / total:.2f} x at most")


if __name__ == "__main__":
    main()
