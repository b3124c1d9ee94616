"""One decoder layer: norm, attention (fused QKV, GQA, RoPE or ALiBi), norm, MLP (GeLU or SwiGLU).

Local tensors are fused for speed; their piece maps point at canonical, unfused
q, k, v, gate and up tensors so a TP change cannot scramble them.
"""
from __future__ import annotations

import dataclasses
import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.documents import document_causal_mask, same_document
from megatron.core.dropout import DropoutRNG
from megatron.core.parallel_state import Topology
from megatron.core.pieces import CanonicalSpec, whole_piece
from megatron.core.ring_attention import Ring, ring_attention
from megatron.core.sequence_layout import SequenceLayout
from megatron.core.tensor_parallel import (ColumnParallelLinear, OutputSegment, RowParallelLinear,
                                           make_param, shard_or_raise)
from megatron.core.tp_sequence_parallel import SequenceParallel
from megatron.core.ulysses import heads_to_seq, seq_to_heads
from megatron.model.config import ModelConfig
from megatron.model.mlp_parts import activate, linear_specs
from megatron.model.moe import MoELayer, MoEStats
from megatron.model.recompute import maybe_recompute


class Norm(nn.Module):
    """LayerNorm or RMSNorm; a replica on every TP rank (TP rank 0 owns it). Under sequence
    parallelism each replica normalises one sequence slice, so their gradients add up over TP."""

    def __init__(self, name: str, cfg: ModelConfig, topo: Topology, seed: int,
                 sp: SequenceParallel = SequenceParallel()) -> None:
        super().__init__()
        self.kind, self.eps = cfg.normalization, cfg.layernorm_epsilon
        h, owner = cfg.hidden_size, topo.tp_rank == 0
        w = CanonicalSpec(f"{name}.weight", (h,), "ones", weight_decay=False)
        self.weight = make_param((h,), [whole_piece(w, owner)], [w], seed, replicated_over=("tp",))
        self.bias = None
        if self.kind == "layernorm":
            b = CanonicalSpec(f"{name}.bias", (h,), "zeros", weight_decay=False)
            self.bias = make_param((h,), [whole_piece(b, owner)], [b], seed, replicated_over=("tp",))
        sp.mark_partial_sum(self.weight)
        sp.mark_partial_sum(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rmsnorm":
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def rope_cos_sin(seq: int, dim: int, base: float, dtype: torch.dtype, device,
                 positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[seq, dim]`` for positions ``0..seq-1`` or the given global ``positions
    [seq]``; ``[b, 1, seq, dim]`` (to broadcast over heads) for per-sample ``positions [b, seq]``
    (``--reset-position-ids``)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    pos = torch.arange(seq, device=device) if positions is None else positions
    angles = pos.to(device=device, dtype=torch.float32)[..., None] * inv_freq
    if angles.dim() == 3:
        angles = angles[:, None]
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
                 dropout_rng: DropoutRNG | None = None, sp: SequenceParallel = SequenceParallel()) -> None:
        super().__init__()
        self.cfg, hd, h = cfg, cfg.head_dim, cfg.hidden_size
        self.index, self.dropout_rng = index, dropout_rng or DropoutRNG(seed)
        heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.sp_group, self.cp_group, self.cp_ranks = topo.group("sp"), topo.group("cp"), topo.group_ranks["cp"]
        self.layout = SequenceLayout.of(topo)
        # Ulysses hands each sp rank 1/S of this TP rank's heads: the global heads its core computes
        self.core_heads = heads // (topo.tp * topo.dims.sp)
        self.head_offset = topo.tp_rank * (heads // topo.tp) + self.layout.sp_rank * self.core_heads
        std, bias = cfg.init_method_std, cfg.add_bias_linear
        q_w, q_b = linear_specs(f"{prefix}.q", heads * hd, h, std, bias)
        k_w, k_b = linear_specs(f"{prefix}.k", kv * hd, h, std, bias)
        v_w, v_b = linear_specs(f"{prefix}.v", kv * hd, h, std, bias)
        q_start, q_len = shard_or_raise(heads * hd, topo, q_w.name)
        self.local_heads = heads // topo.tp
        if cfg.position_embedding_type == "alibi":  # slopes by global head index: this rank's heads
            first = self.head_offset
            self.alibi_slopes = alibi_slopes(heads)[first:first + self.core_heads]  # fp32, not cast with the model
            self._alibi_key, self._alibi_bias = None, None
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
        ], topo, seed, sp)
        d_w, d_b = linear_specs(f"{prefix}.dense", h, heads * hd, std / math.sqrt(2 * cfg.num_layers), bias)
        self.dense = RowParallelLinear(d_w, d_b, topo, seed, sp)
        self.recompute_core = False  # selective recomputation: softmax(QK^T)V again in backward

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        """``segments``: ``[b, S]`` document ids of the whole samples (``--reset-attention-mask``):
        a query attends only to keys of its own document; None for plain causal attention."""
        hd = self.cfg.head_dim
        qkv = self.qkv(x)  # the whole sequence, also when x is a sequence-parallel slice
        b, s, _ = qkv.shape
        q, k, v = qkv.split([self.local_heads * hd, self.local_kv * hd, self.local_kv * hd], dim=-1)
        q = q.view(b, s, self.local_heads, hd).transpose(1, 2)
        k = k.view(b, s, self.local_kv, hd).transpose(1, 2)
        v = v.view(b, s, self.local_kv, hd).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.local_kv % self.layout.sp:  # too few KV heads to split over Ulysses: replicate them first
            k, v = self._repeat_kv(k, self.local_heads), self._repeat_kv(v, self.local_heads)
        q, k, v = (seq_to_heads(t, self.sp_group) for t in (q, k, v))
        k, v = self._repeat_kv(k, self.core_heads), self._repeat_kv(v, self.core_heads)
        out = self._core(q, k, v, segments)
        out = heads_to_seq(out, self.sp_group)
        return self.dense(out.transpose(1, 2).reshape(b, s, self.local_heads * hd))

    @staticmethod
    def _repeat_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
        """GQA: repeat each of ``t``'s KV heads for the query heads of its group (``heads`` in all)."""
        return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              segments: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention of this rank's heads over the sequence of its cp rank (the ring adds the rest)."""
        p = self.cfg.attention_dropout if self.training else 0.0
        alibi = self.cfg.position_embedding_type == "alibi"
        if self.layout.cp > 1:
            return ring_attention(q, k, v, self._ring(q, p, alibi, segments))
        s = q.shape[-2]  # the whole sample: Ulysses and Megatron-SP gather it before attention
        bias = self._alibi(s, q.dtype, q.device) if alibi else None
        if segments is not None:  # the additive form holds the causal and document masks as -inf
            allowed = document_causal_mask(segments)
            bias = (bias if bias is not None else q.new_zeros(s, s)).masked_fill(~allowed, float("-inf"))
        if p > 0:
            core = partial(self._dropout_attention, p=p, bias=bias)
        elif bias is not None:
            core = partial(F.scaled_dot_product_attention, attn_mask=bias)
        else:
            core = partial(F.scaled_dot_product_attention, is_causal=True)
        return maybe_recompute(self.recompute_core, core, q, k, v)

    def _ring(self, q: torch.Tensor, p: float, alibi: bool, segments: torch.Tensor | None) -> Ring:
        b, heads, s, _ = q.shape
        seq = s * self.layout.cp
        rng = dataclasses.replace(self.dropout_rng)  # backward may run after the next micro-batch's forward
        slopes = self.alibi_slopes.to(q.device)[:, None, None] if alibi else None

        def bias(qp: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
            """ALiBi's ``[heads, q, k]`` and the document mask's ``[b, 1, q, k]`` (0 or -inf)."""
            out = slopes * (kp[None, :] - qp[:, None]).float() if alibi else torch.zeros((), device=q.device)
            if segments is not None:
                out = out.masked_fill(~same_document(segments, qp, kp), float("-inf"))
            return out

        return Ring(
            self.cp_group, self.cp_ranks, self.layout.cp_rank,
            [self.layout.cp_positions(seq, r, q.device) for r in range(self.layout.cp)],
            bias=bias if alibi or segments is not None else None,
            keep=(lambda qp, kp: rng.attention_keep(b, heads, qp, kp, seq, p, self.index, self.head_offset,
                                                    self.cfg.num_attention_heads)) if p > 0 else None,
            dropout=p)

    def _alibi(self, seq: int, dtype: torch.dtype, device) -> torch.Tensor:
        """This rank's ALiBi bias, made once per (length, dtype, device) rather than every step."""
        key = (seq, dtype, device)
        if self._alibi_key != key:
            self._alibi_key, self._alibi_bias = key, alibi_bias(self.alibi_slopes, seq, dtype, device)
        return self._alibi_bias

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
    """Column-parallel fc1 (or fused gate/up), row-parallel fc2; ``ffn_hidden_size`` overrides the
    model's (an MoE layer's shared expert)."""

    def __init__(self, prefix: str, cfg: ModelConfig, topo: Topology, seed: int,
                 ffn_hidden_size: int | None = None, sp: SequenceParallel = SequenceParallel()) -> None:
        super().__init__()
        h, std, bias = cfg.hidden_size, cfg.init_method_std, cfg.add_bias_linear
        f = ffn_hidden_size or cfg.ffn_hidden_size
        start, length = shard_or_raise(f, topo, f"{prefix} ffn")
        self.swiglu = cfg.swiglu
        self.gelu_approximate = "tanh" if cfg.openai_gelu else "none"
        if cfg.swiglu:
            names = (f"{prefix}.gate", f"{prefix}.up")
        else:
            names = (f"{prefix}.fc1",)
        segments = [OutputSegment(*linear_specs(n, f, h, std, bias), start, length) for n in names]
        self.fc1 = ColumnParallelLinear(h, segments, topo, seed, sp)
        w2, b2 = linear_specs(f"{prefix}.fc2", h, f, std / math.sqrt(2 * cfg.num_layers), bias)
        self.fc2 = RowParallelLinear(w2, b2, topo, seed, sp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(activate(self.fc1(x), self.swiglu, self.gelu_approximate))


class TransformerLayer(nn.Module):
    """Pre-norm decoder layer; ``index`` is global, so canonical names do not depend on PP.
    Under sequence parallelism ``x`` is this TP rank's sequence slice outside the matmuls."""

    def __init__(self, index: int, cfg: ModelConfig, topo: Topology, seed: int,
                 dropout_rng: DropoutRNG | None = None, moe_stats: MoEStats | None = None,
                 sp: SequenceParallel = SequenceParallel()) -> None:
        super().__init__()
        prefix = f"layers.{index}"
        self.index, self.dropout, self.sp = index, cfg.hidden_dropout, sp
        self.dropout_rng = dropout_rng or DropoutRNG(seed)
        self.input_norm = Norm(f"{prefix}.input_norm", cfg, topo, seed, sp)
        self.attention = Attention(f"{prefix}.attention", cfg, topo, seed, index, self.dropout_rng, sp)
        self.post_attention_norm = Norm(f"{prefix}.post_attention_norm", cfg, topo, seed, sp)
        if cfg.moe is not None and index in cfg.moe.layers:
            if sp.enabled:
                raise ValueError("--sequence-parallel with MoE layers (--num-experts) is not supported: the "
                                 "router needs the whole sequence; leave out --sequence-parallel")
            shared = cfg.moe.shared_expert_ffn_hidden_size
            shared_expert = MLP(f"{prefix}.mlp.shared_expert", cfg, topo, seed, shared) if shared else None
            self.mlp = MoELayer(f"{prefix}.mlp", index, cfg, topo, seed, moe_stats or MoEStats(cfg.moe),
                                shared_expert)
        else:
            self.mlp = MLP(f"{prefix}.mlp", cfg, topo, seed, sp=sp)

    def units(self) -> list[tuple[object, str, list[torch.nn.Parameter]]]:
        """ZeRO-3 units (see ``GPTModel.units``): the layer, and its experts apart (another ZeRO group)."""
        inner = self.mlp.expert_units() if isinstance(self.mlp, MoELayer) else []
        apart = {id(p) for _, _, params in inner for p in params}
        return [(self, "forward", [p for p in self.parameters() if id(p) not in apart]), *inner]

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                segments: torch.Tensor | None = None) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        local = x.shape[1]
        where = self.sp.dropout_window(local)  # global positions for the masks
        x = x + self.dropout_rng.hidden(self.attention(self.input_norm(x), rope, segments), p, self.index,
                                        "attention_out", *where)
        return x + self.dropout_rng.hidden(self.mlp(self.post_attention_norm(x)), p, self.index, "mlp_out", *where)
