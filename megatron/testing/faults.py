"""Kill a training job with SIGKILL at a chosen point of a save, and check what is left (for tests).

``run_and_kill`` forks the ranks itself (not through ``run_distributed``) so that a rank can die
without reporting back; once a victim dies the survivors are killed too, as a launcher would.
"""
from __future__ import annotations

import datetime
import os
import signal
import tempfile
import time
from typing import Callable

PHASES = ("tensor-write", "fsync", "manifest", "rename", "pointer", "retention")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(phase: str, call: int) -> None:
    """Make this process SIGKILL itself at the ``call``-th occurrence of ``phase`` in a save."""
    import shutil

    from megatron.checkpointing import commit, save, safetensors_io

    count = {"n": 0}

    def hit() -> None:
        count["n"] += 1
        if count["n"] == call:
            _die()

    def wrap(owner, name: str, before: bool = True, when: Callable[..., bool] = lambda *a, **k: True) -> None:
        original = getattr(owner, name)

        def patched(*args, **kwargs):
            if before and when(*args, **kwargs):
                hit()
            result = original(*args, **kwargs)
            if not before and when(*args, **kwargs):
                hit()
            return result
        setattr(owner, name, patched)

    if phase == "tensor-write":
        wrap(safetensors_io.SafetensorsWriter, "write_chunk")  # whole tensors (saves) and chunks (converter)
    elif phase == "fsync":
        wrap(os, "fsync")
    elif phase == "manifest":
        wrap(save, "write_atomic", when=lambda path, text: path.endswith("manifest.json"))
    elif phase == "rename":
        wrap(os, "replace")
    elif phase == "pointer":  # between 'latest' and the iteration file
        wrap(commit, "write_atomic", before=False, when=lambda path, text: path.endswith("latest"))
    elif phase == "retention":
        wrap(shutil, "rmtree", when=lambda path, *a, **k: ".deleting" in str(path))
    else:
        raise ValueError(f"unknown phase {phase!r}; one of {PHASES}")


def _rank_main(rank: int, world: int, store: str, argv: list[str], phase: str, call: int, victims: set[int]) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    if rank in victims:
        arm(phase, call)
    from megatron.training import pretrain

    pretrain(argv)
    os._exit(0)


def run_and_kill(world: int, argv: list[str], phase: str, call: int, victims: set[int],
                 grace: float = 0.3, timeout: float = 180) -> bool:
    """Run the job; returns True if a victim was killed (the survivors then are too)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank_main, args=(r, world, os.path.join(tmp, "store"), argv, phase, call,
                                                      victims)) for r in range(world)]
        for p in procs:
            p.start()
        deadline, killed = time.time() + timeout, False
        while time.time() < deadline:
            codes = [p.exitcode for p in procs]
            if -signal.SIGKILL in codes:
                killed = True
                time.sleep(0 if len(victims) == world else grace)
                break
            if all(c is not None for c in codes):
                break
            time.sleep(0.05)
        for p in procs:
            if p.exitcode is None:
                p.kill()
            p.join()
        if not killed and any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"job failed without being killed: exit codes {[p.exitcode for p in procs]}")
    return killed


def snapshot(folder: str) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            out[os.path.relpath(os.path.join(root, f), folder)] = open(os.path.join(root, f), "rb").read()
    return out
