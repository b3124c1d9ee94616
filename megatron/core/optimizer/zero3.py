"""ZeRO stage 3: parameters live as 1/DP shards and are gathered one unit at a time.

Each local parameter keeps only its chunk of the flattened, padded value (the chunk its
optimizer fragment covers, in the model dtype): a view of the optimizer's
``ParamGroup.param_shard``, which the step updates in place; ``p.data`` is empty between
uses (and the model may have been built on the meta device: nothing reads its values). A
*unit* -- a step of the model's forward that names the parameters it reads
(``GPTModel.units``: the embedding, each transformer layer, the final norm and output
layer) -- all-gathers its parameters over the DP group just before it runs and frees them
afterwards (``--overlap-param-gather`` starts the next unit's gather while one runs:
``ParamGatherer``).

A unit's forward records its own autograd graph and keeps its activations, as without
ZeRO; a saved tensor that lies in a gathered parameter is kept as a reference (which
parameter, which strides) and re-made from the gather its backward makes, so autograd never
holds a full parameter across units. Its backward gathers again, back-propagates through
that graph -- the optimizer's gradient hooks reduce-scatter each gradient while the full
parameter exists -- and frees. With full activation recomputation
(``--recompute-granularity full``, ``--checkpoint-activations``) a unit keeps only its
inputs and recomputes its forward in backward instead, with the saved RNG state (as
``torch.utils.checkpoint`` does).
"""
from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from megatron.core import comm
from megatron.core.optimizer.distributed_optimizer import DistributedOptimizer
from megatron.core.parallel_state import Topology
from megatron.core.sharding import sharding_of


class Unit:
    """The parameters one step of the forward reads; gathered and freed together."""

    def __init__(self, name: str, index: int, params: list[nn.Parameter], shards: list[torch.Tensor],
                 topo: Topology, gatherer: "ParamGatherer") -> None:
        zero_groups = {sharding_of(p).zero_group for p in params} or {"dp-cp-sp"}
        if len(zero_groups) > 1:
            raise ValueError(f"ZeRO-3 unit {name} mixes parameters partitioned over {sorted(zero_groups)}; "
                             f"split it so each unit gathers over one group")
        zero_group = zero_groups.pop()
        self.name, self.index, self.params, self.shards, self.gatherer = name, index, params, shards, gatherer
        self.group, self.dp = topo.group(zero_group), topo.group_size(zero_group)
        dtypes = {shard.dtype for shard in shards}
        if len(dtypes) > 1:
            raise ValueError(f"ZeRO-3 unit {name} mixes parameter dtypes {sorted(map(str, dtypes))}; "
                             f"cast the whole model to one dtype before partitioning")
        self.nested = False  # runs inside another unit's call (MoE experts): never prefetched
        self.storages: dict[int, int] = {}  # while gathered: storage address -> first parameter in it
        self.shapes = [sharding_of(p).local_shape for p in params]
        self.numel = sum(math.prod(shape) for shape in self.shapes)
        self.kept: _Kept | None = None  # values gathered in a forward, kept for its backward
        # A leaf that needs a gradient, so autograd calls the backward even when no input does.
        self.anchor = torch.empty(0, requires_grad=True)

    def start_gather(self, async_op: bool, which: tuple[int, ...] | None = None) -> "_Gather":
        """Start (``async_op``) or run one all-gather of the concatenated shards of parameters
        ``which`` (default all)."""
        which = tuple(range(len(self.params))) if which is None else which
        send = torch.cat([self.shards[i] for i in which])
        table = torch.empty(self.dp * send.numel(), dtype=send.dtype, device=send.device)
        work = comm.all_gather_flat(table, send, self.group, async_op=async_op)
        return _Gather(self, which, table, work if async_op else None, self.shard_versions())

    def shard_versions(self) -> list[int]:
        """The shards' in-place write counters: an optimizer step or a checkpoint load bumps
        them, so a gather started before it is stale."""
        return [shard._version for shard in self.shards]

    def assemble(self, gather: "_Gather") -> dict[int, torch.Tensor]:
        """The whole value of each parameter the gather holds, by index, from its slices."""
        table, values, offset = gather.table.view(self.dp, -1), {}, 0
        for i in gather.which:
            chunk, shape = self.shards[i].numel(), self.shapes[i]
            values[i] = table[:, offset:offset + chunk].reshape(-1)[:math.prod(shape)].view(shape)
            offset += chunk
        return values

    def attach(self, values: list[torch.Tensor]) -> None:
        """Point every parameter at its whole value."""
        for p, value in zip(self.params, values):
            p.data = value
        # Where a saved tensor may lie: the storage of each parameter (shared by all when
        # DP is 1), by its address; the same index finds the same storage in a later gather.
        self.storages = {}
        for index, p in enumerate(self.params):
            self.storages.setdefault(p.untyped_storage().data_ptr(), index)

    def release(self) -> None:
        for p, shard in zip(self.params, self.shards):
            p.data = shard.new_empty(0)
        self.storages = {}

    def pack(self, t: torch.Tensor) -> Any:
        """A tensor autograd saves in this unit's forward: a reference if it lies in a gathered
        parameter (so the gather can be freed), else the tensor and its version."""
        dense = t.layout == torch.strided and t.device.type != "meta"
        index = self.storages.get(t.untyped_storage().data_ptr()) if dense else None
        if index is None:
            return t, t._version
        base = self.params[index]
        return _SavedParam(index, tuple(t.shape), t.stride(), t.storage_offset() - base.storage_offset())

    def unpack(self, saved: Any) -> torch.Tensor:
        """The saved tensor again; a parameter reference is resolved in the current gather."""
        if isinstance(saved, _SavedParam):
            base = self.params[saved.index]
            return base.as_strided(saved.shape, saved.stride, base.storage_offset() + saved.offset)
        t, version = saved
        if t._version != version:
            raise RuntimeError(f"ZeRO-3 unit {self.name}: a tensor its backward needs was modified in place "
                               f"after the forward saved it (version {version}, now {t._version}); "
                               f"do not modify a unit's output or inputs in place")
        return t

    def gathered(self, backward: bool = False, keep: bool = False):
        """Context in which the unit's parameters are whole (see ``ParamGatherer.gathered``)."""
        return self.gatherer.gathered(self, backward, keep)


