"""DeepSpeed / Megatron-DeepSpeed checkpoints -> a universal checkpoint.

Megatron-DeepSpeed's ``GPTModel`` names its parameters
``language_model.{embedding,encoder.layers.N,encoder.final_layernorm,output_layer}...`` (its
pipeline ``GPTModelPipe`` by layer index, mapped to those names first) and splits
them over tensor-parallel ranks along the output dimension (column-parallel: ``query_key_value``,
``dense_h_to_4h``, the embeddings) or the input dimension (row-parallel: ``dense``,
``dense_4h_to_h``). Its fused tensors are laid out per TP rank, so they are split into canonical
q/k/v (gate/up) on each rank's slice before the slices are joined; joining first and splitting
after, as a plain concatenation does, scrambles them whenever TP > 1:

* ``query_key_value`` (``--qkv-layout grouped``, Megatron-DeepSpeed before its FPDT change and
  Megatron-LM): per KV group ``[q heads of the group, k, v]``, groups in order over the ranks;
  (``blocked``, Megatron-DeepSpeed since): per rank ``[q of its heads | k | v]``;
* SwiGLU ``dense_h_to_4h``: per rank ``[gate of its columns; up of its columns]``.
"""
from __future__ import annotations

import os

import torch

from megatron.interop.canonical import imported_state, write_imported
from megatron.interop.deepspeed_files import STATES, DeepSpeedCheckpoint, read_deepspeed
from megatron.interop.mcore import config_from_megatron_args, split_grouped_qkv
from megatron.model.config import ModelConfig

QKV_LAYOUTS = ("grouped", "blocked")
_TP_DIM = {"word_embeddings.weight": 0, "output_layer.weight": 0, "query_key_value.weight": 0,
           "query_key_value.bias": 0, "dense_h_to_4h.weight": 0, "dense_h_to_4h.bias": 0,
           "self_attention.dense.weight": 1, "dense_4h_to_h.weight": 1}
_LAYER_PARTS = {"input_layernorm": "input_norm", "post_attention_layernorm": "post_attention_norm",
                "self_attention.query_key_value": "attention.qkv", "self_attention.dense": "attention.dense",
                "mlp.dense_h_to_4h": "mlp.fc1", "mlp.dense_4h_to_h": "mlp.fc2"}
_GLOBAL = {"embedding.word_embeddings": "embedding.word_embeddings",
           "embedding.position_embeddings": "embedding.position_embeddings",
           "encoder.final_layernorm": "final_norm", "output_layer": "output_layer"}


def _our_name(name: str) -> str:
    """``language_model.encoder.layers.3.mlp.dense_4h_to_h.weight`` -> ``layers.3.mlp.fc2.weight``
    (fused tensors keep a provisional name: ``attention.qkv``, ``mlp.fc1``)."""
    bare = name.removeprefix("module.").removeprefix("language_model.")
    module, kind = bare.rsplit(".", 1)
    if module.startswith("encoder.layers."):
        index, part = module.removeprefix("encoder.layers.").split(".", 1)
        if part in _LAYER_PARTS:
            return f"layers.{index}.{_LAYER_PARTS[part]}.{kind}"
    elif module in _GLOBAL:
        return f"{_GLOBAL[module]}.{kind}"
    raise ValueError(f"{name}: not a parameter of Megatron-DeepSpeed's GPTModel that this importer maps "
                     f"(pass a checkpoint of language_model.* parameters)")


def _split_fused(ours: str, part: torch.Tensor, cfg: ModelConfig, tp: int, qkv_layout: str) -> dict[str, torch.Tensor]:
    """One TP rank's slice of a fused tensor -> its canonical pieces (that rank's rows of each)."""
    base, kind = ours.rsplit(".", 1)
    if base.endswith("attention.qkv"):
        prefix, kv = base.removesuffix("qkv"), cfg.num_key_value_heads // tp * cfg.head_dim
        if qkv_layout == "grouped":
            q, k, v = split_grouped_qkv(part, cfg, tp)
        else:
            q, k, v = part.split([part.shape[0] - 2 * kv, kv, kv])
        return {f"{prefix}q.{kind}": q, f"{prefix}k.{kind}": k, f"{prefix}v.{kind}": v}
    if base.endswith("mlp.fc1") and cfg.swiglu:
        gate, up = part.chunk(2)
        prefix = base.removesuffix("fc1")
        return {f"{prefix}gate.{kind}": gate, f"{prefix}up.{kind}": up}
    return {ours: part}


def canonical_from_megatron_deepspeed(ranks: list[dict[str, torch.Tensor]], cfg: ModelConfig,
                                      qkv_layout: str = "grouped") -> dict[str, torch.Tensor]:
    """Canonical tensors from the TP ranks' Megatron-DeepSpeed tensors (name -> that rank's slice)."""
    if qkv_layout not in QKV_LAYOUTS:
        raise ValueError(f"--qkv-layout must be one of {QKV_LAYOUTS}, got {qkv_layout!r}")
    tp = len(ranks)
    if cfg.num_key_value_heads % tp or cfg.ffn_hidden_size % tp:
        raise ValueError(f"the checkpoint has {tp} tensor-parallel ranks, which do not divide its "
                         f"{cfg.num_key_value_heads} KV heads and FFN size {cfg.ffn_hidden_size}")
    for r, names in enumerate(ranks[1:], 1):
        if names.keys() != ranks[0].keys():
            raise ValueError(f"tensor-parallel rank {r} holds other parameters than rank 0: "
                             f"{sorted(set(names) ^ set(ranks[0]))[:4]}")
    out: dict[str, torch.Tensor] = {}
    for name in ranks[0]:
        ours = _our_name(name)
        dim = next((d for suffix, d in _TP_DIM.items() if name.endswith(suffix)), None)
        if dim is None:  # replicated over TP: every rank holds the whole tensor
            out[ours] = ranks[0][name]
            continue
        pieces: dict[str, list[torch.Tensor]] = {}
        for rank in ranks:
            split = _split_fused(ours, rank[name], cfg, tp, qkv_layout) if dim == 0 else {ours: rank[name]}
            for n, t in split.items():
                pieces.setdefault(n, []).append(t)
        out.update({n: torch.cat(ts, dim=dim) for n, ts in pieces.items()})
    for vocab in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if vocab in out:  # Megatron pads the vocabulary to a multiple of 128 x TP
            out[vocab] = out[vocab][: cfg.vocab_size]
    return {n: t.contiguous() for n, t in out.items()}


