"""Canonical tensors <-> Hugging Face ``LlamaForCausalLM`` state dicts, for export and import.

Our canonical tensors are already unfused and in the layout transformers uses (q/k rows
head-major, rotate-half RoPE, gate and up separate), so the conversion is a renaming;
no row permutation is needed. ``canonical_state`` and ``load_canonical_state`` move
canonical tensors out of and into a model of any layout through its piece maps.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from megatron.core.pieces import box_slices
from megatron.model.config import ModelConfig, require_features

_GLOBAL = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
_LAYER = {  # canonical module path inside layers.{i} -> HF module path inside model.layers.{i}
    "input_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "attention.q": "self_attn.q_proj",
    "attention.k": "self_attn.k_proj",
    "attention.v": "self_attn.v_proj",
    "attention.dense": "self_attn.o_proj",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.fc2": "mlp.down_proj",
}
_CANONICAL_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_HF_DERIVED = re.compile(r".*rotary_emb\.inv_freq")  # recomputed from the config, not a weight


def check_llama(cfg: ModelConfig) -> None:
    """Refuse configs that LlamaForCausalLM cannot express, naming the flag to add."""
    require_features([(cfg.normalization == "rmsnorm", "--normalization rmsnorm"),
                      (cfg.position_embedding_type == "rope", "--position-embedding-type rope"),
                      (cfg.swiglu, "--swiglu"), (cfg.moe is None, "no --num-experts (MoE: MixtralForCausalLM)")],
                     "LlamaForCausalLM")


def hf_llama_config(cfg: ModelConfig) -> dict:
    """Keyword arguments of ``transformers.LlamaConfig`` (and the content of its config.json)."""
    check_llama(cfg)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.layernorm_epsilon,
        # rope_theta for transformers 4.x, rope_parameters for 5.x; they agree.
        "rope_theta": cfg.rotary_base, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base},
        "attention_bias": cfg.add_bias_linear, "mlp_bias": cfg.add_bias_linear,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_method_std,
    }


def hf_name(canonical: str) -> str:
    """The HF state-dict key of a canonical tensor name."""
    if canonical in _GLOBAL:
        return _GLOBAL[canonical]
    m = _CANONICAL_LAYER.fullmatch(canonical)
    if m is None or m.group(2) not in _LAYER:
        raise KeyError(f"canonical tensor {canonical!r} has no Llama counterpart (is the model built with "
                       f"--swiglu --normalization rmsnorm --position-embedding-type rope?)")
    return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"


def canonical_name(hf: str) -> str:
    """The canonical tensor name of an HF Llama state-dict key."""
    for canonical, key in _GLOBAL.items():
        if key == hf:
            return canonical
    m = _HF_LAYER.fullmatch(hf)
    inverse = {v: k for k, v in _LAYER.items()}
    if m is None or m.group(2) not in inverse:
        raise KeyError(f"{hf!r} is not a LlamaForCausalLM weight this project knows")
    return f"layers.{m.group(1)}.{inverse[m.group(2)]}.{m.group(3)}"


def canonical_to_hf(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An HF Llama state dict from canonical tensors. With tied embeddings there is no
    ``lm_head.weight``: load it with ``tie_word_embeddings=True`` (``strict=False``)."""
    return {hf_name(n): t for n, t in tensors.items()}


def hf_to_canonical(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Canonical tensors from an HF Llama state dict; a tied ``lm_head`` must equal the embedding."""
    check_llama(cfg)
    out = {}
    for key, t in state.items():
        if _HF_DERIVED.fullmatch(key):
            continue
        if key == "lm_head.weight" and cfg.tie_embeddings:
            embed = state.get(_GLOBAL["embedding.word_embeddings.weight"])
            if embed is not None and not torch.equal(embed, t):
                raise ValueError("lm_head.weight differs from model.embed_tokens.weight but this model ties "
                                 "them: drop --untie-embeddings-and-output-weights only for tied checkpoints")
            continue
        out[canonical_name(key)] = t
    return out


def canonical_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every canonical tensor of a model that holds all of them (one rank, or TP=PP=1), in fp32."""
    out: dict[str, torch.Tensor] = {}
    covered: dict[str, int] = {}
    for p in model.parameters():
        for piece in p.sharding.piece_map.pieces:
            spec = p.sharding.specs[piece.canonical]
            if piece.canonical not in out:
                out[piece.canonical], covered[piece.canonical] = torch.zeros(spec.shape), 0
            if piece.owner:
                region = p.detach()[box_slices((piece.local_offsets, piece.sizes))]
                out[piece.canonical][box_slices((piece.canonical_offsets, piece.sizes))] = region.float()
                covered[piece.canonical] += region.numel()
    partial = [n for n, t in out.items() if covered[n] != t.numel()]
    if partial:
        raise ValueError(f"this model holds only part of {partial[:3]}...: export from a universal checkpoint "
                         f"(megatron.checkpointing.CheckpointReader) or from a TP=1, PP=1 model")
    return out


@torch.no_grad()
def load_canonical_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy canonical tensors into a model of any layout, each piece from its canonical box.
    Local elements covered by no piece (vocabulary padding) are zeroed. Call it before the
    optimizer is built: the optimizer takes its fp32 master copy from the parameters then."""
    for name, p in model.named_parameters():
        local = torch.zeros(p.shape, dtype=p.dtype)
        for piece in p.sharding.piece_map.pieces:
            spec = p.sharding.specs[piece.canonical]
            t = tensors.get(piece.canonical)
            if t is None:
                raise KeyError(f"no tensor {piece.canonical!r} given for parameter {name}")
            if tuple(t.shape) != spec.shape:
                raise ValueError(f"tensor {piece.canonical} has shape {tuple(t.shape)}, the model expects "
                                 f"{spec.shape}: the weights are of another model shape")
            local[box_slices((piece.local_offsets, piece.sizes))] = t[box_slices((piece.canonical_offsets,
                                                                                 piece.sizes))]
        p.copy_(local)


def config_from_hf_llama(hf: dict, seq_length: int | None = None) -> ModelConfig:
    """Our model config from a LlamaForCausalLM config.json."""
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    if (hf.get("head_dim") or hidden // heads) != hidden // heads:  # Mixtral writes head_dim: null
        raise ValueError(f"head_dim {hf['head_dim']} is not hidden_size / num_attention_heads: not supported")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise ValueError(f"RoPE scaling {rope or hf.get('rope_scaling')} is not supported; only default RoPE")
    if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
        raise ValueError("attention_bias and mlp_bias differ: this project has one --disable-bias-linear flag")
    max_pos = hf["max_position_embeddings"]
    return ModelConfig(
        num_layers=hf["num_hidden_layers"], hidden_size=hidden, num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads, vocab_size=hf["vocab_size"],
        seq_length=seq_length or max_pos, max_position_embeddings=max_pos, ffn_hidden_size=hf["intermediate_size"],
        normalization="rmsnorm", swiglu=True, position_embedding_type="rope",
        rotary_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), add_bias_linear=bool(hf.get("attention_bias", False)),
        layernorm_epsilon=hf["rms_norm_eps"], init_method_std=hf.get("initializer_range", 0.02))
