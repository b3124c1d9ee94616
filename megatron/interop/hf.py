"""Hugging Face transformers model folders <-> canonical tensors.

A *family* maps one transformers architecture (GPT-2, Llama with GQA, BLOOM, Mixtral) to our config
and canonical tensors both ways. A folder is written as transformers writes one: config.json,
safetensors shards with ``model.safetensors.index.json`` when there are several, and the
tokenizer files when a tokenizer folder is given.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron.interop import hf_bloom, hf_gpt2, hf_mixtral
from megatron.model import hf_llama
from megatron.model.config import ModelConfig

Tensors = dict[str, torch.Tensor]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "generation_config.json")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Family:
    model_type: str
    check: Callable[[ModelConfig], None]
    hf_config: Callable[[ModelConfig], dict]
    config_from_hf: Callable[[dict, int | None], ModelConfig]
    to_hf: Callable[[Tensors, ModelConfig], Tensors]
    from_hf: Callable[[Tensors, ModelConfig], Tensors]


def _llama_config_from_hf(hf: dict, seq_length: int | None) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Llama hidden_act {hf['hidden_act']!r} is not supported (silu)")
    return hf_llama.config_from_hf_llama(hf, seq_length)


FAMILIES = {
    "gpt2": Family("gpt2", hf_gpt2.check, hf_gpt2.hf_config, hf_gpt2.config_from_hf, hf_gpt2.to_hf, hf_gpt2.from_hf),
    "llama": Family("llama", hf_llama.check_llama, hf_llama.hf_llama_config, _llama_config_from_hf,
                    lambda t, cfg: hf_llama.canonical_to_hf(t), hf_llama.hf_to_canonical),
    "bloom": Family("bloom", hf_bloom.check, hf_bloom.hf_config, hf_bloom.config_from_hf, hf_bloom.to_hf,
                    hf_bloom.from_hf),
    "mixtral": Family("mixtral", hf_mixtral.check, hf_mixtral.hf_config, hf_mixtral.config_from_hf,
                      hf_mixtral.to_hf, hf_mixtral.from_hf),
}


def family_of(cfg: ModelConfig) -> Family:
    """The one family whose architecture expresses ``cfg``; the error lists what each one needs."""
    reasons = []
    for family in FAMILIES.values():
        try:
            family.check(cfg)
            return family
        except ValueError as e:
            reasons.append(str(e))
    raise ValueError("no transformers architecture expresses this model:\n  " + "\n  ".join(reasons))


def _shards(state: Tensors, max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name in state:
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_hf_folder(folder: str, cfg: ModelConfig, tensors: Tensors, dtype: str = "fp32",
                    max_shard_bytes: int = 5 << 30, tokenizer_dir: str | None = None) -> list[str]:
    """Write a transformers model folder from canonical tensors; returns the files written."""
    family = family_of(cfg)
    state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in sorted(family.to_hf(tensors, cfg).items())}
    os.makedirs(folder, exist_ok=True)
    config = {**family.hf_config(cfg), "torch_dtype": str(DTYPES[dtype]).replace("torch.", "")}
    written = ["config.json"]
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    shards = _shards(state, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for file, keys in zip(names, shards):
        save_file({k: state[k] for k in keys}, os.path.join(folder, file), metadata={"format": "pt"})
    written += names
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: file for file, keys in zip(names, shards) for k in keys}}
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
        written.append("model.safetensors.index.json")
    if tokenizer_dir is not None:
        written += copy_tokenizer(tokenizer_dir, folder)
    return written


def copy_tokenizer(source: str, folder: str) -> list[str]:
    found = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(source, f))]
    if not any(f in found for f in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        raise FileNotFoundError(f"--tokenizer {source}: no tokenizer.json, vocab.json or tokenizer.model there "
                                f"(a transformers tokenizer folder, as tokenizer.save_pretrained writes)")
    for f in found:
        shutil.copyfile(os.path.join(source, f), os.path.join(folder, f))
    return found


def read_hf_state(folder: str) -> Tensors:
    """Every tensor of a transformers folder's safetensors files (sharded or not), in fp32."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder} has no model.safetensors or model.safetensors.index.json: save the "
                                f"model with save_pretrained(..., safe_serialization=True)")
    state: Tensors = {}
    for file in files:
        with safe_open(os.path.join(folder, file), framework="pt") as f:
            for k in f.keys():
                state[k] = f.get_tensor(k).float()
    return state


def read_hf_folder(folder: str, seq_length: int | None = None) -> tuple[ModelConfig, Tensors, Family]:
    """Our config and canonical tensors (fp32) from a transformers folder."""
    with open(os.path.join(folder, "config.json")) as f:
        hf = json.load(f)
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{folder}/config.json: model_type {model_type!r} is not supported; "
                         f"supported: {', '.join(FAMILIES)}")
    family = FAMILIES[model_type]
    cfg = family.config_from_hf(hf, seq_length)
    return cfg, family.from_hf(read_hf_state(folder), cfg), family
