"""Mixed-precision AdamW with ZeRO stages 0-3 and an explicit fragment table.

Every local parameter is flattened and cut into ``dp`` equal chunks (padded); with
ZeRO >= 1 data-parallel rank ``r`` owns chunk ``r`` of every parameter (stage 0 owns
the whole parameter). A group's *partition* concatenates the owned chunks, padded to
the chunk size, so every rank's partition has the same size and one collective moves
a whole group. The fp32 master weights, ``exp_avg``, ``exp_avg_sq`` and the reduced
gradients live in partitions; the fragment table says which element is which.

Gradients: stages 0-1 accumulate into a full fp32 ``main_grad`` per parameter and
all-reduce it in buckets after the last micro-batch (with one shard, ``main_grad`` is
the partition itself); stages 2-3 reduce-scatter each parameter's gradient into the
partition as soon as autograd produces it (gathered in buckets of ``bucket_numel``
elements), so no rank keeps the full reduced gradient and no ``main_grad`` exists.
Stage 3 also keeps only this rank's chunk of each parameter (``p.zero3_shard``, see
``zero3.py``); the step writes the new master values straight into those shards.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from megatron.core import comm
from megatron.core.optimizer.grad_scaler import LossScaler
from megatron.core.parallel_state import Topology
from megatron.core.pieces import box_slices
from megatron.core.tensor_parallel import sum_partial_replica_grads

STATE_NAMES = ("fp32", "exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class AdamConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    clip_grad: float = 1.0
    bucket_numel: int = 1 << 22
    optimizer: str = "adam"  # adam (AdamW) | sgd (momentum in the exp_avg buffer)
    sgd_momentum: float = 0.9


@dataclass(frozen=True)
class Fragment:
    """Elements ``[start, end)`` of the flattened local parameter ``name`` sit at
    ``[offset, offset + end - start)`` of this rank's partition of group ``group``."""

    name: str
    shape: tuple[int, ...]
    group: int
    start: int
    end: int
    offset: int
    chunk: int


class ParamGroup:
    """One set of hyperparameters (decay or no decay) and its partition buffers."""

    def __init__(self, index: int, hyper: dict, named: list[tuple[str, nn.Parameter]],
                 shards: int, shard_rank: int) -> None:
        self.index, self.hyper = index, hyper
        self.params = [p for _, p in named]
        self.fragments: list[Fragment] = []
        offset = 0
        for name, p in named:
            n = p.numel()
            chunk = math.ceil(n / shards)
            start, end = min(n, shard_rank * chunk), min(n, (shard_rank + 1) * chunk)
            self.fragments.append(Fragment(name, tuple(p.shape), index, start, end, offset, chunk))
            offset += chunk
        self.size = offset
        self.device = named[0][1].device if named else torch.device("cpu")
        self.master = torch.zeros(offset, device=self.device)
        self.grad = torch.zeros(offset, device=self.device)
        self.exp_avg = torch.zeros(offset, device=self.device)
        self.exp_avg_sq = torch.zeros(offset, device=self.device)
        self.owned = torch.zeros(offset, device=self.device)  # 1 where this rank counts the element in the grad norm

    def views(self, buf: torch.Tensor):
        for f, p in zip(self.fragments, self.params):
            yield f, p, buf[f.offset:f.offset + f.end - f.start]


