"""Which tokens of each sample a rank holds under Ulysses (``sp``) and ring context parallelism (``cp``).

The sequence is first cut for the ring: into ``2 * cp`` equal chunks, cp rank ``i`` holding chunks
``i`` and ``2*cp-1-i`` (so every rank does the same share of causal-attention work); then the cp
rank's tokens are cut into ``sp`` contiguous slices, one per Ulysses rank (Ulysses inside, ring
outside). Positions here are global: RoPE, learned position embeddings, causal masks and dropout
counters all use them, so the numbers do not depend on the split.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron.core.parallel_state import Topology


def check_sequence_split(seq_length: int, num_heads: int, tp: int, sp: int, cp: int) -> None:
    """Refuse a sequence or head count that the Ulysses / ring split cannot divide."""
    if num_heads % (tp * sp):
        raise ValueError(f"--num-attention-heads {num_heads} is not divisible by --tensor-model-parallel-size {tp} "
                         f"x --ds-sequence-parallel-size {sp} = {tp * sp}: Ulysses gives each rank whole heads; "
                         f"choose sizes whose product divides the head count")
    chunks = sp * (2 * cp if cp > 1 else 1)
    if seq_length % chunks:
        what = f"--ds-sequence-parallel-size {sp}" + (f" x 2 x --context-parallel-size {cp}" if cp > 1 else "")
        raise ValueError(f"--seq-length {seq_length} is not divisible by {what} = {chunks}: each rank holds an "
                         f"equal slice of every sample; use a sequence length that is a multiple of {chunks}")


@dataclass(frozen=True)
class SequenceLayout:
    """This rank's place on the two sequence axes."""

    sp: int = 1
    sp_rank: int = 0
    cp: int = 1
    cp_rank: int = 0

    @staticmethod
    def of(topo: Topology) -> "SequenceLayout":
        return SequenceLayout(topo.dims.sp, topo.coords["sp"], topo.dims.cp, topo.coords["cp"])

    @property
    def splits(self) -> int:
        return self.sp * self.cp

    def cp_positions(self, seq: int, cp_rank: int, device=None) -> torch.Tensor:
        """Global positions held by the ``sp`` ranks of ``cp_rank`` together, in their order."""
        if self.cp == 1:
            return torch.arange(seq, device=device)
        chunk = seq // (2 * self.cp)
        first, second = cp_rank * chunk, (2 * self.cp - 1 - cp_rank) * chunk
        return torch.cat([torch.arange(first, first + chunk, device=device),
                          torch.arange(second, second + chunk, device=device)])

    def positions(self, local: int, device=None) -> torch.Tensor:
        """Global positions of this rank's ``local`` tokens of a sample."""
        if self.splits == 1:
            return torch.arange(local, device=device)
        ring = self.cp_positions(local * self.splits, self.cp_rank, device)
        return ring[self.sp_rank * local:(self.sp_rank + 1) * local]

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's tokens of ``[batch, seq]`` samples (every rank of a replica reads the same samples)."""
        if self.splits == 1:
            return t.contiguous()
        return t[:, self.positions(t.shape[1] // self.splits, t.device)].contiguous()
