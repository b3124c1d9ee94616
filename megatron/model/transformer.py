"""One decoder layer: norm, attention (fused QKV, GQA, RoPE), norm, MLP (GeLU or SwiGLU).

Local tensors are fused for speed; their piece maps point at canonical, unfused
q, k, v, gate and up tensors so a TP change cannot scramble them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.parallel_state import Topology
from megatron.core.pieces import CanonicalSpec, whole_piece
from megatron.core.tensor_parallel import (ColumnParallelLinear, OutputSegment, RowParallelLinear,
                                           make_param, shard_or_raise)
from megatron.model.config import ModelConfig


class Norm(nn.Module):
    """LayerNorm or RMSNorm; a replica on every TP rank (TP rank 0 owns it)."""

    def __init__(self, name: str, cfg: ModelConfig, topo: Topology, seed: int) -> None:
        super().__init__()
        self.kind, self.eps = cfg.normalization, cfg.layernorm_epsilon
        h, owner = cfg.hidden_size, topo.tp_rank == 0
        w = CanonicalSpec(f"{name}.weight", (h,), "ones", weight_decay=False)
        self.weight = make_param((h,), [whole_piece(w, owner)], [w], seed, replicated_over=("tp",))
        self.bias = None
        if self.kind == "layernorm":
            b = CanonicalSpec(f"{name}.bias", (h,), "zeros", weight_decay=False)
            self.bias = make_param((h,), [whole_piece(b, owner)], [b], seed, replicated_over=("tp",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rmsnorm":
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def _linear_specs(name: str, out_f: int, in_f: int, std: float, bias: bool) -> tuple[CanonicalSpec, CanonicalSpec | None]:
    w = CanonicalSpec(f"{name}.weight", (out_f, in_f), "normal", std)
    b = CanonicalSpec(f"{name}.bias", (out_f,), "zeros", weight_decay=False) if bias else None
    return w, b


def rope_cos_sin(seq: int, dim: int, base: float, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    angles = torch.outer(torch.arange(seq, dtype=torch.float32, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the rotate-half convention (as Llama in transformers)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, prefix: str, cfg: ModelConfig, topo: Topology, seed: int) -> None:
        super().__init__()
        self.cfg, hd, h = cfg, cfg.head_dim, cfg.hidden_size
        heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
        std, bias = cfg.init_method_std, cfg.add_bias_linear
        q_w, q_b = _linear_specs(f"{prefix}.q", heads * hd, h, std, bias)
        k_w, k_b = _linear_specs(f"{prefix}.k", kv * hd, h, std, bias)
        v_w, v_b = _linear_specs(f"{prefix}.v", kv * hd, h, std, bias)
        q_start, q_len = shard_or_raise(heads * hd, topo, q_w.name)
        self.local_heads = heads // topo.tp
        if kv >= topo.tp:
            kv_start, kv_len = shard_or_raise(kv * hd, topo, k_w.name)
            owner, slot = True, None
            self.local_kv = kv // topo.tp
        else:  # fewer KV heads than TP ranks: each rank repeats the KV head of its query heads
            repeat = topo.tp // kv
            head = topo.tp_rank // repeat
            kv_start, kv_len = head * hd, hd
            owner, slot = topo.tp_rank % repeat == 0, (head, kv)
            self.local_kv = 1
        self.qkv = ColumnParallelLinear(h, [
            OutputSegment(q_w, q_b, q_start, q_len),
            OutputSegment(k_w, k_b, kv_start, kv_len, owner, slot),
            OutputSegment(v_w, v_b, kv_start, kv_len, owner, slot),
        ], topo, seed)
        d_w, d_b = _linear_specs(f"{prefix}.dense", h, heads * hd, std / math.sqrt(2 * cfg.num_layers), bias)
        self.dense = RowParallelLinear(d_w, d_b, topo, seed)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        b, s, _ = x.shape
        hd = self.cfg.head_dim
        qkv = self.qkv(x)
        q, k, v = qkv.split([self.local_heads * hd, self.local_kv * hd, self.local_kv * hd], dim=-1)
        q = q.view(b, s, self.local_heads, hd).transpose(1, 2)
        k = k.view(b, s, self.local_kv, hd).transpose(1, 2)
        v = v.view(b, s, self.local_kv, hd).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.local_kv != self.local_heads:
            rep = self.local_heads // self.local_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        p = self.cfg.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.dense(out.transpose(1, 2).reshape(b, s, self.local_heads * hd))


class MLP(nn.Module):
    def __init__(self, prefix: str, cfg: ModelConfig, topo: Topology, seed: int) -> None:
        super().__init__()
        h, f, std, bias = cfg.hidden_size, cfg.ffn_hidden_size, cfg.init_method_std, cfg.add_bias_linear
        start, length = shard_or_raise(f, topo, f"{prefix} ffn")
        self.swiglu = cfg.swiglu
        if cfg.swiglu:
            names = (f"{prefix}.gate", f"{prefix}.up")
        else:
            names = (f"{prefix}.fc1",)
        segments = [OutputSegment(*_linear_specs(n, f, h, std, bias), start, length) for n in names]
        self.fc1 = ColumnParallelLinear(h, segments, topo, seed)
        w2, b2 = _linear_specs(f"{prefix}.fc2", h, f, std / math.sqrt(2 * cfg.num_layers), bias)
        self.fc2 = RowParallelLinear(w2, b2, topo, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc1(x)
        if self.swiglu:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        else:
            y = F.gelu(y)
        return self.fc2(y)


class TransformerLayer(nn.Module):
    """Pre-norm decoder layer; ``index`` is global, so canonical names do not depend on PP."""

    def __init__(self, index: int, cfg: ModelConfig, topo: Topology, seed: int) -> None:
        super().__init__()
        prefix = f"layers.{index}"
        self.dropout = cfg.hidden_dropout
        self.input_norm = Norm(f"{prefix}.input_norm", cfg, topo, seed)
        self.attention = Attention(f"{prefix}.attention", cfg, topo, seed)
        self.post_attention_norm = Norm(f"{prefix}.post_attention_norm", cfg, topo, seed)
        self.mlp = MLP(f"{prefix}.mlp", cfg, topo, seed)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + F.dropout(self.attention(self.input_norm(x), rope), self.dropout, self.training)
        return x + F.dropout(self.mlp(self.post_attention_norm(x)), self.dropout, self.training)