@dataclass(frozen=True)
class _SavedParam:
    """A saved tensor that lies in a gathered parameter: which one, and the view of it."""
    index: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


@dataclass
class _Kept:
    """A unit's whole values kept from a forward to its backward, with the shard versions they
    were gathered from and the number of forwards whose backward has not run yet."""
    values: list[torch.Tensor]
    versions: list[int]
    backwards: int = 0


@dataclass
class _Gather:
    """One all-gather of some parameters of a unit: started (``work`` to wait) or done (``work`` None)."""
    unit: Unit
    which: tuple[int, ...]
    table: torch.Tensor
    work: Any
    versions: list[int]


class ParamGatherer:
    """Gathers each unit around its forward and its backward and counts the time that blocks.

    With ``overlap`` (``--overlap-param-gather``) a unit about to run starts the all-gather of
    the unit expected next -- the next one in forward, the previous one in backward -- so it
    travels while this one computes. Exactly one such prefetch is in flight. A unit takes it
    only if the prefetch is its own and its shards were not written since it started;
    otherwise the prefetch is waited and dropped, and the unit gathers synchronously. Every
    rank of a ZeRO group runs the same units in the same order with the same optimizer steps,
    so all of them take the same decisions and issue the same collectives in the same order.
    A unit called inside another one (MoE experts within their layer) is gathered
    synchronously and leaves the outer prefetch in flight.

    As DeepSpeed's ``stage3_max_live_parameters``, up to ``max_live`` gathered elements stay
    whole from a unit's forward to its backward, which then needs no gather; a unit over the
    budget frees its values and gathers again in backward. A parameter kept whole by another
    unit (the tied word embedding, kept by the embedding unit, read again by the output layer)
    is taken from there, not gathered twice. The decisions depend only on sizes and on the
    order of the units, so every rank takes the same ones."""

    def __init__(self, overlap: bool = False, max_live: int = 0) -> None:
        self.overlap, self.max_live, self.live = overlap, max_live, 0
        self.units: list[Unit] = []
        self.readers: dict[int, list[tuple[Unit, int]]] = {}  # id(parameter) -> (unit, its index there)
        self.pending: _Gather | None = None
        self.active = 0  # units gathered right now (more than one when nested)
        self.hits = self.dropped = 0  # prefetches used / waited and discarded
        self.clock = comm.WaitClock()  # exposed gather time: waits and synchronous gathers

    @contextmanager
    def gathered(self, unit: Unit, backward: bool, keep: bool = False) -> Iterator[None]:
        """The unit whole: its kept values, a prefetch or a gather. ``keep``: a forward whose
        backward will come may keep its values for it, within ``max_live``."""
        if not unit.params:
            yield
            return
        unit.nested = unit.nested or self.active > 0
        kept = self._valid_kept(unit)
        unit.attach(kept.values if kept is not None else self._values(unit))
        if keep and kept is None and self.live + unit.numel <= self.max_live:
            kept = unit.kept = _Kept([p.data for p in unit.params], unit.shard_versions())
            self.live += unit.numel
        if keep and kept is not None:
            kept.backwards += 1
        if self.overlap and self.pending is None and not unit.nested:
            self._prefetch(unit.index + (-1 if backward else 1), -1 if backward else 1)
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            unit.release()
            if backward and kept is not None:
                kept.backwards -= 1
                if kept.backwards <= 0:
                    self._drop(unit)

    def _valid_kept(self, unit: Unit) -> _Kept | None:
        """The unit's kept values, unless its shards were written since they were gathered."""
        if unit.kept is not None and unit.kept.versions != unit.shard_versions():
            self._drop(unit)
        return unit.kept

    def _drop(self, unit: Unit) -> None:
        if unit.kept is not None:
            self.live -= unit.numel
            unit.kept = None

    def _whole_elsewhere(self, unit: Unit) -> tuple[dict[int, torch.Tensor], tuple[int, ...]]:
        """The unit's parameters that another unit keeps whole (and valid), by index, and the
        indices of the others: those a gather must bring."""
        values = {}
        for i, p in enumerate(unit.params):
            for other, j in self.readers.get(id(p), []):
                if other is not unit and self._valid_kept(other) is not None:
                    values[i] = other.kept.values[j]
                    break
        return values, tuple(i for i in range(len(unit.params)) if i not in values)

    def _values(self, unit: Unit) -> list[torch.Tensor]:
        """Every parameter of ``unit`` whole: kept by another unit, else gathered."""
        values, missing = self._whole_elsewhere(unit)
        if missing:
            values.update(unit.assemble(self._take(unit, missing)))
        return [values[i] for i in range(len(unit.params))]

    def _take(self, unit: Unit, which: tuple[int, ...]) -> _Gather:
        """The gather of ``unit``'s parameters ``which``: its valid prefetch, else a synchronous one."""
        device = unit.shards[0].device
        pending = self.pending
        if pending is not None and (pending.unit is unit or not unit.nested):
            self.pending = None
            with self.clock.blocked(device):
                if pending.work is not None:
                    pending.work.wait()
            if pending.unit is unit and pending.which == which and pending.versions == unit.shard_versions():
                self.hits += 1
                return pending
            self.dropped += 1
        with self.clock.blocked(device):
            return unit.start_gather(async_op=False, which=which)

    def _prefetch(self, index: int, step: int) -> None:
        """Start the gather of the first unit from ``index`` on (going by ``step``) that is not
        nested and has something to gather, if there is one."""
        while 0 <= index < len(self.units):
            unit = self.units[index]
            if not unit.nested and unit.params and self._valid_kept(unit) is None:
                _, missing = self._whole_elsewhere(unit)
                if missing:
                    self.pending = unit.start_gather(async_op=True, which=missing)
                    return
            index += step


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class _KeptCall(torch.autograd.Function):
    """Run ``fn`` with the unit gathered, recording its graph on detached inputs; in backward
    gather again and back-propagate through that graph."""

    @staticmethod
    def forward(ctx, unit: Unit, fn: Callable, spec: Any, leaves: list, anchor: torch.Tensor,
                *tensors: torch.Tensor) -> torch.Tensor:
        ctx.unit = unit
        ctx.inputs = [t.detach().requires_grad_(n) for t, n in zip(tensors, ctx.needs_input_grad[5:])]
        with unit.gathered(keep=True), torch.enable_grad(), \
                torch.autograd.graph.saved_tensors_hooks(unit.pack, unit.unpack):
            out = fn(*_rebuild(spec, leaves, ctx.inputs))
        _check_output(unit, out)
        ctx.out = out if out.requires_grad else None
        return out.detach()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.out is not None:
            with ctx.unit.gathered(backward=True):
                torch.autograd.backward(ctx.out, grad_out)  # the optimizer's hooks reduce-scatter here
        grads = [t.grad if t.requires_grad else None for t in ctx.inputs]
        ctx.out = ctx.inputs = None
        return (None, None, None, None, None, *grads)


