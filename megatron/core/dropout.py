"""Layout-invariant dropout: every mask element is a pure function of (seed, iteration,
layer, site, global sample index, canonical element index).

The generator is counter-based (a keyed 32-bit integer hash, murmur3's finaliser, in
torch integer ops), so the same canonical element gets the same keep/drop decision on
CPU and GPU, on every TP/PP/DP layout and micro-batch count. Replicated activations
(the hidden states every TP rank holds) get identical masks on every rank; sharded ones
use the global index: of the head for attention probabilities split over TP, of the sequence
position for hidden states split along the sequence (Megatron sequence parallelism).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from megatron.core.sequence_layout import SequenceLayout

_M32 = 0xFFFFFFFF
SITES = {"embedding": 0, "attention": 1, "attention_out": 2, "mlp_out": 3}


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3 fmix32 on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def _key(*parts: int) -> tuple[int, int]:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def keep_mask(counters: torch.Tensor, key: tuple[int, int], p: float) -> torch.Tensor:
    """True where the element with canonical counter ``counters`` (int64) is kept."""
    k1, k2 = key
    h = _mix32((counters & _M32) ^ k1)
    h = _mix32(h ^ (((counters >> 32) + k2) & _M32))
    h = _mix32(h ^ k1)
    return h >= int(p * 2 ** 32)


@dataclass
class DropoutRNG:
    """The coordinates a layer cannot know by itself: the seed, the iteration being trained,
    the global index of the micro-batch's first sample (set by the schedule) and which sequence
    positions this rank holds (Ulysses / context parallelism)."""

    seed: int
    iteration: int = 0
    first_sample: int = 0
    layout: SequenceLayout = field(default_factory=SequenceLayout)

    def key(self, layer: int, site: str) -> tuple[int, int]:
        return _key(self.seed, self.iteration, layer, SITES[site])

    def hidden(self, x: torch.Tensor, p: float, layer: int, site: str, seq_start: int = 0,
               seq_length: int | None = None) -> torch.Tensor:
        """Dropout on ``[batch, seq, hidden]`` activations whose hidden axis is whole. ``x`` may hold
        positions ``[seq_start, seq_start + x.shape[1])`` of a sequence of ``seq_length`` (a Megatron
        sequence-parallel slice), or this rank's Ulysses / ring share (``layout``): either way the
        counters use global positions, so the mask is that part of the whole sequence's mask."""
        if p <= 0.0:
            return x
        b, s, h = x.shape
        dev = x.device
        if seq_length is None:
            pos, total = self.layout.positions(s, dev), s * self.layout.splits
        else:
            pos, total = torch.arange(seq_start, seq_start + s, device=dev), seq_length
        counters = ((torch.arange(b, device=dev).view(b, 1, 1) + self.first_sample) * total
                    + pos.view(1, s, 1)) * h + torch.arange(h, device=dev).view(1, 1, h)
        return x * keep_mask(counters, self.key(layer, site), p).to(x.dtype) * (1.0 / (1.0 - p))

    def attention(self, probs: torch.Tensor, p: float, layer: int, head_offset: int, num_heads: int) -> torch.Tensor:
        """Dropout on attention probabilities ``[batch, local heads, q, k]``; local head ``i`` is
        global head ``head_offset + i`` of ``num_heads``."""
        if p <= 0.0:
            return probs
        b, hl, q, k = probs.shape
        dev = probs.device
        keep = self.attention_keep(b, hl, torch.arange(q, device=dev), torch.arange(k, device=dev), q, p, layer,
                                   head_offset, num_heads)
        return probs * keep.to(probs.dtype) * (1.0 / (1.0 - p))

    def attention_keep(self, b: int, hl: int, q_pos: torch.Tensor, k_pos: torch.Tensor, seq: int, p: float,
                       layer: int, head_offset: int, num_heads: int) -> torch.Tensor:
        """Keep mask ``[b, hl, len(q_pos), len(k_pos)]`` for queries and keys at global positions
        ``q_pos`` / ``k_pos`` of ``seq``-token samples (ring attention asks block by block)."""
        dev = q_pos.device
        sample = torch.arange(b, device=dev).view(b, 1, 1, 1) + self.first_sample
        head = torch.arange(hl, device=dev).view(1, hl, 1, 1) + head_offset
        counters = ((sample * num_heads + head) * seq + q_pos.view(1, 1, -1, 1)) * seq + k_pos.view(1, 1, 1, -1)
        return keep_mask(counters, self.key(layer, "attention"), p)


def begin_micro_batch(model: torch.nn.Module, first_sample: int) -> None:
    """Tell the model's dropout which global sample its next forward starts at."""
    rng = getattr(model, "dropout_rng", None)
    if rng is not None:
        rng.first_sample = first_sample
