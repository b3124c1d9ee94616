"""Model FLOPs of one training iteration, with Megatron's formula (GQA and SwiGLU terms).

Forward + backward (3x the forward's matrix multiplications), counted once: recomputed
activations are not counted, so TFLOP/s stays comparable with and without recomputation.
"""
from __future__ import annotations

from megatron.model.config import ModelConfig


def training_flops_per_iteration(cfg: ModelConfig, global_batch: int, padded_vocab: int) -> float:
    h, layers, seq = cfg.hidden_size, cfg.num_layers, cfg.seq_length
    gated = 1.5 if cfg.swiglu else 1.0  # SwiGLU's third matrix
    attention = 1.0 + cfg.num_key_value_heads / cfg.num_attention_heads + seq / h  # q+o, k+v (GQA), QK^T and AV
    mlp = cfg.ffn_hidden_size / h * gated
    logits = padded_vocab / (2.0 * layers * h)
    return 12.0 * global_batch * seq * layers * h * h * (attention + mlp + logits)
