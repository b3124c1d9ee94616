"""What the throughput benchmarks share: the model-shape flags, and printing interleaved runs
(median and every run with its load average) and the ratios of ours against a baseline."""
from __future__ import annotations

import argparse
import statistics

Figure = tuple[float, float, float]  # tokens/s, tokens per CPU-second, 1-minute load average


def add_model_shape_args(p: argparse.ArgumentParser) -> None:
    """The benchmarks' default shape: 4 layers, hidden 256, 8 heads, sequence 256."""
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)


def print_figures(figures: dict[str, list[Figure]], width: int, cpu_note: str = "") -> None:
    """Per implementation: the median and every run, in tokens/s (with the load average), then in
    tokens per CPU-second (``cpu_note`` says whose CPU seconds)."""
    for name, figs in figures.items():
        cells = "  ".join(f"{t:7.1f} (load {load:.2f})" for t, _, load in figs)
        print(f"  {name:{width}s} median {statistics.median(f[0] for f in figs):7.1f} tokens/s | runs: {cells}")
    for name, figs in figures.items():
        cells = "  ".join(f"{f[1]:7.1f}" for f in figs)
        print(f"  {name:{width}s} median {statistics.median(f[1] for f in figs):7.1f} tokens per CPU-second"
              f"{cpu_note} | runs: {cells}")


def print_ratios(ours: list[Figure], theirs: list[Figure], against: str) -> float:
    """Ours over ``against`` in both units: the ratio of the medians and the median of the
    per-run ratios. Returns the tokens/s ratio of the medians."""
    ratios = []
    for what, i in (("tokens/s", 0), ("tokens per CPU-second", 1)):
        ratios.append(statistics.median(f[i] for f in ours) / statistics.median(f[i] for f in theirs))
        per_run = statistics.median(o[i] / t[i] for o, t in zip(ours, theirs))
        print(f"  ratio ours / {against}, {what}: {ratios[-1]:.2f}x (median of the per-run ratios {per_run:.2f}x)")
    return ratios[0]
