"""Canonical tensors <-> transformers' ``BloomForCausalLM``.

BLOOM fuses q, k and v per head: the rows of ``query_key_value`` are ``[heads, 3, head_dim]``
(head 0's q, k, v, then head 1's ...), unlike GPT-2's ``[3, heads, head_dim]``.
"""
from __future__ import annotations

import torch

from megatron.model.config import ModelConfig, require_features

_NORMS = {"input_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm"}
_LINEARS = {"attention.dense": "self_attention.dense", "mlp.fc1": "mlp.dense_h_to_4h", "mlp.fc2": "mlp.dense_4h_to_h"}
_GLOBAL = {"embedding.word_embeddings.weight": "transformer.word_embeddings.weight",
           "embedding.layernorm.weight": "transformer.word_embeddings_layernorm.weight",
           "embedding.layernorm.bias": "transformer.word_embeddings_layernorm.bias",
           "final_norm.weight": "transformer.ln_f.weight", "final_norm.bias": "transformer.ln_f.bias"}


def check(cfg: ModelConfig) -> None:
    need = [(cfg.position_embedding_type == "alibi", "--position-embedding-type alibi"),
            (cfg.embed_layernorm, "--embed-layernorm"), (cfg.normalization == "layernorm", "layernorm"),
            (cfg.openai_gelu, "--openai-gelu"), (cfg.ffn_hidden_size == 4 * cfg.hidden_size, "ffn = 4 x hidden"),
            (cfg.tie_embeddings, "tied embeddings"), (cfg.add_bias_linear, "linear biases"),
            (not cfg.swiglu, "no --swiglu"), (cfg.num_key_value_heads == cfg.num_attention_heads, "no GQA")]
    require_features(need, "BloomForCausalLM")


def hf_config(cfg: ModelConfig) -> dict:
    check(cfg)
    return {"architectures": ["BloomForCausalLM"], "model_type": "bloom", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size, "n_layer": cfg.num_layers, "n_head": cfg.num_attention_heads,
            "layer_norm_epsilon": cfg.layernorm_epsilon, "initializer_range": cfg.init_method_std,
            "apply_residual_connection_post_layernorm": False, "hidden_dropout": 0.0, "attention_dropout": 0.0,
            "pretraining_tp": 1, "slow_but_exact": False, "tie_word_embeddings": True}


def config_from_hf(hf: dict, seq_length: int | None = None) -> ModelConfig:
    if hf.get("apply_residual_connection_post_layernorm"):
        raise ValueError("BLOOM with apply_residual_connection_post_layernorm is not supported")
    if not hf.get("tie_word_embeddings", True):
        raise ValueError("BLOOM with untied lm_head is not supported")
    hidden = hf.get("hidden_size", hf.get("n_embed"))
    seq = seq_length or hf.get("seq_length") or 2048
    return ModelConfig(num_layers=hf["n_layer"], hidden_size=hidden, num_attention_heads=hf["n_head"],
                       vocab_size=hf["vocab_size"], seq_length=seq, ffn_hidden_size=4 * hidden,
                       position_embedding_type="alibi", embed_layernorm=True, openai_gelu=True,
                       layernorm_epsilon=hf["layer_norm_epsilon"], init_method_std=hf.get("initializer_range", 0.02))


def _fuse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    return torch.stack([x.reshape(heads, -1, *x.shape[1:]) for x in (q, k, v)], dim=1).reshape(-1, *q.shape[1:])


def to_hf(t: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    check(cfg)
    out = {hf: t[ours] for ours, hf in _GLOBAL.items()}
    for i in range(cfg.num_layers):
        ours, hf = f"layers.{i}", f"transformer.h.{i}"
        for a, b in _NORMS.items():
            for kind in ("weight", "bias"):
                out[f"{hf}.{b}.{kind}"] = t[f"{ours}.{a}.{kind}"]
        for kind in ("weight", "bias"):
            qkv = [t[f"{ours}.attention.{x}.{kind}"] for x in "qkv"]
            out[f"{hf}.self_attention.query_key_value.{kind}"] = _fuse(*qkv, cfg.num_attention_heads)
        for a, b in _LINEARS.items():
            for kind in ("weight", "bias"):
                out[f"{hf}.{b}.{kind}"] = t[f"{ours}.{a}.{kind}"]
    return out


def from_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    check(cfg)
    state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    out = {ours: state.pop(hf) for ours, hf in _GLOBAL.items()}
    heads = cfg.num_attention_heads
    for i in range(cfg.num_layers):
        ours, hf = f"layers.{i}", f"transformer.h.{i}"
        for a, b in _NORMS.items():
            for kind in ("weight", "bias"):
                out[f"{ours}.{a}.{kind}"] = state.pop(f"{hf}.{b}.{kind}")
        for kind in ("weight", "bias"):
            fused = state.pop(f"{hf}.self_attention.query_key_value.{kind}")
            per_head = fused.reshape(heads, 3, -1, *fused.shape[1:])
            for j, x in enumerate("qkv"):
                out[f"{ours}.attention.{x}.{kind}"] = per_head[:, j].reshape(-1, *fused.shape[1:]).contiguous()
        for a, b in _LINEARS.items():
            for kind in ("weight", "bias"):
                out[f"{ours}.{a}.{kind}"] = state.pop(f"{hf}.{b}.{kind}")
    if state:
        raise ValueError(f"BLOOM weights this project does not know: {sorted(state)[:5]}")
    return out