def pipeline_names(names: list[str]) -> dict[str, str]:
    """Megatron-DeepSpeed's ``GPTModelPipe`` names (``"<layer index>.<name>"``, tied embeddings as
    ``tied_modules.<key>.<name>``) -> its non-pipeline names: the layers holding attention are the
    transformer layers in index order; a later layer of only ``weight`` / ``bias`` is the final norm."""
    by_index: dict[int, list[str]] = {}
    out = {}
    for name in names:
        head, rest = name.split(".", 1)
        if head == "tied_modules":  # tied_modules.<key>.word_embeddings.weight
            out[name] = "language_model.embedding." + rest.split(".", 1)[1]
        elif rest.startswith(("word_embeddings.", "position_embeddings.")):
            out[name] = "language_model.embedding." + rest
        elif rest.startswith("lm_head."):
            out[name] = "language_model.output_layer." + rest.removeprefix("lm_head.")
        elif head.isdigit():
            by_index.setdefault(int(head), []).append(rest)
        else:
            raise ValueError(f"{name}: not a parameter of Megatron-DeepSpeed's GPTModelPipe")
    layers = sorted(i for i, rs in by_index.items() if any(r.startswith("self_attention.") for r in rs))
    for i, rests in by_index.items():
        if i in layers:
            out.update({f"{i}.{r}": f"language_model.encoder.layers.{layers.index(i)}.{r}" for r in rests})
        elif layers and i > layers[-1] and set(rests) <= {"weight", "bias"}:
            out.update({f"{i}.{r}": f"language_model.encoder.final_layernorm.{r}" for r in rests})
        else:
            raise ValueError(f"pipeline layer {i} ({rests}) is neither a transformer layer nor the final norm")
    return out


def _by_tensor_rank(ckpt: DeepSpeedCheckpoint) -> list[dict[str, dict[str, torch.Tensor]]]:
    """name -> {state -> tensor} per TP rank; a pipeline's stages are joined (the first stage's copy of
    a tied embedding wins: the tied copies are kept equal by DeepSpeed)."""
    if not ckpt.pipeline:
        return [r.tensors for r in ckpt.ranks]
    names = pipeline_names(sorted({n for r in ckpt.ranks for n in r.tensors}))
    out: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in range(ckpt.tensor_parallel)]
    for mp, rank in enumerate(ckpt.ranks):
        for name, states in rank.tensors.items():
            out[mp % ckpt.tensor_parallel].setdefault(names[name], states)
    return out


def import_deepspeed(folder: str, output_folder: str, model_config: ModelConfig | None = None,
                     overwrite: bool = False, qkv_layout: str = "grouped") -> int:
    """Write a universal checkpoint (fp32 master and Adam moments when saved) from a DeepSpeed save of a
    Megatron-DeepSpeed GPT model (GPTModel, or GPTModelPipe), ZeRO 1-3, any TP and PP; returns the number
    of canonical tensors."""
    ckpt = read_deepspeed(folder)
    args = ckpt.client.get("args")
    if model_config is None:
        if args is None:
            raise ValueError(f"{ckpt.folder}: the model states hold no Megatron-DeepSpeed args; pass "
                             f"--model-config FILE with the model's shape")
        model_config = config_from_megatron_args(args)
    ranks = _by_tensor_rank(ckpt)
    saved = [s for s in STATES if all(s in t for r in ranks for t in r.values())]
    by_state = {s: canonical_from_megatron_deepspeed([{n: t[s] for n, t in r.items()} for r in ranks],
                                                     model_config, qkv_layout) for s in saved}
    tensors = {n: {s: by_state[s][n] for s in saved} for n in by_state["fp32"]}
    iteration = int(ckpt.client.get("iteration", ckpt.client.get("global_steps", 0)))
    consumed = getattr(args, "consumed_train_samples", None) or ckpt.client.get("global_samples", 0)
    state = imported_state(model_config, iteration=iteration, consumed_samples=int(consumed),
                           optimizer_step=ckpt.ranks[0].step if "exp_avg" in saved else 0)
    source = {"imported_from": f"deepspeed ZeRO-{ckpt.zero_stage}", "tensor_parallel": ckpt.tensor_parallel,
              "pipeline_stages": len(ckpt.ranks) // ckpt.tensor_parallel,
              "folder": os.path.abspath(ckpt.folder), "qkv_layout": qkv_layout,
              "deepspeed_version": ckpt.client.get("ds_version")}
    write_imported(output_folder, model_config, tensors, source, folder, state, overwrite=overwrite)
    return len(tensors)
