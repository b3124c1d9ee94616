"""One job at a time per checkpoint folder.

The job that saves into a folder holds an exclusive ``flock`` on ``DIR/.lock`` for its whole
life; a second job refuses to start (naming the holder, whose host and pid are written in the
file). The kernel drops the lock when its process dies, so a lock left by a killed job is
simply taken over. Only the holder touches the folder's temporary save folders.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from megatron.checkpointing.safetensors_io import CheckpointError

LOCK = ".lock"
_held: dict[str, int] = {}  # realpath of folder -> open fd of its lock, in this process


def acquire_folder_lock(folder: str) -> None:
    """Hold ``folder``'s lock for the rest of this process (idempotent); refuse if another job has it."""
    key = os.path.realpath(folder)
    if key in _held:
        return
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe_holder(fd)
        os.close(fd)
        raise CheckpointError(f"--save {folder} is in use by another job ({holder}): two jobs saving into one "
                              f"folder would overwrite each other's checkpoints; give this job another --save "
                              f"folder, or stop the other job") from None
    previous = _describe_holder(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}).encode(), 0)
    os.fsync(fd)
    _held[key] = fd
    if previous != "holder unknown":
        print(f"note: took over the lock of {folder} left by a job that ended ({previous})", flush=True)


def release_folder_lock(folder: str) -> None:
    fd = _held.pop(os.path.realpath(folder), None)
    if fd is not None:
        os.ftruncate(fd, 0)  # a clean end: the next job has nothing to take over
        os.close(fd)  # closing drops the flock


def holds_folder_lock(folder: str) -> bool:
    return os.path.realpath(folder) in _held


def _describe_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"null")
        return f"host {info['host']}, pid {info['pid']}"
    except (ValueError, TypeError, KeyError):
        return "holder unknown"
