"""Canonical tensors <-> transformers' ``GPT2LMHeadModel``.

GPT-2 keeps its linear weights as ``Conv1D`` (``[in, out]``, the transpose of ours) and
fuses q, k and v into ``c_attn`` along the output dimension, in that order.
"""
from __future__ import annotations

import re

import torch

from megatron.model.config import ModelConfig, require_features

_NORMS = {"input_norm": "ln_1", "post_attention_norm": "ln_2"}
_LINEARS = {"attention.dense": "attn.c_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_GLOBAL = {"embedding.word_embeddings.weight": "transformer.wte.weight",
           "embedding.position_embeddings.weight": "transformer.wpe.weight",
           "final_norm.weight": "transformer.ln_f.weight", "final_norm.bias": "transformer.ln_f.bias"}
_BUFFERS = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)")  # causal-mask buffers of old versions


def check(cfg: ModelConfig) -> None:
    need = [(cfg.normalization == "layernorm", "--normalization layernorm"),
            (cfg.position_embedding_type == "learned_absolute", "--position-embedding-type learned_absolute"),
            (not cfg.swiglu, "no --swiglu"), (cfg.tie_embeddings, "tied embeddings"),
            (cfg.add_bias_linear, "linear biases"), (cfg.num_key_value_heads == cfg.num_attention_heads, "no GQA"),
            (not cfg.embed_layernorm, "no --embed-layernorm")]
    require_features(need, "GPT2LMHeadModel")


def hf_config(cfg: ModelConfig) -> dict:
    check(cfg)
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_position_embeddings, "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers,
            "n_head": cfg.num_attention_heads, "n_inner": cfg.ffn_hidden_size,
            "activation_function": "gelu_new" if cfg.openai_gelu else "gelu",
            "layer_norm_epsilon": cfg.layernorm_epsilon, "initializer_range": cfg.init_method_std,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": True,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}


def config_from_hf(hf: dict, seq_length: int | None = None) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"GPT-2 activation_function {act!r} is not supported (gelu or gelu_new)")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise ValueError("GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported")
    if not hf.get("tie_word_embeddings", True):
        raise ValueError("GPT-2 with untied lm_head is not supported")
    hidden, positions = hf["n_embd"], hf["n_positions"]
    return ModelConfig(num_layers=hf["n_layer"], hidden_size=hidden, num_attention_heads=hf["n_head"],
                       vocab_size=hf["vocab_size"], seq_length=seq_length or positions,
                       max_position_embeddings=positions, ffn_hidden_size=hf.get("n_inner") or 4 * hidden,
                       openai_gelu=act != "gelu", layernorm_epsilon=hf["layer_norm_epsilon"],
                       init_method_std=hf.get("initializer_range", 0.02))


def to_hf(t: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    check(cfg)
    out = {hf: t[ours] for ours, hf in _GLOBAL.items()}
    for i in range(cfg.num_layers):
        ours, hf = f"layers.{i}", f"transformer.h.{i}"
        for a, b in _NORMS.items():
            for kind in ("weight", "bias"):
                out[f"{hf}.{b}.{kind}"] = t[f"{ours}.{a}.{kind}"]
        qkv = [f"{ours}.attention.{x}" for x in "qkv"]
        out[f"{hf}.attn.c_attn.weight"] = torch.cat([t[f"{n}.weight"] for n in qkv]).t().contiguous()
        out[f"{hf}.attn.c_attn.bias"] = torch.cat([t[f"{n}.bias"] for n in qkv])
        for a, b in _LINEARS.items():
            out[f"{hf}.{b}.weight"] = t[f"{ours}.{a}.weight"].t().contiguous()
            out[f"{hf}.{b}.bias"] = t[f"{ours}.{a}.bias"]
    return out


def from_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    check(cfg)
    state = {k: v for k, v in state.items() if not _BUFFERS.fullmatch(k) and k != "lm_head.weight"}
    out = {ours: state.pop(hf) for ours, hf in _GLOBAL.items()}
    h = cfg.hidden_size
    for i in range(cfg.num_layers):
        ours, hf = f"layers.{i}", f"transformer.h.{i}"
        for a, b in _NORMS.items():
            for kind in ("weight", "bias"):
                out[f"{ours}.{a}.{kind}"] = state.pop(f"{hf}.{b}.{kind}")
        w, b = state.pop(f"{hf}.attn.c_attn.weight").t(), state.pop(f"{hf}.attn.c_attn.bias")
        for j, x in enumerate("qkv"):
            out[f"{ours}.attention.{x}.weight"] = w[j * h:(j + 1) * h].contiguous()
            out[f"{ours}.attention.{x}.bias"] = b[j * h:(j + 1) * h].contiguous()
        for a, b_ in _LINEARS.items():
            out[f"{ours}.{a}.weight"] = state.pop(f"{hf}.{b_}.weight").t().contiguous()
            out[f"{ours}.{a}.bias"] = state.pop(f"{hf}.{b_}.bias")
    if state:
        raise ValueError(f"GPT-2 weights this project does not know: {sorted(state)[:5]}")
    return out
