"""Canonical tensors <-> transformers' ``MixtralForCausalLM``: a Llama whose every MLP is a
top-k mixture of SwiGLU experts.

Mixtral's router (``block_sparse_moe.gate``) takes the softmax over all experts, keeps the top k
and renormalises them: the softmax of the top-k logits, our ``topk_softmax`` score order. Its
experts' ``w1`` / ``w3`` / ``w2`` are our ``gate`` / ``up`` / ``fc2``. ``save_pretrained`` writes
one tensor per expert; transformers 5 holds them stacked in memory (``mlp.experts.gate_up_proj``,
``mlp.experts.down_proj``, router ``mlp.gate``), and folders in that layout are read too.
"""
from __future__ import annotations

import dataclasses
import re

import torch

from megatron.model import hf_llama
from megatron.model.config import ModelConfig, require_features
from megatron.model.moe_config import MoEConfig

_W = {"gate": "w1", "up": "w3", "fc2": "w2"}
_OURS_EXPERT = re.compile(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|fc2)\.weight")
_OURS_ROUTER = re.compile(r"layers\.(\d+)\.mlp\.router\.weight")
_HF_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight")
_HF_ROUTER = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight")
_HF_STACKED = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")


def check(cfg: ModelConfig) -> None:
    moe = cfg.moe
    need = [(cfg.normalization == "rmsnorm", "--normalization rmsnorm"),
            (cfg.position_embedding_type == "rope", "--position-embedding-type rope"), (cfg.swiglu, "--swiglu"),
            (moe is not None, "--num-experts"), (not cfg.add_bias_linear, "--disable-bias-linear")]
    if moe is not None:
        need += [(moe.layers == tuple(range(cfg.num_layers)), "--moe-layer-freq 1 (every layer an MoE layer)"),
                 (moe.shared_expert_ffn_hidden_size is None, "no --moe-shared-expert-intermediate-size"),
                 (moe.score_order == "topk_softmax", "--moe-router-topk-then-softmax"),
                 (moe.capacity_factor is None, "no --moe-expert-capacity-factor (dropless routing)")]
    require_features(need, "MixtralForCausalLM")


def hf_config(cfg: ModelConfig) -> dict:
    check(cfg)
    dense = hf_llama.hf_llama_config(dataclasses.replace(cfg, moe=None))
    return {**dense, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "intermediate_size": cfg.moe.ffn_hidden_size or cfg.ffn_hidden_size,
            "num_local_experts": cfg.moe.num_experts, "num_experts_per_tok": cfg.moe.topk,
            "router_aux_loss_coef": cfg.moe.aux_loss_coeff, "output_router_logits": False, "sliding_window": None}


def config_from_hf(hf: dict, seq_length: int | None = None) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Mixtral hidden_act {hf['hidden_act']!r} is not supported (silu)")
    if hf.get("sliding_window") is not None and hf["sliding_window"] < (seq_length or hf["max_position_embeddings"]):
        raise ValueError(f"Mixtral sliding_window {hf['sliding_window']} is shorter than the sequence: sliding-window "
                         f"attention is not supported")
    dense = hf_llama.config_from_hf_llama(hf, seq_length)
    moe = MoEConfig(num_experts=hf["num_local_experts"], layers=tuple(range(dense.num_layers)),
                    topk=hf["num_experts_per_tok"], score_order="topk_softmax",
                    aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.0)))
    return dataclasses.replace(dense, moe=moe)


def to_hf(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    check(cfg)
    out, dense = {}, {}
    for name, t in tensors.items():
        if m := _OURS_EXPERT.fullmatch(name):
            out[f"model.layers.{m[1]}.block_sparse_moe.experts.{m[2]}.{_W[m[3]]}.weight"] = t
        elif m := _OURS_ROUTER.fullmatch(name):
            out[f"model.layers.{m[1]}.block_sparse_moe.gate.weight"] = t
        else:
            dense[name] = t
    return {**out, **hf_llama.canonical_to_hf(dense)}


def from_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    check(cfg)
    ours = {v: k for k, v in _W.items()}
    out, dense = {}, {}
    for key, t in state.items():
        if m := _HF_EXPERT.fullmatch(key):
            out[f"layers.{m[1]}.mlp.experts.{m[2]}.{ours[m[3]]}.weight"] = t
        elif m := _HF_ROUTER.fullmatch(key):
            out[f"layers.{m[1]}.mlp.router.weight"] = t
        elif m := _HF_STACKED.fullmatch(key):  # [experts, 2 x ffn, hidden] (gate; up) or [experts, hidden, ffn]
            for e, w in enumerate(t):
                if m[2] == "down_proj":
                    out[f"layers.{m[1]}.mlp.experts.{e}.fc2.weight"] = w
                else:
                    gate, up = w.chunk(2)
                    out[f"layers.{m[1]}.mlp.experts.{e}.gate.weight"] = gate
                    out[f"layers.{m[1]}.mlp.experts.{e}.up.weight"] = up
        else:
            dense[key] = t
    return {**out, **hf_llama.hf_to_canonical(dense, dataclasses.replace(cfg, moe=None))}
