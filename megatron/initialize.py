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
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
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


def rng_state() -> dict:
    """This rank's RNG states as JSON-friendly values (restored exactly on the same layout)."""
    state = {
        "python": _jsonable(random.getstate()),
        "numpy": _jsonable(np.random.get_state()),
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _jsonable(x):
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x
