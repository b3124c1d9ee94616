"""Training throughput of our GPT at one rank vs transformers on the same shape (CPU), for a
GPT-2 shape (``GPT2LMHeadModel``) and a Llama shape (``LlamaForCausalLM``: RMSNorm, RoPE,
SwiGLU, GQA, no biases, untied output layer).

    python benchmarks/tokens_per_second.py [--models gpt2 llama --layers 4 --hidden 256 --heads 8
                                            --seq 256 --batch 8 --runs 5 --steps 2]

Each run times ``--steps`` steps (forward + backward + clipped AdamW on the same batch) of
every implementation in turn, in this process, so machine noise hits them alike; the
1-minute load average is printed beside each figure. The ratio is the median of ours over
the median of theirs; the median of the per-run ratios is printed beside it, and both again
for tokens per CPU-second of the process (steadier on a shared machine). Our
side is the model and optimizer the trainer uses (``GPTModel``, ``DistributedOptimizer``
at ZeRO-0 with clipping); theirs is ``torch.optim.AdamW`` with ``clip_grad_norm_``. The DP2
comparison with DeepSpeed's ZeRO-1 and ZeRO-3 engines on the same model and batch is
``benchmarks/zero_throughput.py``; results of both: ``benchmarks/results/tokens_per_second.txt``.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core.optimizer.distributed_optimizer import AdamConfig, DistributedOptimizer  # noqa: E402
from megatron.core.optimizer.grad_scaler import LossScaler  # noqa: E402
from megatron.core.parallel_state import ParallelDims, Topology  # noqa: E402
from megatron.model.config import ModelConfig  # noqa: E402
from megatron.model.gpt import GPTModel  # noqa: E402
from megatron.testing.throughput import Figure, add_model_shape_args, print_figures, print_ratios  # noqa: E402

Step = Callable[[torch.Tensor], None]


def model_config(kind: str, a: argparse.Namespace) -> ModelConfig:
    common = dict(num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=a.heads, seq_length=a.seq,
                  make_vocab_size_divisible_by=1)
    if kind == "gpt2":  # GPT-2's gelu_new is GeLU's tanh approximation
        return ModelConfig(vocab_size=50257, openai_gelu=True, **common)
    return ModelConfig(vocab_size=32000, num_key_value_heads=max(1, a.heads // 2), normalization="rmsnorm",
                       swiglu=True, position_embedding_type="rope", tie_embeddings=False, add_bias_linear=False,
                       layernorm_epsilon=1e-6, **common)


def ours(cfg: ModelConfig) -> Step:
    model = GPTModel(cfg, Topology(ParallelDims(1)), seed=1)
    opt = DistributedOptimizer(list(model.named_parameters()), model.topo, 0, AdamConfig(lr=1e-4), LossScaler())

    def step(tokens: torch.Tensor) -> None:
        opt.zero_grad()
        model(tokens[:, :-1], tokens[:, 1:]).mean().backward()
        opt.step(1e-4)
    return step


def hf_model(kind: str, cfg: ModelConfig) -> torch.nn.Module:
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel
        return GPT2LMHeadModel(GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_position_embeddings,
                                          n_embd=cfg.hidden_size, n_layer=cfg.num_layers,
                                          n_head=cfg.num_attention_heads, resid_pdrop=0.0, embd_pdrop=0.0,
                                          attn_pdrop=0.0))
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                        intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
                                        num_attention_heads=cfg.num_attention_heads,
                                        num_key_value_heads=cfg.num_key_value_heads,
                                        max_position_embeddings=cfg.seq_length, rms_norm_eps=cfg.layernorm_epsilon,
                                        rope_theta=cfg.rotary_base, tie_word_embeddings=False))


def theirs(kind: str, cfg: ModelConfig) -> Step:
    hf = hf_model(kind, cfg)
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4)

    def step(tokens: torch.Tensor) -> None:
        opt.zero_grad()
        hf(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
    return step


def timed_run(step: Step, tokens: torch.Tensor, steps: int) -> tuple[float, float, float]:
    """(tokens/s over ``steps`` steps, tokens per second of this process's CPU time, 1-minute
    load average right after). On a shared machine the CPU-time figure is the steadier one:
    another job's burst stretches the wall clock but not the CPU seconds this run used."""
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step(tokens)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    n = tokens.shape[0] * (tokens.shape[1] - 1) * steps
    return n / seconds, n / cpu_seconds, os.getloadavg()[0]


def compare(kind: str, a: argparse.Namespace) -> float:
    cfg = model_config(kind, a)
    label = {"gpt2": "transformers GPT2LMHeadModel", "llama": "transformers LlamaForCausalLM"}[kind]
    tokens = torch.randint(0, cfg.vocab_size, (a.batch, a.seq + 1), generator=torch.Generator().manual_seed(0))
    runs = {"ours": ours(cfg), label: theirs(kind, cfg)}
    for step in runs.values():  # warm-up
        step(tokens)
    figures: dict[str, list[Figure]] = {name: [] for name in runs}
    for _ in range(a.runs):
        for name, step in runs.items():
            figures[name].append(timed_run(step, tokens, a.steps))
    print(f"{kind}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_attention_heads} "
          f"(KV {cfg.num_key_value_heads}), ffn {cfg.ffn_hidden_size}, seq {cfg.seq_length}, batch {a.batch}, "
          f"vocab {cfg.vocab_size}; {torch.get_num_threads()} threads, fp32, {a.runs} runs x {a.steps} steps each")
    print_figures(figures, 30)
    return print_ratios(figures["ours"], figures[label], "transformers")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", choices=["gpt2", "llama"], default=["gpt2", "llama"])
    add_model_shape_args(p)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--runs", type=int, default=5, help="timed runs per implementation (median reported)")
    p.add_argument("--steps", type=int, default=2, help="training steps per timed run")
    a = p.parse_args()
    for kind in a.models:
        compare(kind, a)
    if importlib.util.find_spec("deepspeed") is None:
        print("deepspeed is not installed: benchmarks/zero_throughput.py will time only ours at DP2")
    else:
        print("DP2 ZeRO-1 / ZeRO-3 vs DeepSpeed on the same model and batch: python benchmarks/zero_throughput.py")


if __name__ == "__main__":
    main()
