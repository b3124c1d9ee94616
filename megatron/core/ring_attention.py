"""Ring attention for context parallelism: K/V blocks travel around the ``cp`` group.

Each rank keeps its queries; at step ``i`` it holds the K/V block of cp rank ``(r - i) mod C``,
sends it on to the next rank and receives the following one (``batch_isend_irecv``, so NCCL
never deadlocks) while it computes with the current one. Blocks are combined exactly by
log-sum-exp. The causal mask (and an ALiBi bias, and attention dropout) come from the global
positions of the block's queries and keys, so any sequence order is masked correctly. Every
block pair is computed whole and then masked: blocks that the causal mask empties are not
skipped, so the ring does up to twice the attention FLOPs of a block-skipping one.

Backward recomputes every block's probabilities from the saved log-sum-exp; the gradients of a
K/V block ride around the ring with it and reach their owner after ``C`` hops.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

BlockFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Ring:
    """The cp group as the ring sees it, and what shapes a block's scores."""

    group: object
    ranks: list[int]  # global ranks of the cp group, in cp order
    rank: int  # this rank's cp index
    positions: list[torch.Tensor]  # global positions of the queries / keys each cp rank holds
    bias: BlockFn | None = None  # (q_pos, k_pos) -> additive score bias [heads, q, k] (ALiBi)
    keep: BlockFn | None = None  # (q_pos, k_pos) -> dropout keep mask [b, heads, q, k]
    dropout: float = 0.0

    @property
    def size(self) -> int:
        return len(self.ranks)

    def source(self, step: int) -> int:
        return (self.rank - step) % self.size

    def shift(self, tensors: torch.Tensor) -> "_Transfer":
        """Start sending ``tensors`` to the next rank and receiving the previous rank's."""
        got = torch.empty_like(tensors)
        ops = [dist.P2POp(dist.isend, tensors, self.ranks[(self.rank + 1) % self.size], self.group),
               dist.P2POp(dist.irecv, got, self.ranks[(self.rank - 1) % self.size], self.group)]
        return _Transfer(tensors, got, dist.batch_isend_irecv(ops))


@dataclass
class _Transfer:
    """One ring hop in flight; holds the sent buffer until the hop completes."""

    sent: torch.Tensor
    got: torch.Tensor
    requests: list

    def wait(self) -> torch.Tensor:
        for r in self.requests:
            r.wait()
        return self.got


def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulate in fp32 at least (fp64 inputs stay fp64)."""
    return torch.promote_types(t.dtype, torch.float32)


def _scores(ring: Ring, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    s = (q.to(_acc(q)) @ k.to(_acc(q)).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if ring.bias is not None:
        s = s + ring.bias(q_pos, k_pos).to(s.dtype)
    return s.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))


def _probs(ring: Ring, s: torch.Tensor, lse: torch.Tensor, q_pos, k_pos) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax probabilities of a block given the row log-sum-exp, and the dropout factor."""
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1))
    if ring.keep is None or ring.dropout <= 0:
        return p, None
    return p, ring.keep(q_pos, k_pos).to(p.dtype) / (1.0 - ring.dropout)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring: Ring):
        q_pos = ring.positions[ring.rank]
        kv = torch.stack([k, v])
        out = torch.zeros(q.shape, dtype=_acc(q), device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=_acc(q), device=q.device)
        for step in range(ring.size):
            hop = ring.shift(kv) if step < ring.size - 1 else None
            k_pos = ring.positions[ring.source(step)]
            s = _scores(ring, q, kv[0], q_pos, k_pos)
            block_lse = torch.logsumexp(s, dim=-1)
            p, drop = _probs(ring, s, block_lse, q_pos, k_pos)
            block_out = (p if drop is None else p * drop) @ kv[1].to(p.dtype)
            new_lse = torch.logaddexp(lse, block_lse)
            safe = new_lse.masked_fill(torch.isinf(new_lse), 0.0)
            out = out * torch.exp(lse - safe).unsqueeze(-1) + block_out * torch.exp(block_lse - safe).unsqueeze(-1)
            lse = new_lse
            if hop is not None:
                kv = hop.wait()
        ctx.ring = ring
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        ring: Ring = ctx.ring
        q, k, v, out, lse = ctx.saved_tensors
        q_pos, acc = ring.positions[ring.rank], _acc(q)
        g = grad_out.to(acc)
        delta = (g * out.to(acc)).sum(-1, keepdim=True)  # rowsum(dO * O), dropout included
        scale = 1.0 / math.sqrt(q.shape[-1])
        kv, dq = torch.stack([k, v]), torch.zeros_like(q, dtype=acc)
        carried: _Transfer | None = None  # the block's gradient accumulated by the ranks before this one
        for step in range(ring.size):
            hop = ring.shift(kv) if step < ring.size - 1 else None
            k_pos = ring.positions[ring.source(step)]
            kb, vb = kv[0].to(acc), kv[1].to(acc)
            p, drop = _probs(ring, _scores(ring, q, kv[0], q_pos, k_pos), lse, q_pos, k_pos)
            dp = g @ vb.transpose(-1, -2)
            dv = (p if drop is None else p * drop).transpose(-1, -2) @ g
            ds = p * ((dp if drop is None else dp * drop) - delta) * scale
            dq += ds @ kb
            dkv = torch.stack([ds.transpose(-1, -2) @ q.to(acc), dv])
            if carried is not None:
                dkv += carried.wait()
            carried = ring.shift(dkv)  # overlaps the next block's compute
            if hop is not None:
                kv = hop.wait()
        dk, dv = carried.wait()  # after C hops the gradient of this rank's own block is back
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: Ring) -> torch.Tensor:
    """Causal attention of ``[b, heads, s_local, d]`` queries against the keys of the whole cp group."""
    return _RingAttention.apply(q, k, v, ring)
