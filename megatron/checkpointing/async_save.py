"""``--async-save``: the training step blocks only to copy the state to host memory; a background
thread writes and fsyncs the rank's files; the commit (agreement, manifest, rename, pointers)
runs in the main thread once every rank's writer is done.

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

from megatron.checkpointing.iolog import describe_io
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
        self._pending: PendingSave | None = None
        self._thread: threading.Thread | None = None
        self._result: tuple = ()
        _savers.append(self)

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def _host_copies(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copies into reused host buffers (pinned when the state is on a GPU, so the copy is a DMA)."""
        if [b.numel() for b in self._buffers] != [t.numel() for t in tensors]:
            self._buffers = [torch.empty(t.numel(), dtype=t.dtype, pin_memory=t.is_cuda) for t in tensors]
        for b, t in zip(self._buffers, tensors):
            b.copy_(t.reshape(-1), non_blocking=t.is_cuda)
        if any(t.is_cuda for t in tensors):
            torch.cuda.synchronize()
        return self._buffers

    def save(self, save_dir: str, state: dict, model: nn.Module, optimizer: DistributedOptimizer,
             save_optim: bool = True, save_rng: bool = True, keep_last_k: int | None = None) -> float:
        """Collective: wait for the previous save, prepare the folder, copy the state to host
        memory and start the writer. Returns the seconds the caller was blocked for this save."""
        self.wait()  # a second save waits for the first
        start = time.perf_counter()
        pending = begin_save(save_dir, state, optimizer, self.topo, save_optim, keep_last_k)
        rs = capture_rank_state(model, optimizer, self.topo, pending.states, save_rng, copy=self._host_copies)

        def write() -> None:
            self._result = write_rank_part(pending, rs)

        self._pending, self._result = pending, ()
        self._thread = threading.Thread(target=write, name=f"async-save {pending.tag}", daemon=True)
        self._thread.start()
        blocked = time.perf_counter() - start
        self.log(f"saving checkpoint at iteration {state['iteration']} to {pending.final} in the background "
                 f"(the step was blocked {blocked:.3f} s)")
        return blocked

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


def wait_for_async_saves() -> None:
    """Collective: commit every pending background save of this process (before a load)."""
    for saver in list(_savers):
        saver.wait()
