"""Model FLOPs: Megatron's formula (GQA and SwiGLU terms) against a count of the matrix
multiplications one training step of our model really runs."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron.core.parallel_state import ParallelDims, Topology
from megatron.flops import training_flops_per_iteration
from megatron.model.config import ModelConfig
from megatron.model.gpt import GPTModel


def test_flops_formula_equals_counted_matmuls_with_gqa_and_swiglu() -> None:
    b, s, h, layers = 3, 32, 64, 2
    cfg = ModelConfig(num_layers=layers, hidden_size=h, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=128, seq_length=s, ffn_hidden_size=96, swiglu=True, normalization="rmsnorm",
                      position_embedding_type="rope", tie_embeddings=False, add_bias_linear=False)
    model = GPTModel(cfg, Topology(ParallelDims(1)), seed=1)
    tokens = torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(tokens, tokens).sum().backward()
    linear = counter.get_total_flops()  # every projection and the logits, forward and backward
    # The fused attention kernel is not counted by torch: QK^T and AV, 2 b s s h each, x3 for backward.
    attention_scores = 3 * layers * 2 * (2 * b * s * s * h)
    # By hand, per layer forward: q and o 2*2bsh^2, k and v (2 of 4 KV heads) 2*2bsh^2/2, SwiGLU 3*2bsh*ffn.
    by_hand = 3 * (layers * (2 * 2 * b * s * h * h * (1 + 2 / 4) + 3 * 2 * b * s * h * 96)
                   + 2 * b * s * h * model.padded_vocab)
    assert linear == by_hand
    assert training_flops_per_iteration(cfg, b, model.padded_vocab) == linear + attention_scores
