"""Megatron-LM / Megatron-Core ``torch_dist`` checkpoints -> canonical tensors.

A torch_dist checkpoint is a PyTorch DCP whose keys are Megatron-Core's sharded-tensor keys:
homogeneous decoder layers are stacked on a leading layer axis (``decoder.layers.<param>`` of
shape ``[num_layers, ...]``); ``linear_qkv`` interleaves per query group ``[q heads of the group,
k, v]``; a GLU ``linear_fc1`` is ``[gate; up]``; vocabulary tensors are padded. Optimizer state
sits at ``optimizer.state.{fp32_param,exp_avg,exp_avg_sq}.<key>``. ``common.pt`` (Megatron's
args, iteration) is read with ``torch.load(weights_only=True)`` allowing only argparse.Namespace.
"""
from __future__ import annotations

import argparse
import os

import torch

from megatron.interop.canonical import imported_state, write_imported
from megatron.interop.dcp import read_dcp
from megatron.model.config import ModelConfig

STATES = {"fp32": "fp32_param", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}
_NORM_KEYS = {  # canonical norm -> (TE fused key, local-spec key) inside decoder.layers
    "input_norm": ("self_attention.linear_qkv.layer_norm", "input_layernorm"),
    "post_attention_norm": ("mlp.linear_fc1.layer_norm", "pre_mlp_layernorm"),
}


def read_common(folder: str) -> dict:
    """Megatron's common.pt (args, iteration), with no class allowed but argparse.Namespace."""
    path = os.path.join(folder, "common.pt")
    if not os.path.isfile(path):
        return {}
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # an unpickling refusal names the class it would not load
            raise ValueError(f"{path} holds more than argparse.Namespace and tensors ({e}); pass --model-config "
                             f"FILE instead, and move common.pt aside") from e


def config_from_megatron_args(args: argparse.Namespace) -> ModelConfig:
    """The model's shape from Megatron-LM's or Megatron-DeepSpeed's saved args (their names differ:
    num_query_groups / num_key_value_heads, norm_epsilon / layernorm_epsilon, RMSNorm / rmsnorm)."""
    a = vars(args)
    heads = a["num_attention_heads"]
    kv = a.get("num_query_groups") if a.get("group_query_attention") else a.get("num_key_value_heads") or heads
    rope = a.get("position_embedding_type") == "rope" or a.get("use_rotary_position_embeddings")
    return ModelConfig(
        num_layers=a["num_layers"], hidden_size=a["hidden_size"], num_attention_heads=heads, num_key_value_heads=kv,
        vocab_size=a.get("vocab_size") or a["padded_vocab_size"], seq_length=a["seq_length"],
        max_position_embeddings=a.get("max_position_embeddings"), ffn_hidden_size=a.get("ffn_hidden_size"),
        normalization="rmsnorm" if str(a.get("normalization")).lower() == "rmsnorm" else "layernorm",
        swiglu=bool(a.get("swiglu")), position_embedding_type="rope" if rope else "learned_absolute",
        rotary_base=float(a.get("rotary_base", 10000)), tie_embeddings=not a.get("untie_embeddings_and_output_weights"),
        add_bias_linear=a.get("add_bias_linear", True),
        layernorm_epsilon=a.get("norm_epsilon", a.get("layernorm_epsilon", 1e-5)),
        init_method_std=a.get("init_method_std", 0.02), openai_gelu=bool(a.get("openai_gelu")))


