"""Documents inside one training sample: Megatron's ``--reset-position-ids``,
``--reset-attention-mask`` and ``--eod-mask-loss`` (its ``get_ltor_masks_and_position_ids``).

A sample is a window of the token stream, so it may hold the end of one document, an EOD
token and the start of the next. Token ``j`` belongs to document ``seg[j]`` = the number of
EOD tokens before ``j`` (an EOD closes its own document). With the flags on, positions
restart at 0 after every EOD, a token attends only to earlier tokens of its own document,
and the loss skips the positions whose input token is an EOD (the jump to the next document).
Everything is a function of the input tokens, so every pipeline stage derives the same masks
from the micro-batch it already holds and no mask travels between stages.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DocumentLayout:
    """What the model and the loss need of a micro-batch's documents; ``None``: the default
    (positions ``0..s-1``, causal attention over the whole sample, every token in the loss)."""

    position_ids: torch.Tensor | None = None  # [b, s] int64
    segment_ids: torch.Tensor | None = None  # [b, s] int64: attention stays within equal ids
    loss_mask: torch.Tensor | None = None  # [b, s] float: 1 where the token's loss counts

    def attention_mask(self) -> torch.Tensor | None:
        """``[b, 1, s, s]`` bool, True where a query may attend to a key (causal and the same
        document); None for plain causal attention."""
        if self.segment_ids is None:
            return None
        seg = self.segment_ids
        s = seg.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=seg.device).tril()
        return (causal & (seg[:, :, None] == seg[:, None, :]))[:, None]


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
        """The layout of input tokens ``[b, s]``; None when no flag is on."""
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
        return DocumentLayout(
            position_ids=positions,
            segment_ids=seg if self.reset_attention_mask else None,
            loss_mask=(~is_eod).float() if self.eod_mask_loss else None)
