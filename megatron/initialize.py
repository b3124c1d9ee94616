"""Distributed start-up and seeding."""
from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist


def initialize_distributed(backend: str = "auto", device: str = "auto",
                           local_rank: int | None = None) -> tuple[int, int, torch.device]:
    """Join the process group torchrun or the deepspeed launcher describes (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT, LOCAL_RANK; the latter also passes ``--local_rank``), or none
    for a single process. Returns (rank, world size, device). NCCL on GPUs, gloo on CPUs.
    """
    env_local = os.environ.get("LOCAL_RANK")
    if local_rank is not None and env_local is not None and int(env_local) != local_rank:
        raise ValueError(f"--local_rank {local_rank} disagrees with the environment's LOCAL_RANK {env_local}")
    if local_rank is not None and env_local is None:
        os.environ["LOCAL_RANK"] = str(local_rank)
    if device == "auto":  # the device follows the backend: NCCL only moves CUDA tensors
        device = "cuda" if backend == "nccl" or (backend == "auto" and torch.cuda.is_available()) else "cpu"
    if backend == "nccl" and device == "cpu":
        raise ValueError("--distributed-backend nccl needs --device cuda (NCCL cannot move CPU tensors); "
                         "use --distributed-backend gloo to train on CPUs")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA device is available")
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if backend == "auto":
            backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if device == "cuda":
        return rank, world, torch.device("cuda", torch.cuda.current_device())
    return rank, world, torch.device("cpu")


def set_random_seeds(seed: int) -> None:
    """Seed every generator that dropout and data shuffling may use on this rank."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def shutdown_distributed(wait: bool = True) -> None:
    """Destroy the process groups while the interpreter is whole; with ``wait``, after every
    rank gets here (a rank leaving on an error may have peers that never will).

    A process that exits with live gloo groups destroys their C++ worker threads during
    interpreter finalisation, still joinable or holding work whose tensors need the GIL:
    ``std::terminate`` ("terminate called without an active exception", SIGABRT) in a
    thread without a Python frame, now and then (pytorch/pytorch#179291, #190489).
    """
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