def _check_output(unit: Unit, out: Any) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"ZeRO-3 unit {unit.name} must return one tensor, got {type(out).__name__}")


class _RecomputedCall(torch.autograd.Function):
    """Run ``fn`` with the unit gathered; in backward gather again, recompute and back-propagate."""

    @staticmethod
    def forward(ctx, unit: Unit, fn: Callable, spec: Any, leaves: list, anchor: torch.Tensor,
                *tensors: torch.Tensor) -> torch.Tensor:
        ctx.unit, ctx.fn, ctx.spec, ctx.leaves = unit, fn, spec, leaves
        device = tensors[0].device if tensors else anchor.device
        ctx.device, ctx.rng = device, _rng_state(device)
        ctx.save_for_backward(*tensors)
        with unit.gathered():
            out = fn(*_rebuild(spec, leaves, tensors))
        _check_output(unit, out)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        needs = ctx.needs_input_grad[5:]
        inputs = [t.detach().requires_grad_(n) for t, n in zip(ctx.saved_tensors, needs)]
        cpu_rng, cuda_rng = ctx.rng
        devices = [ctx.device] if cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices), ctx.unit.gathered(backward=True), torch.enable_grad():
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, ctx.device)
            out = ctx.fn(*_rebuild(ctx.spec, ctx.leaves, inputs))
            torch.autograd.backward(out, grad_out)  # the optimizer's hooks reduce-scatter here
        return (None, None, None, None, None, *[t.grad if n else None for t, n in zip(inputs, needs)])


