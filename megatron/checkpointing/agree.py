"""Make every rank fail together, with the same message, when any rank of a checkpoint step fails.

Without this, one rank's CheckpointError leaves the others blocked in the next collective
until gloo reports a closed connection, and every rank prints its own traceback.
"""
from __future__ import annotations

import errno
import sys
from types import ModuleType

from megatron.checkpointing.safetensors_io import CheckpointError

_NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def as_checkpoint_error(e: BaseException, what: str) -> CheckpointError:
    """A one-line CheckpointError for an OSError of ``what`` (disk full gets its own advice)."""
    if isinstance(e, CheckpointError):
        return e
    if isinstance(e, OSError) and e.errno in _NO_SPACE:
        return CheckpointError(f"{what}: no space left ({e.strerror}{': ' + e.filename if e.filename else ''}); "
                               f"the previous checkpoint is intact; free disk space (or use --keep-last-k) and resume")
    return CheckpointError(f"{what}: {type(e).__name__}: {e}")


def process_group() -> ModuleType | None:
    """``torch.distributed`` if this process has initialised a process group, else None. Looked up
    among the imported modules: a process that never imported torch has no process group, and the
    one-process converter does not pay torch's import (seconds, and half a GiB of RSS) to learn it."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def raise_if_any_failed(error: CheckpointError | None) -> None:
    """Collective: raise the lowest failing rank's error on every rank, or return if none failed.
    One small all_reduce when none failed (every planned-load round agrees this way); the
    messages are gathered only when one did."""
    dist = process_group()
    if dist is None or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return
    if not _any_rank(dist, error is not None):
        return
    messages: list = [None] * dist.get_world_size()
    dist.all_gather_object(messages, None if error is None else str(error))
    raise CheckpointError(next(m for m in messages if m is not None))


def _any_rank(dist: ModuleType, flag: bool) -> bool:
    """Collective: is ``flag`` set on any rank (on the backend's device: CUDA under NCCL)."""
    import torch  # a process group exists, so torch is imported already

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flags = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags.item())
