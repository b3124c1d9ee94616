"""``--overlap-grad-reduce`` for ZeRO stages 0-1: each all-reduce bucket of a parameter
group's flat fp32 gradient accumulator starts, asynchronously, from the backward hook of
the last parameter that completes it, so the reduction runs while autograd keeps going.

A parameter is complete after its gradient hook fired once per micro-batch of the step
(``expect``). The buckets are the very slices the non-overlapped path reduces, filled
with the same values (row partials summed first, per parameter), so the result is
bit-identical; only the launch time changes. Hooks fire in the same order on every rank
of a group, so the collectives match across ranks (on NCCL too).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn


class BucketLauncher:
    """The buckets of one flat accumulator ``flat`` (fixed ``bucket_numel`` slices) and which
    parameters each one waits for. ``prepare(p)`` runs on a parameter's final gradient before
    its buckets may start (the row-partial sum over TP)."""

    def __init__(self, flat: torch.Tensor, params: list[nn.Parameter], bucket_numel: int, group,
                 prepare: Callable[[nn.Parameter], None]) -> None:
        self.flat, self.group, self.prepare = flat, group, prepare
        self.bounds = [(s, min(s + bucket_numel, flat.numel())) for s in range(0, flat.numel(), bucket_numel)]
        self.buckets_of: dict[int, list[int]] = {}
        self.params = params
        self.waits_for = [0] * len(self.bounds)
        offset = 0
        for p in params:
            first, last = offset // bucket_numel, max(offset, offset + p.numel() - 1) // bucket_numel
            touched = list(range(first, last + 1)) if p.numel() else []
            self.buckets_of[id(p)] = touched
            for b in touched:
                self.waits_for[b] += 1
            offset += p.numel()
        self.expect(0)

    def expect(self, backwards: int) -> None:
        """Start a step whose every parameter receives ``backwards`` gradients (0: launch
        nothing from hooks, reduce everything in ``finish``)."""
        self.backwards = backwards
        self.seen = dict.fromkeys(self.buckets_of, 0)
        self.prepared: set[int] = set()
        self.remaining = list(self.waits_for)
        self.handles: dict[int, object] = {}
        self.launched_from_hooks = 0  # buckets started during backward in the current step

    def grad_added(self, p: nn.Parameter) -> None:
        """Called by the gradient hook after ``p``'s gradient was added to its accumulator."""
        if not self.backwards:
            return
        self.seen[id(p)] += 1
        if self.seen[id(p)] != self.backwards:
            return
        self._prepare(p)
        for b in self.buckets_of[id(p)]:
            self.remaining[b] -= 1
            if self.remaining[b] == 0:
                self._launch(b)
                self.launched_from_hooks += 1

    def _prepare(self, p: nn.Parameter) -> None:
        self.prepare(p)
        self.prepared.add(id(p))

    def _launch(self, b: int) -> None:
        start, end = self.bounds[b]
        self.handles[b] = dist.all_reduce(self.flat[start:end], group=self.group, async_op=True)

    def finish(self) -> None:
        """Prepare what no hook completed (unused parameters, or ``expect(0)``), launch the
        buckets still waiting, in bucket order, then wait for all of them."""
        for p in self.params:
            if id(p) not in self.prepared:
                self._prepare(p)
        for b in range(len(self.bounds)):
            if b not in self.handles:
                self._launch(b)
        for b in sorted(self.handles):
            self.handles[b].wait()
        early = self.launched_from_hooks
        self.expect(self.backwards)
        self.launched_from_hooks = early  # kept for inspection until the next step's hooks
