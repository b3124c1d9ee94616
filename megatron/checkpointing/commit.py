"""Atomic commits on the file system: files, checkpoint folders, and recovery after a crash.

A folder is committed by renaming a finished, fsynced temporary folder into place. Replacing
an existing folder of the same name takes two renames (``final`` -> ``final.old``, then
``tmp`` -> ``final``); at every moment one complete copy exists under ``final`` or
``final.old``, and ``complete_folder`` / ``recover_interrupted_commits`` find it.
"""
from __future__ import annotations

import os
import re
import shutil

from megatron.checkpointing.reader import MANIFEST

OLD_SUFFIX = ".old"


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers see the old or the new content, never a mix."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def is_checkpoint(path: str) -> bool:
    """A committed checkpoint folder: its manifest is the last file written before the commit."""
    return os.path.isfile(os.path.join(path, MANIFEST))


def commit_folder(tmp: str, final: str) -> None:
    """Move the finished folder ``tmp`` to ``final``, replacing an older checkpoint of that name
    without a moment in which neither copy is complete."""
    fsync_dir(tmp)
    parent = os.path.dirname(os.path.abspath(final))
    if os.path.lexists(final):
        old = final + OLD_SUFFIX
        if os.path.lexists(old):  # a previous replace crashed after its second rename: final is complete
            shutil.rmtree(old)
        os.replace(final, old)
        fsync_dir(parent)
        os.replace(tmp, final)
        fsync_dir(parent)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    fsync_dir(parent)


def complete_folder(final: str) -> str | None:
    """``final`` if it is a committed checkpoint, else the copy a crashed replace left in
    ``final.old``, else None."""
    if is_checkpoint(final):
        return final
    if not os.path.lexists(final) and is_checkpoint(final + OLD_SUFFIX):
        return final + OLD_SUFFIX
    return None


def recover_interrupted_commits(folder: str) -> list[str]:
    """Put back every ``X.old`` whose replace crashed between its two renames (``X`` missing);
    remove those whose replace finished (``X`` complete). Returns the restored names."""
    restored = []
    for name in sorted(os.listdir(folder)):
        old = os.path.join(folder, name)
        if not name.endswith(OLD_SUFFIX) or not os.path.isdir(old) or not is_checkpoint(old):
            continue
        final = old[:-len(OLD_SUFFIX)]
        if not os.path.lexists(final):
            os.replace(old, final)
            restored.append(os.path.basename(final))
        elif is_checkpoint(final):
            shutil.rmtree(old)
    if restored:
        fsync_dir(folder)
    return restored


POINTER, ITERATION_FILE = "latest", "latest_checkpointed_iteration.txt"
_STEP = re.compile(r"^global_step(\d+)$")


def write_pointers(folder: str, tag: str, iteration: int) -> None:
    """``latest`` first (the loader follows it), then Megatron's iteration file."""
    write_atomic(os.path.join(folder, POINTER), tag)
    write_atomic(os.path.join(folder, ITERATION_FILE), str(iteration))


def tidy_folder(folder: str) -> None:
    """Under the folder's lock, before a save: finish what a killed save or retention left
    (``.old`` copies, half-deleted folders, pointer temporaries) and make the iteration file
    agree with ``latest``."""
    recover_interrupted_commits(folder)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.endswith(DELETING):
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith((POINTER + ".tmp.", ITERATION_FILE + ".tmp.")):
            os.remove(path)
    latest = os.path.join(folder, POINTER)
    if os.path.isfile(latest):
        with open(latest, "rb") as f:
            tag = f.read().decode("utf-8", "replace").strip()
        match = _STEP.match(tag)
        iteration_file = os.path.join(folder, ITERATION_FILE)
        current = open(iteration_file).read().strip() if os.path.isfile(iteration_file) else None
        if match and is_checkpoint(os.path.join(folder, tag)) and current != match.group(1):
            write_atomic(iteration_file, match.group(1))


DELETING = ".deleting"


def remove_old_checkpoints(folder: str, keep: int) -> list[str]:
    """Keep the newest ``keep`` native checkpoints and whatever ``latest`` names; each removed
    folder is first renamed to a hidden name, so a half-deleted one never looks complete."""
    steps = sorted((int(m.group(1)), n) for n in os.listdir(folder) if (m := _STEP.match(n)))
    latest = os.path.join(folder, POINTER)
    named = open(latest).read().strip() if os.path.isfile(latest) else None
    removed = []
    for _, name in steps[:-keep] if keep > 0 else []:
        if name == named:
            continue
        hidden = os.path.join(folder, f".{name}{DELETING}")
        os.replace(os.path.join(folder, name), hidden)
        removed.append(name)
    if removed:
        fsync_dir(folder)
        for name in removed:
            shutil.rmtree(os.path.join(folder, f".{name}{DELETING}"))
    return removed
