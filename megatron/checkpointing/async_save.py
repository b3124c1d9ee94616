"""``--async-save``: the save call does not copy the state; a background thread copies it to host
memory and then writes and fsyncs the rank's files, while the next iteration's forward and
backward run (they do not change the saved optimizer state). The next optimizer step, the only
thing that changes it, first waits for the copy (``before_update``, registered with the
optimizer's ``hold_update_until``); so the step is blocked only by whatever of the copy the
forward and backward did not hide. The commit (agreement,
manifest, rename, pointers) runs in the main thread once every rank's writer is done.

The host copy goes into one buffer that is allocated (pinned on a GPU) and touched once, in a
background thread started by ``prepare`` when training starts, and reused by every save: a
fresh allocation's page faults cost ten times the copy itself.

The background thread never runs a collective, so it never races the training step's own
collectives. ``poll`` (once per iteration while a save is pending) asks every rank, with one
small all-reduce, whether all writers are done, and commits if so; ``wait`` blocks for the
writer and commits; a new save, a load and the end of training all ``wait`` first. An error in
any rank's writer is raised on every rank by the commit's agreement. A crash before the commit
leaves only a temporary folder: the previous checkpoint and the ``latest`` files are untouched.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from megatron.checkpointing.agree import as_checkpoint_error
from megatron.checkpointing.iolog import IoStats, describe_io
from megatron.checkpointing.reader import STATES, WEIGHTS_ONLY
from megatron.checkpointing.save import PendingSave, begin_save, capture_rank_state, finish_save, write_rank_part
from megatron.core import comm
from megatron.core.optimizer.distributed_optimizer import DistributedOptimizer
from megatron.core.parallel_state import Topology

_savers: list["AsyncSaver"] = []  # every saver of this process, for wait_for_async_saves


class AsyncSaver:
    """At most one save in flight per process; host buffers are kept for the next save."""

    def __init__(self, topo: Topology, device: torch.device, log: Callable[[str], None]) -> None:
        self.topo, self.device, self.log = topo, device, log
        self._buffers: list[torch.Tensor] = []
        self._preparing: threading.Thread | None = None
        self.prepare_seconds = 0.0  # how long the background allocation took (for logs and benchmarks)
        self._pending: PendingSave | None = None
        self._thread: threading.Thread | None = None
        self._result: tuple = ()
        self._copied = threading.Event()  # the pending save's state is in the host buffer
        self._copied.set()
        self.fence_seconds = 0.0  # how long the last before_update waited for a copy
        _savers.append(self)

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def prepare(self, model: nn.Module, optimizer: DistributedOptimizer, save_optim: bool = True) -> None:
        """Allocate and touch the host buffer for this rank's state in a background thread, so that
        the first save only copies; the first save waits for it if it is still running."""
        views = capture_rank_state(model, optimizer, self.topo, STATES if save_optim else WEIGHTS_ONLY,
                                   save_rng=False).tensors
        shapes = [(t.numel(), t.dtype, t.is_cuda) for t in views]

        def allocate() -> None:
            start = time.perf_counter()
            self._buffers = _allocate(shapes)
            self.prepare_seconds = time.perf_counter() - start

        self._preparing = threading.Thread(target=allocate, name="async-save buffers", daemon=True)
        self._preparing.start()

    def wait_prepared(self) -> None:
        """Block until ``prepare``'s buffers are allocated (if it was called)."""
        if self._preparing is not None:
            self._preparing.join()
            self._preparing = None

    def _host_copies(self, tensors: list[torch.Tensor], ready: torch.cuda.Event | None) -> list[torch.Tensor]:
        """Copies into the reused host buffer (pinned when the state is on a GPU, so the copy is a
        DMA on a stream of its own, after ``ready``: the end of the step that made the state)."""
        self.wait_prepared()
        if [(b.numel(), b.dtype) for b in self._buffers] != [(t.numel(), t.dtype) for t in tensors]:
            self._buffers = _allocate([(t.numel(), t.dtype, t.is_cuda) for t in tensors])
        if ready is None:
            for b, t in zip(self._buffers, tensors):
                b.copy_(t.reshape(-1))
            return self._buffers
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_event(ready)
        with torch.cuda.stream(stream):
            for b, t in zip(self._buffers, tensors):
                b.copy_(t.reshape(-1), non_blocking=True)
        stream.synchronize()
        return self._buffers

    def save(self, save_dir: str, state: dict, model: nn.Module, optimizer: DistributedOptimizer,
             save_optim: bool = True, save_rng: bool = True, keep_last_k: int | None = None) -> float:
        """Collective: wait for the previous save, prepare the folder and start the background
        copy and write of the state. Returns the seconds the caller was blocked for this save,
        waiting for the previous one included (the next ``before_update`` may add to it)."""
        start = time.perf_counter()
        self.wait()  # a second save waits for the first
        waited = time.perf_counter() - start
        pending = begin_save(save_dir, state, optimizer, self.topo, save_optim, keep_last_k)
        rs = capture_rank_state(model, optimizer, self.topo, pending.states, save_rng)  # views, copied below
        ready = None
        if any(t.is_cuda for t in rs.tensors):
            ready = torch.cuda.Event()
            ready.record()

        def write() -> None:
            try:
                rs.tensors = self._host_copies(rs.tensors, ready)
            except Exception as e:  # noqa: BLE001 - this save's error, agreed by every rank at the commit
                self._result = (None, IoStats(rs.rank, 0, 0.0),
                                as_checkpoint_error(e, f"saving {pending.final} (rank {rs.rank})"))
                return
            finally:
                self._copied.set()  # the optimizer may change the live state again
            self._result = write_rank_part(pending, rs)

        self._pending, self._result = pending, ()
        self._copied.clear()
        optimizer.hold_update_until(self.before_update)  # the live state stays as saved until copied
        self._thread = threading.Thread(target=write, name=f"async-save {pending.tag}", daemon=True)
        self._thread.start()
        blocked = time.perf_counter() - start
        why = f", {waited:.3f} s of it waiting for the previous save" if waited >= 0.001 else ""
        self.log(f"saving checkpoint at iteration {state['iteration']} to {pending.final} in the background "
                 f"(the step was blocked {blocked:.3f} s{why})")
        return blocked

    def before_update(self) -> float:
        """Block until the pending save has copied the state it saves (the optimizer's step
        calls it). Returns the seconds waited."""
        start = time.perf_counter()
        self._copied.wait()
        self.fence_seconds = time.perf_counter() - start
        return self.fence_seconds

    def poll(self) -> None:
        """Collective while a save is pending: commit it if every rank's writer has finished."""
        if self._pending is None:
            return
        done = torch.tensor([0.0 if self._thread.is_alive() else 1.0], device=self.device)
        comm.world_all_reduce(done, op=dist.ReduceOp.MIN)
        if done.item() > 0:
            self._commit()

    def wait(self) -> None:
        """Collective: block until the pending save (if any) is written and committed."""
        if self._pending is not None:
            self._thread.join()
            self._commit()

    def _commit(self) -> None:
        self._thread.join()
        pending, (entry, stats, error) = self._pending, self._result
        self._pending, self._thread, self._result = None, None, ()
        all_stats = finish_save(pending, entry, stats, error, self.topo)  # raises the same error everywhere
        self.log(f"committed checkpoint {pending.final} (saved at iteration {pending.state['iteration']}): "
                 + describe_io("wrote", all_stats, time.perf_counter() - pending.started))

    def close(self) -> None:
        """Wait for the pending save and forget this saver."""
        try:
            self.wait()
        finally:
            if self in _savers:
                _savers.remove(self)


def _allocate(shapes: list[tuple[int, torch.dtype, bool]]) -> list[torch.Tensor]:
    """One host buffer per dtype for tensors of ``shapes`` (numel, dtype, on a GPU), touched now
    (pinned memory is touched by its allocation), returned as one flat view per tensor."""
    pin = any(cuda for _, _, cuda in shapes)
    pools = {}
    for dtype in dict.fromkeys(d for _, d, _ in shapes):
        pools[dtype] = torch.empty(sum(n for n, d, _ in shapes if d == dtype), dtype=dtype, pin_memory=pin)
        if not pin:
            pools[dtype].zero_()  # the page faults happen here, not in the save's copy
    views, used = [], dict.fromkeys(pools, 0)
    for n, dtype, _ in shapes:
        views.append(pools[dtype][used[dtype]:used[dtype] + n])
        used[dtype] += n
    return views


def wait_for_async_saves() -> None:
    """Collective: commit every pending background save of this process (before a load)."""
    for saver in list(_savers):
        saver.wait()
