"""Documents inside one training sample: Megatron's ``--reset-position-ids``,
``--reset-attention-mask`` and ``--eod-mask-loss`` (its ``get_ltor_masks_and_position_ids``).

A sample is a window of the token stream, so it may hold the end of one document, an EOD
token and the start of the next. Token ``j`` belongs to document ``seg[j]`` = the number of
EOD tokens before ``j`` (an EOD closes its own document). With the flags on, positions
restart at 0 after every EOD, a token attends only to earlier tokens of its own document,
and the loss skips the positions whose input token is an EOD (the jump to the next document).
Everything is a function of the input tokens, so every pipeline stage derives the same masks
from the micro-batch it already holds and no mask travels between stages.

The layout is derived from the whole sample, then cut like the tokens when Ulysses or ring
context parallelism splits the sequence: positions and the loss mask follow this rank's tokens,
the document ids stay whole (attention compares a query's document with every key's), and the
count of loss-bearing tokens is that of the whole micro-batch, the same on every rank of a
replica.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch


@dataclass(frozen=True)
class DocumentLayout:
    """What the model and the loss need of a micro-batch's documents; ``None``: the default
    (positions ``0..s-1``, causal attention over the whole sample, every token in the loss)."""

    position_ids: torch.Tensor | None = None  # [b, s] int64, aligned with the rank's tokens
    segment_ids: torch.Tensor | None = None  # [b, S] int64 of the whole sample: attention stays within equal ids
    loss_mask: torch.Tensor | None = None  # [b, s] float, aligned with the rank's labels: 1 where the loss counts
    loss_tokens: int = 0  # loss-bearing tokens of the whole micro-batch (with loss_mask)

    def sharded(self, shard: Callable[[torch.Tensor], torch.Tensor]) -> "DocumentLayout":
        """This rank's share, ``shard`` cutting ``[b, S]`` as the tokens are cut."""
        return replace(self, position_ids=None if self.position_ids is None else shard(self.position_ids),
                       loss_mask=None if self.loss_mask is None else shard(self.loss_mask))


def same_document(segment_ids: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """``[b, 1, q, k]`` bool: True where the query at global position ``q_pos`` and the key at
    ``k_pos`` belong to the same document (the causal mask is applied apart)."""
    return (segment_ids[:, q_pos, None] == segment_ids[:, None, k_pos])[:, None]


def document_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """``[b, 1, S, S]`` bool, True where a query may attend to a key: causal and the same document."""
    s = segment_ids.shape[1]
    pos = torch.arange(s, device=segment_ids.device)
    return torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril() & same_document(segment_ids, pos, pos)


@dataclass(frozen=True)
class DocumentMasking:
    """The three flags and the tokenizer's end-of-document id."""

    eod: int
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False

    @property
    def enabled(self) -> bool:
        return self.reset_position_ids or self.reset_attention_mask or self.eod_mask_loss

    def layout(self, tokens: torch.Tensor) -> DocumentLayout | None:
        """The layout of whole input samples ``[b, S]``; None when no flag is on."""
        if not self.enabled:
            return None
        is_eod = tokens == self.eod
        seg = torch.cumsum(is_eod.long(), dim=1) - is_eod.long()
        positions = None
        if self.reset_position_ids:
            j = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
            starts = torch.zeros_like(is_eod)
            starts[:, 1:] = is_eod[:, :-1]
            starts[:, 0] = True
            first_of_document = torch.cummax(torch.where(starts, j, torch.zeros_like(j)), dim=1).values
            positions = j - first_of_document
        loss_mask = (~is_eod).float() if self.eod_mask_loss else None
        return DocumentLayout(
            position_ids=positions,
            segment_ids=seg if self.reset_attention_mask else None,
            loss_mask=loss_mask,
            loss_tokens=int((~is_eod).sum()) if self.eod_mask_loss else 0)
