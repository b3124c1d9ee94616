"""Activation memory saved by recomputation, and its time cost, against no recomputation.

Each setting runs in its own process with glibc's mmap threshold fixed at 64 KiB, so every
tensor of that size or more is its own mapping, returned to the OS when freed: the peak
resident set during one forward+backward (``VmHWM`` after resetting it through
``/proc/self/clear_refs``) minus the resident set before it is the real peak memory the
step added (activations, gradients, recomputation buffers). Linux only.

    python benchmarks/activation_recompute_memory.py [--layers 8 --hidden 256 --seq 512 --batch 4]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {  # name -> (granularity, method, num_layers), as the flags in megatron/model/recompute.py map them
    "none": (None, "uniform", 1),
    "full uniform 1 (--checkpoint-activations)": ("full", "uniform", 1),
    "full uniform 2": ("full", "uniform", 2),
    "full block half the layers": ("full", "block", -1),
    "selective (core attention)": ("selective", "uniform", 1),
}


def _child(spec: dict) -> None:
    import torch

    from megatron.core.parallel_state import ParallelDims, Topology
    from megatron.model.config import ModelConfig
    from megatron.model.gpt import GPTModel
    from megatron.model.recompute import RecomputeConfig

    torch.set_num_threads(1)
    cfg = ModelConfig(num_layers=spec["layers"], hidden_size=spec["hidden"], num_attention_heads=spec["heads"],
                      vocab_size=spec["vocab"], seq_length=spec["seq"], hidden_dropout=0.0, attention_dropout=0.0)
    model = GPTModel(cfg, Topology(ParallelDims(1, 1, 1), 0), 1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]), generator=g)
    labels = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]), generator=g)
    num = spec["num_layers"] if spec["num_layers"] > 0 else spec["layers"] // 2
    model.set_recompute(RecomputeConfig(spec["granularity"], spec["method"], num))

    def step() -> None:
        model(tokens, labels).float().mean().backward()

    step()  # warm-up: parameter gradients and allocator state exist from here on
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set to the current one
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    print(json.dumps({"peak_bytes": _status("VmHWM") - base, "seconds": seconds}))


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        _child(json.loads(a.child))
        return 0
    shape = {k: getattr(a, k) for k in ("layers", "hidden", "heads", "seq", "batch", "vocab")}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    print(f"GPT {shape}, fp32, one forward+backward; peak memory added by the step")
    results = {}
    for name, (granularity, method, num) in SETTINGS.items():
        spec = {**shape, "granularity": granularity, "method": method, "num_layers": num}
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, check=True,
                             capture_output=True, text=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    base = results["none"]
    for name, r in results.items():
        print(f"  {name:<45} {r['peak_bytes'] / 2**20:8.1f} MiB  ({r['peak_bytes'] / base['peak_bytes']:.2f}x)"
              f"   step {r['seconds']:.2f} s ({r['seconds'] / base['seconds']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