class DistributedOptimizer:
    """AdamW over partitions; ``stage`` is the ZeRO stage (0-3)."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], topo: Topology, stage: int,
                 cfg: AdamConfig, scaler: LossScaler) -> None:
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"--zero-stage must be 0, 1, 2 or 3, got {stage}")
        self.topo, self.stage, self.cfg, self.scaler = topo, stage, cfg, scaler
        self.shards = topo.dp if stage >= 1 else 1
        self.shard_rank = topo.dp_rank if stage >= 1 else 0
        decay = [(n, p) for n, p in named_params if _decays(p)]
        no_decay = [(n, p) for n, p in named_params if not _decays(p)]
        adam = {"beta1": cfg.beta1, "beta2": cfg.beta2, "eps": cfg.eps}
        self.groups = [ParamGroup(0, {"weight_decay": cfg.weight_decay, **adam}, decay, self.shards, self.shard_rank),
                       ParamGroup(1, {"weight_decay": 0.0, **adam}, no_decay, self.shards, self.shard_rank)]
        self.step_count = 0
        count_here = stage >= 1 or topo.dp_rank == 0
        for g in self.groups:
            for f, p, master in g.views(g.master):
                master.copy_(p.detach().reshape(-1)[f.start:f.end].float())
                owned = torch.zeros(p.shape, device=g.device)
                for piece in p.piece_map.pieces:
                    if piece.owner and count_here:
                        owned[box_slices((piece.local_offsets, piece.sizes))] = 1.0
                g.owned[f.offset:f.offset + f.end - f.start] = owned.reshape(-1)[f.start:f.end]
        self._install_grad_hooks()

    # --- gradients -------------------------------------------------------------------

    def _install_grad_hooks(self) -> None:
        self._pending: list[tuple[ParamGroup, Fragment, torch.Tensor]] = []  # stages 2-3: a bucket
        self._pending_numel = 0
        for g in self.groups:
            if self.stage <= 1:
                # One shard: the partition has main_grad's layout, so share the buffer.
                flat = g.grad if self.shards == 1 else torch.zeros(sum(p.numel() for p in g.params), device=g.device)
                g.main_grad_flat, offset = flat, 0
                for p in g.params:
                    p.main_grad = flat[offset:offset + p.numel()].view(p.shape)
                    offset += p.numel()
            for f, p in zip(g.fragments, g.params):
                p.register_post_accumulate_grad_hook(self._make_hook(g, f))

    def _make_hook(self, g: ParamGroup, f: Fragment):
        def hook(p: nn.Parameter) -> None:
            if self.stage <= 1:
                p.main_grad.add_(p.grad)
            else:
                grad = p.grad.float()
                sum_partial_replica_grads(p, grad, self.topo.tp_group)
                self._pending.append((g, f, grad))
                self._pending_numel += grad.numel()
                if self._pending_numel >= self.cfg.bucket_numel:
                    self._reduce_scatter_pending()
            p.grad = None
        return hook

    def _reduce_scatter_pending(self) -> None:
        """Reduce-scatter the waiting gradients in one collective; add this rank's chunks to the
        partitions. Every rank's hooks run in the same order, so the buckets match across DP."""
        if not self._pending:
            return
        width = sum(f.chunk for _, f, _ in self._pending)
        device = self.groups[0].grad.device  # the partitions' device
        send, column = torch.empty(self.shards, width, device=device), 0
        for _, f, grad in self._pending:  # column block of each gradient: its chunk r in row r
            padded = torch.nn.functional.pad(grad.reshape(-1), (0, f.chunk * self.shards - grad.numel()))
            send[:, column:column + f.chunk] = padded.view(self.shards, f.chunk)
            column += f.chunk
        mine = torch.empty(width, device=device)
        comm.reduce_scatter_flat(mine, send.view(-1), self.topo.dp_group)
        column = 0
        for g, f, _ in self._pending:
            g.grad[f.offset:f.offset + f.end - f.start] += mine[column:column + f.end - f.start]
            column += f.chunk
        self._pending, self._pending_numel = [], 0

    def zero_grad(self) -> None:
        for g in self.groups:
            g.grad.zero_()
            if self.stage <= 1:
                g.main_grad_flat.zero_()

    def _finish_gradient_reduction(self) -> None:
        """After the last micro-batch: sum replicas, reduce over DP, keep this rank's chunks."""
        self._reduce_scatter_pending()
        for g in self.groups:
            if self.stage <= 1:
                for p in g.params:
                    sum_partial_replica_grads(p, p.main_grad, self.topo.tp_group)
                flat = g.main_grad_flat
                for s in range(0, flat.numel(), self.cfg.bucket_numel):
                    comm.all_reduce(flat[s:s + self.cfg.bucket_numel], self.topo.dp_group)
                # After the DP sum: the tied copies sit at different bucket offsets on the first and
                # last stage, so their DP sums may round differently; adding the two DP-reduced
                # values afterwards gives both stages the same bits.
                for p in g.params:
                    if getattr(p, "sum_over_embedding_group", False):
                        comm.all_reduce(p.main_grad, self.topo.embedding_group)
                if flat is not g.grad:
                    for f, p, grad in g.views(g.grad):
                        grad.copy_(p.main_grad.reshape(-1)[f.start:f.end])
            else:
                for f, p, grad in g.views(g.grad):
                    if getattr(p, "sum_over_embedding_group", False):
                        comm.all_reduce(grad, self.topo.embedding_group)

    # --- the step ----------------------------------------------------------------------

    def step(self, lr: float) -> tuple[bool, float]:
        """Reduce gradients, unscale, check for overflow, clip, update, refresh the model.
        Returns (whether the update was applied, the global gradient norm)."""
        self._finish_gradient_reduction()
        inv_scale = 1.0 / self.scaler.scale
        stats = torch.zeros(2, device=self.groups[0].device)
        for g in self.groups:
            if inv_scale != 1.0:
                g.grad.mul_(inv_scale)
            stats[0] += (g.grad * g.owned).pow(2).sum()
            stats[1] += (~torch.isfinite(g.grad)).sum()
        comm.world_all_reduce(stats)
        found_inf = bool(stats[1] > 0)
        self.scaler.update(found_inf)
        if found_inf:
            return False, float("nan")
        norm = math.sqrt(float(stats[0]))
        if self.cfg.clip_grad > 0 and norm > self.cfg.clip_grad:
            coeff = self.cfg.clip_grad / (norm + 1e-6)
            for g in self.groups:
                g.grad.mul_(coeff)
        self.step_count += 1
        for g in self.groups:
            self._sgd(g, lr) if self.cfg.optimizer == "sgd" else self._adamw(g, lr)
        self.copy_master_to_model()
        return True, norm

    def _adamw(self, g: ParamGroup, lr: float) -> None:
        b1, b2, eps, wd = (g.hyper[k] for k in ("beta1", "beta2", "eps", "weight_decay"))
        g.exp_avg.lerp_(g.grad, 1.0 - b1)
        g.exp_avg_sq.mul_(b2).addcmul_(g.grad, g.grad, value=1.0 - b2)
        bias1, bias2 = 1.0 - b1 ** self.step_count, 1.0 - b2 ** self.step_count
        if wd:
            g.master.mul_(1.0 - lr * wd)
        denom = (g.exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(eps)
        g.master.addcdiv_(g.exp_avg, denom, value=-lr / bias1)

    def _sgd(self, g: ParamGroup, lr: float) -> None:
        """torch.optim.SGD as Megatron uses it: L2 weight decay added to the gradient, momentum
        without dampening (its buffer is kept in ``exp_avg``, so checkpoints need no new tensor)."""
        grad = g.grad.add(g.master, alpha=g.hyper["weight_decay"]) if g.hyper["weight_decay"] else g.grad
        momentum = self.cfg.sgd_momentum
        if momentum:  # the buffer starts at zero, so the first step stores the gradient, as torch does
            grad = g.exp_avg.mul_(momentum).add_(grad)
        g.master.add_(grad, alpha=-lr)

    def copy_master_to_model(self) -> None:
        """Write the updated fp32 partitions into the model's parameters on every DP rank
        (under ZeRO-3 into this rank's parameter shards: nothing is gathered)."""
        if self.stage == 3:
            for g in self.groups:
                for f, p, master in g.views(g.master):
                    shard = getattr(p, "zero3_shard", None)
                    if shard is None or shard.numel() != f.chunk:
                        raise RuntimeError(f"--zero-stage 3: parameter {f.name} is not partitioned; call "
                                           f"megatron.core.optimizer.zero3.partition_parameters(model, topo, "
                                           f"optimizer.fragments()) after casting the model to its dtype")
                    shard[:master.numel()].copy_(master)
            return
        for g in self.groups:
            if self.shards == 1:
                for f, p, master in g.views(g.master):
                    p.data.copy_(master.view(p.shape))
                continue
            full = torch.empty(g.size * self.shards, dtype=g.master.dtype, device=g.device)
            comm.all_gather_flat(full, g.master, self.topo.dp_group)
            full = full.view(self.shards, g.size)
            for f, p in zip(g.fragments, g.params):
                p.data.copy_(full[:, f.offset:f.offset + f.chunk].reshape(-1)[:p.numel()].view(p.shape))

    # --- state -------------------------------------------------------------------------

    def fragments(self) -> list[Fragment]:
        return [f for g in self.groups for f in g.fragments]

    def fragment_state(self, f: Fragment) -> dict[str, torch.Tensor]:
        """Views of one fragment's fp32 master, exp_avg and exp_avg_sq."""
        g = self.groups[f.group]
        sl = slice(f.offset, f.offset + f.end - f.start)
        return {"fp32": g.master[sl], "exp_avg": g.exp_avg[sl], "exp_avg_sq": g.exp_avg_sq[sl]}

    def hyperparameters(self) -> list[dict]:
        return [dict(g.hyper) for g in self.groups]

    def load_hyperparameters(self, saved: list[dict]) -> None:
        for g, h in zip(self.groups, saved):
            g.hyper.update(h)


def _decays(p: nn.Parameter) -> bool:
    flags = {spec.weight_decay for spec in p.canonical_specs.values()}
    if len(flags) != 1:
        raise ValueError(f"parameter fuses tensors with and without weight decay: {sorted(p.canonical_specs)}")
    return flags.pop()

