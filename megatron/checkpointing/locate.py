"""Find the checkpoint that ``--load`` means, or say clearly why there is none.

A run starts from scratch only where that is plainly intended: the ``--load`` folder is
missing or empty and it is also the ``--save`` folder of a new run (``IF_NEW``), or the user
asked for it (``ALWAYS``). A typo, a deleted ``latest``, a file given as ``--load``, or a
folder that holds only the other kind of checkpoint is an error that says what to do.
"""
from __future__ import annotations

import os
import re

from megatron.checkpointing.commit import complete_folder, is_checkpoint
from megatron.checkpointing.reader import MANIFEST
from megatron.checkpointing.safetensors_io import CheckpointError

NEVER, IF_NEW, ALWAYS = "never", "if-new", "always"  # when a missing checkpoint means "start fresh"
POINTERS = ("latest", "latest_universal", "latest_checkpointed_iteration.txt")
_STEP = re.compile(r"^global_step(\d+)(_universal)?$")


def read_pointer(path: str) -> str:
    """The folder name stored in ``latest`` / ``latest_universal``, refused unless it is one
    plain name inside the same folder."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, expected a small file naming the newest checkpoint "
                              f"folder (e.g. global_step100); remove it and pass --load-tag")
    with open(path, "rb") as f:
        raw = f.read(4097)
    try:
        tag = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        tag = ""
    if not tag or len(raw) > 4096 or "/" in tag or "\\" in tag or tag in (".", "..") or "\0" in tag:
        raise CheckpointError(f"{path} is corrupted: it should hold one checkpoint folder name such as "
                              f"global_step100, found {raw[:60]!r}; rewrite it or pass --load-tag")
    return tag


def checkpoint_folders(folder: str) -> list[str]:
    """Committed ``global_stepN[_universal]`` folders, oldest step first."""
    found = []
    for name in os.listdir(folder):
        match = _STEP.match(name)
        if match and is_checkpoint(os.path.join(folder, name)):
            found.append((int(match.group(1)), name))
    return [name for _, name in sorted(found)]


def _user_entries(folder: str) -> list[str]:
    """Entries other than the hidden temporary and lock files a save leaves."""
    return sorted(n for n in os.listdir(folder) if not n.startswith("."))


def resolve_checkpoint(load_dir: str, universal: bool, tag: str | None = None,
                       start_fresh: str = NEVER) -> str | None:
    """The checkpoint folder to load: ``tag``, else the one ``latest[_universal]`` names; ``load_dir``
    may also be a checkpoint folder itself. None means: start from scratch (see ``start_fresh``)."""
    flag = "--universal-checkpoint" if universal else "--load"
    if not os.path.lexists(load_dir):
        if start_fresh != NEVER:
            return None
        raise CheckpointError(f"--load {load_dir} does not exist: check the path for a typo. To start a new "
                              f"run, give the same folder to --save and --load, or pass --allow-missing-checkpoint")
    if not os.path.isdir(load_dir):
        raise CheckpointError(f"--load {load_dir} is a file, expected a checkpoint folder (the --save folder of "
                              f"a run, or one global_stepN folder inside it)")
    if tag is None and os.path.exists(os.path.join(load_dir, MANIFEST)):
        return load_dir
    if tag is not None:
        return _existing(load_dir, tag, f"--load-tag {tag}")
    pointer, other = ("latest_universal", "latest") if universal else ("latest", "latest_universal")
    if os.path.lexists(os.path.join(load_dir, pointer)):
        name = read_pointer(os.path.join(load_dir, pointer))
        return _existing(load_dir, name, f"{os.path.join(load_dir, pointer)} names {name}, which")
    steps = [s for s in checkpoint_folders(load_dir) if s.endswith("_universal") == universal]
    if steps:
        raise CheckpointError(f"{load_dir} has no '{pointer}' file but holds checkpoints {', '.join(steps)}: the "
                              f"pointer was deleted; pass --load-tag {steps[-1]} (or restore '{pointer}') to resume")
    if os.path.lexists(os.path.join(load_dir, other)):
        if universal:
            raise CheckpointError(f"--universal-checkpoint: {load_dir} holds native checkpoints ('latest') but no "
                                  f"'latest_universal': drop --universal-checkpoint to resume from the native "
                                  f"checkpoint, or run tools/convert_to_universal.py first")
        raise CheckpointError(f"{load_dir} holds only a universal checkpoint ('latest_universal', no 'latest'): "
                              f"add --universal-checkpoint to resume from it")
    entries = _user_entries(load_dir)
    if start_fresh == ALWAYS or (start_fresh == IF_NEW and not entries):
        return None
    found = f"it holds {', '.join(entries[:5])}{' ...' if len(entries) > 5 else ''}" if entries else "it is empty"
    raise CheckpointError(f"{flag} {load_dir} holds no checkpoint ({found}). Check the path; to start a new run, "
                          f"give the same new folder to --save and --load, or pass --allow-missing-checkpoint")


def _existing(load_dir: str, name: str, what: str) -> str:
    path = complete_folder(os.path.join(load_dir, name))
    if path is not None:
        return path
    steps = checkpoint_folders(load_dir)
    state = f"is incomplete (no {MANIFEST}: deleted, or its save did not finish)" if os.path.lexists(os.path.join(load_dir, name)) else "does not exist"
    hint = f"checkpoints there: {', '.join(steps)}; pass --load-tag" if steps else "there are no checkpoints there"
    raise CheckpointError(f"{what} {state} under {load_dir}: {hint}")
