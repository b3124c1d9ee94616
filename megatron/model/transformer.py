"""One decoder layer: norm, attention (fused QKV, GQA, RoPE or ALiBi), norm, MLP (GeLU or SwiGLU).

Local tensors are fused for speed; their piece maps point at canonical, unfused
q, k, v, gate and up tensors so a TP change cannot scramble them.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.dropout import DropoutRNG
from megatron.core.parallel_state import Topology
from megatron.core.pieces import CanonicalSpec, whole_piece
from megatron.core.tensor_parallel import (ColumnParallelLinear, OutputSegment, RowParallelLinear,
                                           make_param, shard_or_raise)
from megatron.model.config import ModelConfig
from megatron.model.recompute import maybe_recompute


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


def rope_cos_sin(seq: int, dim: int, base: float, dtype: torch.dtype, device,
                 positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[seq, dim]`` for positions ``0..seq-1``, or ``[b, 1, seq, dim]`` (to
    broadcast over heads) for per-sample ``positions [b, seq]`` (``--reset-position-ids``)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    if positions is None:
        angles = torch.outer(torch.arange(seq, dtype=torch.float32, device=device), inv_freq)
    else:
        angles = (positions.to(torch.float32)[..., None] * inv_freq)[:, None]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the rotate-half convention (as Llama in transformers)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al.; BLOOM's recipe for head counts that are not a
    power of two: the power-of-two slopes, then every other slope of the next power)."""
    def powers(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = powers(closest) + powers(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, seq: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Causal attention bias ``[heads, seq, seq]``: slope * (key - query) where a query may look,
    -inf elsewhere. Softmax ignores a per-row constant, so this equals BLOOM's slope * key."""
    pos = torch.arange(seq, device=device)
    distance = (pos[None, :] - pos[:, None]).float()
    bias = slopes.to(device)[:, None, None] * distance
    return bias.masked_fill(distance > 0, float("-inf")).to(dtype)


class Attention(nn.Module):
    def __init__(self, prefix: str, cfg: ModelConfig, topo: Topology, seed: int, index: int = 0,
                 dropout_rng: DropoutRNG | None = None) -> None:
        super().__init__()
        self.cfg, hd, h = cfg, cfg.head_dim, cfg.hidden_size
        self.index, self.dropout_rng = index, dropout_rng or DropoutRNG(seed)
        self.head_offset = topo.tp_rank * (cfg.num_attention_heads // topo.tp)
        heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
        std, bias = cfg.init_method_std, cfg.add_bias_linear
        q_w, q_b = _linear_specs(f"{prefix}.q", heads * hd, h, std, bias)
        k_w, k_b = _linear_specs(f"{prefix}.k", kv * hd, h, std, bias)
        v_w, v_b = _linear_specs(f"{prefix}.v", kv * hd, h, std, bias)
        q_start, q_len = shard_or_raise(heads * hd, topo, q_w.name)
        self.local_heads = heads // topo.tp
        if cfg.position_embedding_type == "alibi":  # slopes by global head index: this rank's heads
            first = topo.tp_rank * self.local_heads
            self.alibi_slopes = alibi_slopes(heads)[first:first + self.local_heads]  # fp32, not cast with the model
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
        self.recompute_core = False  # selective recomputation: softmax(QK^T)V again in backward

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask``: ``[b, 1, s, s]`` bool, True where a query may attend (``--reset-attention-mask``);
        None for plain causal attention (SDPA's causal kernel)."""
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
        bias = alibi_bias(self.alibi_slopes, s, q.dtype, q.device) \
            if self.cfg.position_embedding_type == "alibi" else None
        if mask is not None:  # the additive form holds the causal and document masks as -inf
            bias = (bias if bias is not None else q.new_zeros(s, s)).masked_fill(~mask, float("-inf"))
        if p > 0:
            core = partial(self._dropout_attention, p=p, bias=bias)
        elif bias is not None:
            core = partial(F.scaled_dot_product_attention, attn_mask=bias)
        else:
            core = partial(F.scaled_dot_product_attention, is_causal=True)
        out = maybe_recompute(self.recompute_core, core, q, k, v)
        return self.dense(out.transpose(1, 2).reshape(b, s, self.local_heads * hd))

    def _dropout_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention whose probability dropout is keyed by global head (see core.dropout).
        ``bias`` (ALiBi, document masks) already holds the causal mask as -inf."""
        s = q.shape[-2]
        scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
        if bias is None:
            causal = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(causal, float("-inf"))
        else:
            scores = scores + bias.float()
        probs = scores.softmax(-1).to(q.dtype)
        probs = self.dropout_rng.attention(probs, p, self.index, self.head_offset, self.cfg.num_attention_heads)
        return probs @ v


class MLP(nn.Module):
    def __init__(self, prefix: str, cfg: ModelConfig, topo: Topology, seed: int) -> None:
        super().__init__()
        h, f, std, bias = cfg.hidden_size, cfg.ffn_hidden_size, cfg.init_method_std, cfg.add_bias_linear
        start, length = shard_or_raise(f, topo, f"{prefix} ffn")
        self.swiglu = cfg.swiglu
        self.gelu_approximate = "tanh" if cfg.openai_gelu else "none"
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
            y = F.gelu(y, approximate=self.gelu_approximate)
        return self.fc2(y)


class TransformerLayer(nn.Module):
    """Pre-norm decoder layer; ``index`` is global, so canonical names do not depend on PP."""

    def __init__(self, index: int, cfg: ModelConfig, topo: Topology, seed: int,
                 dropout_rng: DropoutRNG | None = None) -> None:
        super().__init__()
        prefix = f"layers.{index}"
        self.index, self.dropout = index, cfg.hidden_dropout
        self.dropout_rng = dropout_rng or DropoutRNG(seed)
        self.input_norm = Norm(f"{prefix}.input_norm", cfg, topo, seed)
        self.attention = Attention(f"{prefix}.attention", cfg, topo, seed, index, self.dropout_rng)
        self.post_attention_norm = Norm(f"{prefix}.post_attention_norm", cfg, topo, seed)
        self.mlp = MLP(f"{prefix}.mlp", cfg, topo, seed)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        x = x + self.dropout_rng.hidden(self.attention(self.input_norm(x), rope, mask), p, self.index,
                                        "attention_out")
        return x + self.dropout_rng.hidden(self.mlp(self.post_attention_norm(x)), p, self.index, "mlp_out")
