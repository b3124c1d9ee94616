"""Cost of layout-invariant (counter-based) dropout against torch's own dropout, in the
same session: a forward + backward of one GPT layer stack with each kind.

    python benchmarks/dropout_cost.py [--hidden 256 --seq 256 --batch 8 --layers 2 --repeats 5]

Prints ms per step for no dropout, torch's dropout (F.dropout + SDPA dropout_p) and ours,
and the ratios ours / torch and ours / none.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from megatron.core.parallel_state import ParallelDims, Topology
from megatron.model.config import ModelConfig
from megatron.model.gpt import GPTModel


def _step_ms(model: GPTModel, tokens: torch.Tensor, repeats: int) -> float:
    model.train()
    model(tokens).float().mean().backward()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        model(tokens).float().mean().backward()
    if tokens.is_cuda:
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / repeats


def _torch_dropout(model: GPTModel) -> None:
    """Swap in torch's dropout: the baseline that is not layout-invariant."""
    for layer in model.layers.values():
        layer.dropout_rng.hidden = lambda x, p, layer, site: F.dropout(x, p, True)
        layer.attention._dropout_attention = (
            lambda q, k, v, p: F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True))
    model.dropout_rng.hidden = lambda x, p, layer, site: F.dropout(x, p, True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    topo = Topology(ParallelDims(1, 1, 1), 0)
    tokens = torch.randint(0, 1000, (a.batch, a.seq), device=a.device)
    times = {}
    for kind, drop in (("none", 0.0), ("torch", 0.1), ("counter-based", 0.1)):
        cfg = ModelConfig(num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=a.heads, vocab_size=1000,
                          seq_length=a.seq, hidden_dropout=drop, attention_dropout=drop)
        model = GPTModel(cfg, topo, seed=1).to(a.device)
        if kind == "torch":
            _torch_dropout(model)
        times[kind] = _step_ms(model, tokens, a.repeats)
        print(f"{kind:>14}: {times[kind]:8.1f} ms per forward+backward")
    print(f"counter-based / torch dropout: {times['counter-based'] / times['torch']:.2f}x; "
          f"counter-based / no dropout: {times['counter-based'] / times['none']:.2f}x; "
          f"torch / no dropout: {times['torch'] / times['none']:.2f}x")


if __name__ == "__main__":
    main()
