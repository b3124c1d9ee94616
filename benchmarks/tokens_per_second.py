"""Training throughput of our GPT at one rank vs transformers' GPT2LMHeadModel of the same shape (CPU).

    python benchmarks/tokens_per_second.py [--layers 4 --hidden 256 --heads 8 --seq 256 --batch 8 --iters 10]

Both run forward + backward + AdamW on the same batches in this process, alternating
so that machine noise hits both; the ratio is ours / theirs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core.optimizer.distributed_optimizer import AdamConfig, DistributedOptimizer  # noqa: E402
from megatron.core.optimizer.grad_scaler import LossScaler  # noqa: E402
from megatron.core.parallel_state import ParallelDims, Topology  # noqa: E402
from megatron.model.config import ModelConfig  # noqa: E402
from megatron.model.gpt import GPTModel  # noqa: E402


def ours(cfg: ModelConfig):
    model = GPTModel(cfg, Topology(ParallelDims(1)), seed=1)
    opt = DistributedOptimizer(list(model.named_parameters()), model.topo, 0, AdamConfig(lr=1e-4), LossScaler())

    def step(tokens: torch.Tensor) -> None:
        opt.zero_grad()
        model(tokens[:, :-1], tokens[:, 1:]).mean().backward()
        opt.step(1e-4)
    return step


def theirs(cfg: ModelConfig):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_position_embeddings,
                                    n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_attention_heads,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4)

    def step(tokens: torch.Tensor) -> None:
        opt.zero_grad()
        hf(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
    return step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--iters", type=int, default=10)
    a = p.parse_args()
    cfg = ModelConfig(num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=a.heads, vocab_size=a.vocab,
                      seq_length=a.seq, make_vocab_size_divisible_by=1)
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=torch.Generator().manual_seed(0))
    runs = {"ours": ours(cfg), "transformers GPT2LMHeadModel": theirs(cfg)}
    for step in runs.values():  # warm-up
        step(tokens)
    elapsed = {name: 0.0 for name in runs}
    for _ in range(a.iters):
        for name, step in runs.items():
            start = time.perf_counter()
            step(tokens)
            elapsed[name] += time.perf_counter() - start
    tokens_per_iter = a.batch * a.seq
    print(f"GPT {a.layers} layers, hidden {a.hidden}, heads {a.heads}, seq {a.seq}, batch {a.batch}, vocab {a.vocab}; "
          f"{torch.get_num_threads()} threads, fp32, {a.iters} timed steps each")
    for name, t in elapsed.items():
        print(f"  {name:32s} {tokens_per_iter * a.iters / t:10.1f} tokens/s")
    ratio = elapsed["transformers GPT2LMHeadModel"] / elapsed["ours"]
    print(f"ratio ours / transformers: {ratio:.2f}x")


if __name__ == "__main__":
    main()
