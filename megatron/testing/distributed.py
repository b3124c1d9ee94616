"""Run a function on N forked CPU processes with gloo; used by the multi-process tests.

Workers fork after torch is imported, so a 4-rank test starts in well under a second.
"""
from __future__ import annotations

import datetime
import os
import pickle
import queue as queue_mod
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, store_path: str, fn: Callable, args: tuple, queue) -> None:
    torch.set_num_threads(1)
    try:
        store = dist.FileStore(store_path, world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
        result = fn(rank, world, *args)
        dist.barrier()
        # Plain pickle copies tensors into bytes; the queue's own pickler would pass shared
        # memory handles that die with this process before the parent reads them.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # report every failure to the parent, which raises it
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 300) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` gloo ranks; returns the results by rank."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(r, world, store, fn, args, queue)) for r in range(world)]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        errors = []
        for _ in range(world):
            try:
                rank, status, value = queue.get(timeout=timeout)
            except queue_mod.Empty:
                errors.append(f"no answer from a worker within {timeout} s")
                break
            if status == "ok":
                results[rank] = pickle.loads(value)
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.kill()
        if errors:
            raise RuntimeError("distributed worker failed\n" + "\n".join(errors))
    return [results[r] for r in range(world)]
