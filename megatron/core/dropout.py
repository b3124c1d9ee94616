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
from dataclasses import dataclass

import torch

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
    """The coordinates a layer cannot know by itself: the seed, the iteration being trained
    and the global index of the micro-batch's first sample (set by the schedule)."""

    seed: int
    iteration: int = 0
    first_sample: int = 0

    def key(self, layer: int, site: str) -> tuple[int, int]:
        return _key(self.seed, self.iteration, layer, SITES[site])

    def hidden(self, x: torch.Tensor, p: float, layer: int, site: str, seq_start: int = 0,
               seq_length: int | None = None) -> torch.Tensor:
        """Dropout on ``[batch, seq, hidden]`` activations whose hidden axis is whole. ``x`` may
        hold positions ``[seq_start, seq_start + x.shape[1])`` of a sequence of ``seq_length``
        (a sequence-parallel slice): the mask is that slice of the whole sequence's mask."""
        if p <= 0.0:
            return x
        b, s, h = x.shape
        total = s if seq_length is None else seq_length
        dev = x.device
        counters = ((torch.arange(b, device=dev).view(b, 1, 1) + self.first_sample) * total
                    + torch.arange(seq_start, seq_start + s, device=dev).view(1, s, 1)) * h \
            + torch.arange(h, device=dev).view(1, 1, h)
        return x * keep_mask(counters, self.key(layer, site), p).to(x.dtype) * (1.0 / (1.0 - p))

    def attention(self, probs: torch.Tensor, p: float, layer: int, head_offset: int, num_heads: int) -> torch.Tensor:
        """Dropout on attention probabilities ``[batch, local heads, q, k]``; local head ``i`` is
        global head ``head_offset + i`` of ``num_heads``."""
        if p <= 0.0:
            return probs
        b, hl, q, k = probs.shape
        dev = probs.device
        sample = torch.arange(b, device=dev).view(b, 1, 1, 1) + self.first_sample
        head = torch.arange(hl, device=dev).view(1, hl, 1, 1) + head_offset
        counters = ((sample * num_heads + head) * q + torch.arange(q, device=dev).view(1, 1, q, 1)) * k \
            + torch.arange(k, device=dev).view(1, 1, 1, k)
        keep = keep_mask(counters, self.key(layer, "attention"), p)
        return probs * keep.to(probs.dtype) * (1.0 / (1.0 - p))


def begin_micro_batch(model: torch.nn.Module, first_sample: int) -> None:
    """Tell the model's dropout which global sample its next forward starts at."""
    rng = getattr(model, "dropout_rng", None)
    if rng is not None:
        rng.first_sample = first_sample