def split_grouped_qkv(fused: torch.Tensor, cfg: ModelConfig, tp: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[groups x (q_per_group + 2) x head_dim, ...] -> canonical q, k, v (rows head-major); with
    ``tp`` > 1, one TP rank's slice (its 1/tp of the KV groups) -> that rank's rows of each."""
    groups, hd = cfg.num_key_value_heads // tp, cfg.head_dim
    per = cfg.num_attention_heads // cfg.num_key_value_heads
    x = fused.reshape(groups, per + 2, hd, *fused.shape[1:])
    rest = fused.shape[1:]
    return (x[:, :per].reshape(-1, *rest), x[:, per].reshape(-1, *rest), x[:, per + 1].reshape(-1, *rest))


def _layer_tensors(get, cfg: ModelConfig, i: int) -> dict[str, torch.Tensor]:
    """Canonical tensors of layer ``i``; ``get(key)`` returns that key's layer-i slice or None."""
    out, ours = {}, f"layers.{i}"
    kinds = ("weight", "bias") if cfg.normalization == "layernorm" else ("weight",)
    for canonical, (fused_key, local_key) in _NORM_KEYS.items():
        for kind in kinds:
            t = get(f"{fused_key}_{kind}")
            out[f"{ours}.{canonical}.{kind}"] = t if t is not None else get(f"{local_key}.{kind}")
    linear_kinds = ("weight", "bias") if cfg.add_bias_linear else ("weight",)
    for kind in linear_kinds:
        q, k, v = split_grouped_qkv(get(f"self_attention.linear_qkv.{kind}"), cfg)
        out.update({f"{ours}.attention.q.{kind}": q, f"{ours}.attention.k.{kind}": k, f"{ours}.attention.v.{kind}": v})
        out[f"{ours}.attention.dense.{kind}"] = get(f"self_attention.linear_proj.{kind}")
        fc1 = get(f"mlp.linear_fc1.{kind}")
        if cfg.swiglu:
            out[f"{ours}.mlp.gate.{kind}"], out[f"{ours}.mlp.up.{kind}"] = fc1.chunk(2, dim=0)
        else:
            out[f"{ours}.mlp.fc1.{kind}"] = fc1
        out[f"{ours}.mlp.fc2.{kind}"] = get(f"mlp.linear_fc2.{kind}")
    missing = [n for n, t in out.items() if t is None]
    if missing:
        raise ValueError(f"the torch_dist checkpoint lacks the tensors of {missing[:3]} (layer {i})")
    return out


def canonical_from_mcore(flat: dict[str, torch.Tensor], cfg: ModelConfig, prefix: str = "") -> dict[str, torch.Tensor]:
    """Canonical tensors from Megatron-Core keys (each under ``prefix``)."""
    def key(k: str) -> str:
        return f"{prefix}{k}"

    out = {"embedding.word_embeddings.weight": flat[key("embedding.word_embeddings.weight")][: cfg.vocab_size],
           "final_norm.weight": flat[key("decoder.final_layernorm.weight")]}
    if cfg.normalization == "layernorm":
        out["final_norm.bias"] = flat[key("decoder.final_layernorm.bias")]
    if cfg.position_embedding_type == "learned_absolute":
        out["embedding.position_embeddings.weight"] = flat[key("embedding.position_embeddings.weight")]
    if not cfg.tie_embeddings:
        out["output_layer.weight"] = flat[key("output_layer.weight")][: cfg.vocab_size]
    for i in range(cfg.num_layers):
        def get(name: str, i: int = i) -> torch.Tensor | None:
            stacked, numbered = flat.get(key(f"decoder.layers.{name}")), flat.get(key(f"decoder.layers.{i}.{name}"))
            return stacked[i] if stacked is not None else numbered
        out.update(_layer_tensors(get, cfg, i))
    return {n: t.contiguous() for n, t in out.items()}


def import_mcore(folder: str, output_folder: str, model_config: ModelConfig | None = None,
                 overwrite: bool = False) -> int:
    """Write a universal checkpoint from a torch_dist folder (e.g. ``iter_0000100``); returns the count."""
    common = read_common(folder)
    if model_config is None:
        if "args" not in common:
            raise ValueError(f"{folder} has no common.pt with Megatron's args: pass --model-config FILE")
        model_config = config_from_megatron_args(common["args"])
    flat = read_dcp(folder)
    states = {}
    for ours, theirs in STATES.items():
        prefix = f"optimizer.state.{theirs}."
        if any(k.startswith(prefix) for k in flat):
            states[ours] = canonical_from_mcore(flat, model_config, prefix)
    if "fp32" not in states:  # no fp32 master in the checkpoint: the (maybe bf16) model weights
        states["fp32"] = canonical_from_mcore(flat, model_config)
    tensors = {n: {s: states[s][n] for s in states} for n in states["fp32"]}
    iteration = int(common.get("iteration", 0))
    groups = common.get("optimizer", {}).get("optimizer", {}).get("param_groups") or \
        common.get("optimizer", {}).get("param_groups") or [{}]
    step = int(groups[0].get("step", iteration)) if "exp_avg" in states else 0
    consumed = int(getattr(common.get("args"), "consumed_train_samples", 0) or 0)
    state = imported_state(model_config, iteration=iteration, optimizer_step=step, consumed_samples=consumed)
    write_imported(output_folder, model_config, tensors, {"imported_from": "mcore torch_dist",
                                                          "folder": os.path.abspath(folder)}, folder, state,
                   overwrite=overwrite)
    return len(tensors)
