"""Mixed-precision AdamW with ZeRO stages 0-3 and an explicit fragment table.

Every local parameter is flattened and cut into ``dp`` equal chunks (padded); with
ZeRO >= 1 data-parallel rank ``r`` owns chunk ``r`` of every parameter (stage 0 owns
the whole parameter); the ZeRO group is the one each parameter's ``ShardingRecord`` names
(dp-cp-sp for dense parameters). A group's *partition* concatenates the owned chunks, padded to
the chunk size, so every rank's partition has the same size and one collective moves
a whole group. The fp32 master weights, ``exp_avg`` and ``exp_avg_sq`` live in partitions;
the fragment table says which element is which.

Gradients are kept in ``grad_dtype`` (the model's dtype, as the ZeRO paper counts them, or
fp32 with Megatron's ``--accumulate-allreduce-grads-in-fp32``). Stages 0-1 accumulate into
one full buffer per group and all-reduce it in buckets after the last micro-batch; stages
2-3 reduce-scatter each parameter's gradient into the partition as soon as autograd
produces it (gathered in buckets of ``bucket_numel`` elements), so no rank keeps the full
reduced gradient. The step works on an fp32 copy of this rank's reduced partition
(``ParamGroup.grad``, or the buffer itself where it already is one) and drops it afterwards,
so between steps a rank holds the ZeRO paper's model states and nothing more.
Partial sums the records name (repeated KV rows, tied embeddings) are added in
``grad_sync``; the global norm counts each canonical element once, from the records' pieces.
Stage 3 also keeps the parameters only as this partition in the model dtype
(``ParamGroup.param_shard``, gathered per unit by ``zero3.py``); the step writes the new master
values straight into it. Its masters can be generated from the canonical init
(``canonical_seed``), so the model can be built on the meta device.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.adam import adam as functional_adam

from megatron.core import comm
from megatron.core.canonical_init import init_flat_range
from megatron.core.optimizer.grad_overlap import BucketLauncher
from megatron.core.optimizer.grad_scaler import LossScaler
from megatron.core.optimizer.grad_sync import (count_non_finite, counted_boxes, square_sum, sum_row_partials,
                                               sum_whole_partials)
from megatron.core.parallel_state import Topology
from megatron.core.pieces import strided_view
from megatron.core.sharding import ShardingRecord, sharding_of

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
    overlap_grad_reduce: bool = False  # launch bucket reductions from backward hooks (grad_overlap.py)


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


@dataclass(frozen=True)
class Precision:
    """The dtypes a group keeps: ``param`` for the model's parameters (and ZeRO-3 shards),
    ``grad`` for gradient accumulation and reduction; master and moments are always fp32."""

    param: torch.dtype = torch.float32
    grad: torch.dtype = torch.float32


class ParamGroup:
    """One set of hyperparameters (decay or no decay) over one ZeRO group, and its partition
    buffers. ``counted`` lists, per fragment, the boxes this rank adds to the gradient norm.
    ``main_grad_flat`` (stages 0-1: the full local gradients) or ``grad_shard`` (stages 2-3:
    this rank's reduced partition) accumulates in ``precision.grad``; ``param_shard`` (stage 3)
    is the partition of the parameters in ``precision.param``; ``grad`` is the step's fp32
    partition of reduced gradients, None between steps."""

    def __init__(self, index: int, hyper: dict, named: list[tuple[str, nn.Parameter]], zero_group: str,
                 shards: int, shard_rank: int, device: torch.device, count_replicas: bool, stage: int,
                 precision: Precision) -> None:
        self.index, self.hyper, self.zero_group = index, hyper, zero_group
        self.shards, self.shard_rank = shards, shard_rank
        self.params = [p for _, p in named]
        self.records = [sharding_of(p) for p in self.params]
        self.fragments: list[Fragment] = []
        offset = 0
        for (name, p), r in zip(named, self.records):  # sizes from the records: ZeRO-3 parameters are empty
            n = math.prod(r.local_shape)
            chunk = math.ceil(n / shards)
            start, end = min(n, shard_rank * chunk), min(n, (shard_rank + 1) * chunk)
            self.fragments.append(Fragment(name, r.local_shape, index, start, end, offset, chunk))
            offset += chunk
        self.size = offset
        self.device = device
        self.master = torch.zeros(offset, device=self.device)
        full = stage <= 1
        self.main_grad_flat = (torch.zeros(sum(p.numel() for p in self.params), dtype=precision.grad, device=device)
                               if full else None)
        self.grad_shard = None if full else torch.zeros(offset, dtype=precision.grad, device=device)
        self.param_shard = torch.zeros(offset, dtype=precision.param, device=device) if stage == 3 else None
        self.grad: torch.Tensor | None = None
        self.exp_avg = torch.zeros(offset, device=self.device)
        self.exp_avg_sq = torch.zeros(offset, device=self.device)
        self.counted = [counted_boxes(r, f.start, f.end) if count_replicas else []
                        for f, r in zip(self.fragments, self.records)]

    def grad_square_sum(self) -> torch.Tensor:
        """Sum of squares (fp64) of the gradient elements this rank counts in the global norm."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for piece in self.counted_pieces(self.grad):
            total += square_sum(piece)
        return total

    def counted_pieces(self, buf: torch.Tensor):
        """The parts of ``buf`` (laid out as ``master``) that this rank counts in a global
        reduction: over all ranks, every element of every canonical tensor exactly once."""
        for (f, p, flat), boxes, r in zip(self.views(buf), self.counted, self.records):
            for box in boxes:
                yield strided_view(flat, r.local_shape, f.start, box)

    def views(self, buf: torch.Tensor):
        for f, p in zip(self.fragments, self.params):
            yield f, p, buf[f.offset:f.offset + f.end - f.start]


def zero_group_order(records: Iterable[ShardingRecord]) -> list[str]:
    """The ZeRO groups of these parameters in optimizer order: the dense one first (its decay and
    no-decay groups keep indices 0 and 1), then the others (experts) by name."""
    return sorted({r.zero_group for r in records} | {"dp-cp-sp"}, key=lambda name: (name != "dp-cp-sp", name))


def optimizer_group_index(record: ShardingRecord, zero_groups: list[str]) -> int:
    """The index of the optimizer group that holds a parameter: per ZeRO group, decay then no decay."""
    return 2 * zero_groups.index(record.zero_group) + (0 if record.weight_decay else 1)


@dataclass
class _HeldGrad:
    """The sum so far of a parameter's gradient contributions in one backward."""
    group: ParamGroup
    fragment: Fragment
    record: ShardingRecord
    grad: torch.Tensor
    count: int = 0


def _fill_chunks(block: torch.Tensor, flat: torch.Tensor) -> None:
    """Row ``r`` of ``block [shards, chunk]`` = elements ``[r * chunk, (r + 1) * chunk)`` of
    ``flat``, zero past its end: the padded gradient, copied once (no padded temporary)."""
    chunk = block.shape[1]
    if chunk == 0:
        return
    full, rest = divmod(flat.numel(), chunk)
    block[:full].copy_(flat[:full * chunk].view(full, chunk))
    if full < block.shape[0]:
        block[full, :rest].copy_(flat[full * chunk:])
        block[full, rest:].zero_()
        block[full + 1:].zero_()


def _read_chunks(block: torch.Tensor, flat: torch.Tensor) -> None:
    """The inverse of ``_fill_chunks``: ``flat`` = the rows of ``block`` end to end, cut at its
    length (the padding dropped), copied once."""
    chunk = block.shape[1]
    if chunk == 0:
        return
    full, rest = divmod(flat.numel(), chunk)
    flat[:full * chunk].view(full, chunk).copy_(block[:full])
    if rest:
        flat[full * chunk:].copy_(block[full, :rest])


class DistributedOptimizer:
    """AdamW over partitions; ``stage`` is the ZeRO stage (0-3)."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], topo: Topology, stage: int,
                 cfg: AdamConfig, scaler: LossScaler, precision: Precision = Precision(),
                 device: torch.device | None = None, canonical_seed: int | None = None) -> None:
        """``device``: where the partitions live (default: the parameters'). ``canonical_seed``:
        generate the masters from the canonical init with this seed instead of copying the
        parameters' values (which may then be on the meta device)."""
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"--zero-stage must be 0, 1, 2 or 3, got {stage}")
        self.topo, self.stage, self.cfg, self.scaler = topo, stage, cfg, scaler
        adam = {"beta1": cfg.beta1, "beta2": cfg.beta2, "eps": cfg.eps}
        zero_groups = zero_group_order(sharding_of(p) for _, p in named_params)
        # The parameters' device (a single GPU process has no NCCL backend to tell it).
        device = device or next((p.device for _, p in named_params), topo.device)
        self.groups = []
        for zero_group in zero_groups:
            shards = topo.group_size(zero_group) if stage >= 1 else 1
            shard_rank = topo.group_rank(zero_group) if stage >= 1 else 0
            # Stage 0 keeps a full replica on every member of the ZeRO group: only its first counts.
            count = stage >= 1 or topo.group_rank(zero_group) == 0
            for decay in (True, False):
                named = [(n, p) for n, p in named_params
                         if sharding_of(p).zero_group == zero_group and sharding_of(p).weight_decay == decay]
                hyper = {"weight_decay": cfg.weight_decay if decay else 0.0, **adam}
                self.groups.append(ParamGroup(len(self.groups), hyper, named, zero_group, shards, shard_rank,
                                              device, count, stage, precision))
                self.groups[-1].decay = decay  # the schedule's weight decay applies here
        self.step_count = 0
        for g in self.groups:
            for (f, p, master), r in zip(g.views(g.master), g.records):
                if canonical_seed is None:
                    master.copy_(p.detach().reshape(-1)[f.start:f.end].float())
                else:
                    master.copy_(init_flat_range(r.piece_map, r.specs, canonical_seed, f.start, f.end))
            if g.param_shard is not None:
                g.param_shard.copy_(g.master)
        self._install_grad_hooks()

    # --- gradients -------------------------------------------------------------------

    def _install_grad_hooks(self) -> None:
        # Stages 2-3: gradients waiting for one bucketed reduce-scatter, per ParamGroup.
        self._pending: dict[int, list[tuple[Fragment, torch.Tensor]]] = {g.index: [] for g in self.groups}
        self._pending_numel = dict.fromkeys(self._pending, 0)
        self.main_grads: dict[int, torch.Tensor] = {}  # stages 0-1: id(param) -> its accumulator
        self.launchers: dict[int, BucketLauncher] = {}  # stages 0-1 with --overlap-grad-reduce, per group
        self._in_flight: list[tuple] = []  # stages 2-3 with --overlap-grad-reduce: started reduce-scatters
        self.grad_clock = comm.WaitClock()  # time the step waited for gradient reductions, for the log
        self.overlapped_buckets = 0  # stages 2-3: reduce-scatters the last step's backward started
        self._contributions: dict[int, int] = {}  # stages 2-3: gradients per backward of a tied parameter
        self._held: dict[int, _HeldGrad] = {}  # their sum so far
        self._grad_hooks: list = []  # handles of the hooks that take each parameter's gradient
        self._before_update: list[Callable[[], object]] = []  # see hold_update_until
        for g in self.groups:
            if g.main_grad_flat is not None:
                offset = 0
                for p in g.params:
                    self.main_grads[id(p)] = g.main_grad_flat[offset:offset + p.numel()].view(p.shape)
                    offset += p.numel()
                group = self.topo.group(g.zero_group)
                if self.cfg.overlap_grad_reduce and comm.group_size(group) > 1:
                    records = {id(p): r for p, r in zip(g.params, g.records)}
                    self.launchers[g.index] = BucketLauncher(
                        g.main_grad_flat, g.params, self.cfg.bucket_numel, group,
                        lambda p, records=records: sum_row_partials(records[id(p)], self.main_grads[id(p)], self.topo))
            self._grad_hooks += [p.register_post_accumulate_grad_hook(self._make_hook(g, f, r))
                                 for f, p, r in zip(g.fragments, g.params, g.records)]

    def hold_update_until(self, wait: Callable[[], object]) -> None:
        """Make the next step call ``wait()`` before it changes the master weights and Adam
        moments (a background save still copying them); a wait already registered is not added again."""
        if wait not in self._before_update:
            self._before_update.append(wait)

    def wait_before_update(self) -> None:
        """Run, once, the waits ``hold_update_until`` registered (``step`` does, before updating)."""
        waits, self._before_update = self._before_update, []
        for wait in waits:
            wait()

    def detach_from_model(self) -> None:
        """Stop taking the model's gradients (remove the hooks), so that another optimizer can
        train the model and this one, no longer referenced by it, can be freed."""
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks = []

    def _make_hook(self, g: ParamGroup, f: Fragment, record):
        def hook(p: nn.Parameter) -> None:
            if self.stage <= 1:
                self.main_grads[id(p)].add_(p.grad)
                if g.index in self.launchers:
                    self.launchers[g.index].grad_added(p)
            else:
                grad = p.grad.to(g.grad_shard.dtype)
                if id(p) in self._contributions:
                    grad = self._hold(p, g, f, record, grad)
                if grad is not None:
                    self._queue_for_scatter(g, f, record, grad)
            p.grad = None
        return hook

    def sum_before_reducing(self, p: nn.Parameter, contributions: int) -> None:
        """Stages 2-3: ``p`` gets ``contributions`` separate gradients per backward (a tied weight
        read by two ZeRO-3 units, each back-propagating its own graph); add them up and
        reduce-scatter the sum once, as one autograd graph would, instead of each apart."""
        if contributions > 1:
            self._contributions[id(p)] = contributions

    def _hold(self, p: nn.Parameter, g: ParamGroup, f: Fragment, record, grad: torch.Tensor) -> torch.Tensor | None:
        """Add one contribution of ``p``'s gradient; the sum once all have come, else None."""
        held = self._held.get(id(p))
        if held is None:
            held = self._held[id(p)] = _HeldGrad(g, f, record, grad)
        else:
            held.grad.add_(grad)
        held.count += 1
        if held.count < self._contributions[id(p)]:
            return None
        del self._held[id(p)]
        return held.grad

    def _queue_for_scatter(self, g: ParamGroup, f: Fragment, record, grad: torch.Tensor) -> None:
        sum_row_partials(record, grad, self.topo)  # needs the full local rows: before the scatter
        self._pending[g.index].append((f, grad))
        self._pending_numel[g.index] += grad.numel()
        if self._pending_numel[g.index] >= self.cfg.bucket_numel:
            self._reduce_scatter_pending(g)

    def _reduce_scatter_pending(self, g: ParamGroup) -> None:
        """Reduce-scatter the waiting gradients of ``g`` in one collective over its ZeRO group;
        add this rank's chunks to the partition. Every rank's hooks run in the same order, so
        the buckets match across the group."""
        pending = self._pending[g.index]
        if not pending:
            return
        width, dtype = sum(f.chunk for f, _ in pending), g.grad_shard.dtype
        send, column = torch.empty(g.shards, width, dtype=dtype, device=g.device), 0
        for f, grad in pending:  # column block of each gradient: its chunk r in row r, zero padded
            _fill_chunks(send[:, column:column + f.chunk], grad.reshape(-1))
            column += f.chunk
        mine = torch.empty(width, dtype=dtype, device=g.device)
        group = self.topo.group(g.zero_group)
        self._pending[g.index], self._pending_numel[g.index] = [], 0
        if self.cfg.overlap_grad_reduce and comm.group_size(group) > 1:  # added in launch order by _drain
            handle = torch.distributed.reduce_scatter_tensor(mine, send.view(-1), group=group, async_op=True)
            self._in_flight.append((g, pending, mine, send, handle))
            return
        comm.reduce_scatter_flat(mine, send.view(-1), group)
        self._add_scattered(g, pending, mine)

    @staticmethod
    def _add_scattered(g: ParamGroup, pending: list[tuple[Fragment, torch.Tensor]], mine: torch.Tensor) -> None:
        column = 0
        for f, _ in pending:
            g.grad_shard[f.offset:f.offset + f.end - f.start] += mine[column:column + f.end - f.start]
            column += f.chunk

    def _drain(self) -> None:
        """Wait for the started reduce-scatters; add their shares in the order they started,
        the order the non-overlapped path adds them in."""
        for g, pending, mine, _send, handle in self._in_flight:
            handle.wait()
            self._add_scattered(g, pending, mine)
        self._in_flight = []

    def expect_backwards(self, micro_batches: int) -> None:
        """Tell --overlap-grad-reduce how many backward passes this step runs, so a bucket
        starts once its gradients are final."""
        for launcher in self.launchers.values():
            launcher.expect(micro_batches)

    def zero_grad(self) -> None:
        for g in self.groups:
            (g.main_grad_flat if g.main_grad_flat is not None else g.grad_shard).zero_()

    def _finish_gradient_reduction(self) -> None:
        """After the last micro-batch: sum partial rows, reduce over the ZeRO group, keep this
        rank's chunks as the step's fp32 ``g.grad``, then sum whole-tensor partials (tied
        embeddings) on those chunks."""
        with self.grad_clock.blocked(self.topo.device):
            started_in_backward = len(self._in_flight)
            for held in self._held.values():  # a contribution that never came
                self._queue_for_scatter(held.group, held.fragment, held.record, held.grad)
            self._held = {}
            for g in self.groups:
                self._reduce_scatter_pending(g)
            self._drain()
            self.overlapped_buckets = started_in_backward
            for g in self.groups:
                flat = g.main_grad_flat
                if flat is not None:
                    if g.index in self.launchers:  # the buckets backward has not started yet, then wait
                        self.launchers[g.index].finish()
                    else:
                        for p, r in zip(g.params, g.records):
                            sum_row_partials(r, self.main_grads[id(p)], self.topo)
                        for s in range(0, flat.numel(), self.cfg.bucket_numel):
                            comm.all_reduce(flat[s:s + self.cfg.bucket_numel], self.topo.group(g.zero_group))
                    if g.shards == 1 and flat.dtype == torch.float32:  # already the partition's layout
                        g.grad = flat
                    else:
                        g.grad = torch.zeros(g.size, device=g.device)
                        for f, p, grad in g.views(g.grad):
                            grad.copy_(self.main_grads[id(p)].reshape(-1)[f.start:f.end])
                else:
                    g.grad = g.grad_shard.float()  # the buffer itself when it is fp32
                # After the DP sum: the tied copies sit at different bucket offsets on the first and
                # last stage, so their DP sums may round differently; adding the two DP-reduced
                # values afterwards gives both stages the same bits.
                for (f, p, grad), r in zip(g.views(g.grad), g.records):
                    sum_whole_partials(r, grad, self.topo)

    # --- the step ----------------------------------------------------------------------

    def step(self, lr: float) -> tuple[bool, float]:
        """Reduce gradients, unscale, check for overflow, clip, update, refresh the model.
        Returns (whether the update was applied, the global gradient norm)."""
        self._finish_gradient_reduction()
        self.wait_before_update()
        try:
            return self._step(lr)
        finally:
            for g in self.groups:
                g.grad = None  # the fp32 copy lives only during the step

    def _step(self, lr: float) -> tuple[bool, float]:
        inv_scale = 1.0 / self.scaler.scale
        stats = torch.zeros(2, dtype=torch.float64, device=self.groups[0].device)
        for g in self.groups:
            if inv_scale != 1.0:
                g.grad.mul_(inv_scale)
            stats[0] += g.grad_square_sum()
            stats[1] += count_non_finite(g.grad)
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

    def state_norms(self) -> dict[str, float]:
        """Upstream's --log-optimizer-states-to-tensorboard values over the whole model (every
        canonical element once, whatever the layout): the L2 and L1 norms and the largest
        magnitude of Adam's variance, its square root, the momentum and the fp32 weights.
        A collective: every rank calls it."""
        states = {"variance": lambda g: g.exp_avg_sq, "variance_sqrt": lambda g: g.exp_avg_sq.sqrt(),
                  "momentum": lambda g: g.exp_avg, "weight": lambda g: g.master}
        device = self.groups[0].device
        sums = torch.zeros(2 * len(states), dtype=torch.float64, device=device)
        maxima = torch.zeros(len(states), dtype=torch.float64, device=device)
        for g in self.groups:
            for i, state in enumerate(states.values()):
                for piece in g.counted_pieces(state(g)):
                    sums[2 * i] += square_sum(piece)
                    sums[2 * i + 1] += piece.double().abs().sum()
                    if piece.numel():
                        maxima[i] = torch.maximum(maxima[i], piece.abs().max().double())
        comm.world_all_reduce(sums)
        comm.world_all_reduce(maxima, op=torch.distributed.ReduceOp.MAX)
        out = {}
        for i, name in enumerate(states):
            out[f"{name}_l2"] = math.sqrt(float(sums[2 * i]))
            out[f"{name}_l1"] = float(sums[2 * i + 1])
            out[f"{name}_abs_max"] = float(maxima[i])
        return out

    def _adamw(self, g: ParamGroup, lr: float) -> None:
        """torch's fused AdamW kernel on the partition: torch.optim.AdamW's update (decay, lerp of
        the momentum, bias-corrected sqrt denominator) in one pass instead of eight."""
        step = torch.tensor(float(self.step_count - 1), device=g.device)  # the kernel counts this step
        functional_adam([g.master], [g.grad], [g.exp_avg], [g.exp_avg_sq], [], [step], fused=True,
                        decoupled_weight_decay=True, amsgrad=False, beta1=g.hyper["beta1"],
                        beta2=g.hyper["beta2"], lr=lr, weight_decay=g.hyper["weight_decay"],
                        eps=g.hyper["eps"], maximize=False)

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
                g.param_shard.copy_(g.master)
            return
        for g in self.groups:
            if g.shards == 1:
                for f, p, master in g.views(g.master):
                    p.data.copy_(master.view(p.shape))
                continue
            # Gather in the model's dtype: half the bytes of fp32 for a bf16 model.
            dtype = g.params[0].dtype if g.params else g.master.dtype
            full = torch.empty(g.size * g.shards, dtype=dtype, device=g.device)
            comm.all_gather_flat(full, g.master.to(dtype), self.topo.group(g.zero_group))
            full = full.view(g.shards, g.size)
            for f, p in zip(g.fragments, g.params):
                _read_chunks(full[:, f.offset:f.offset + f.chunk], p.data.view(-1))

    # --- state -------------------------------------------------------------------------

    def fragments(self) -> list[Fragment]:
        return [f for g in self.groups for f in g.fragments]

    def param_shard(self, f: Fragment) -> torch.Tensor:
        """ZeRO-3: this rank's chunk of fragment ``f``'s parameter in the model dtype (zero padded
        to ``f.chunk``), a view of the group's ``param_shard``."""
        shard = self.groups[f.group].param_shard
        if shard is None:
            raise RuntimeError(f"parameter {f.name}: only --zero-stage 3 keeps parameter shards (this is stage "
                               f"{self.stage})")
        return shard[f.offset:f.offset + f.chunk]

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