_TENSOR = object()  # marks where a tensor argument goes back among a call's other leaves


def _rebuild(spec: Any, leaves: list, tensors) -> list:
    """The call's positional arguments, with its tensors put back in their slots."""
    it = iter(tensors)
    return tree_unflatten([next(it) if x is _TENSOR else x for x in leaves], spec)


def _wrap(unit: Unit, fn: Callable, recompute: bool) -> Callable:
    function = _RecomputedCall if recompute else _KeptCall

    @functools.wraps(fn)
    def call(*args: Any) -> torch.Tensor:
        if not torch.is_grad_enabled():  # evaluation: nothing to keep for a backward
            with unit.gathered():
                out = fn(*args)
            _check_output(unit, out)
            return out
        leaves, spec = tree_flatten(list(args))
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        slots = [_TENSOR if isinstance(x, torch.Tensor) else x for x in leaves]
        return function.apply(unit, fn, spec, slots, unit.anchor, *tensors)
    return call


def placeholder_parameters(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Replace every meta-device parameter of ``model`` by an empty one of ``dtype`` on ``device``
    that keeps its ``ShardingRecord`` (a tied parameter stays one object), so units can point
    it at gathered values. Call it before the optimizer sees the parameters."""
    replaced: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is None or not p.is_meta:
                continue
            if id(p) not in replaced:
                q = nn.Parameter(torch.empty(0, dtype=dtype, device=device), requires_grad=p.requires_grad)
                q.sharding = sharding_of(p)
                replaced[id(p)] = q
            module._parameters[name] = replaced[id(p)]


def partition_parameters(model: nn.Module, topo: Topology, optimizer: DistributedOptimizer,
                         overlap: bool = False, recompute: bool = False, max_live: int = 0) -> ParamGatherer:
    """Free every parameter of ``model`` (its values live in ``optimizer``'s ZeRO-3 shards) and
    make each of ``model.units()`` gather its parameters around its call; ``overlap``
    prefetches the next unit's gather (``--overlap-param-gather``); ``recompute`` makes each
    unit recompute its forward in backward instead of keeping its activations; ``max_live``
    gathered elements may stay whole from forward to backward. Call it once, after the
    model is cast to its training dtype (the shards' dtype). Returns the gatherer (its clock
    holds the exposed gather time)."""
    named = dict(model.named_parameters())
    by_id = {id(named[f.name]): f for f in optimizer.fragments()}
    if len(by_id) != len(named):
        missing = sorted(n for n, p in named.items() if id(p) not in by_id)
        raise ValueError(f"ZeRO-3: parameters without an optimizer fragment: {missing}")
    names = {id(p): n for n, p in named.items()}
    gatherer, covered = ParamGatherer(overlap, max_live), set()
    for index, (owner, method, params) in enumerate(model.units()):
        shards = [optimizer.param_shard(by_id[id(p)]) for p in params]
        for p, shard in zip(params, shards):
            if p.dtype != shard.dtype:
                raise ValueError(f"ZeRO-3: parameter {names[id(p)]} is {p.dtype}, its shard {shard.dtype}; give the "
                                 f"optimizer the model's dtype (Precision.param) and cast the model before partitioning")
            if id(p) not in covered:
                p.data = shard.new_empty(0)
                covered.add(id(p))
        unit = Unit(f"{index} ({type(owner).__name__}.{method})", index, params, shards, topo, gatherer)
        setattr(owner, method, _wrap(unit, getattr(owner, method), recompute))
        gatherer.units.append(unit)
    for unit in gatherer.units:
        for j, p in enumerate(unit.params):
            gatherer.readers.setdefault(id(p), []).append((unit, j))
    for p in named.values():
        optimizer.sum_before_reducing(p, len(gatherer.readers.get(id(p), [])))
    unused = sorted(names[i] for i in by_id if i not in covered)
    if unused:
        raise ValueError(f"ZeRO-3: parameters read by no unit of {type(model).__name__}.units(): {unused}; "
                         f"add them to the unit whose forward reads them")
    return gatherer
