"""Read logged scalar curves (e.g. the LM loss) back from a run folder.

A run folder holds TensorBoard event files and/or ``metrics.jsonl`` files,
possibly in subfolders and possibly several of each when a resumed run appended
into the same folder. ``read_scalars`` merges them into one ``{iteration: value}``
curve in which, for an iteration logged more than once, the newest record wins.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

METRICS_FILENAME = "metrics.jsonl"
ITERATION_KEY = "iteration"


class MetricsReadError(ValueError):
    """A run folder cannot provide the requested curve (no files, unknown tag, bad line)."""


@dataclass(frozen=True)
class _Record:
    """One logged value; records sort by (time, file, position) so the newest is last."""

    time: float
    file_index: int
    position: int
    iteration: int
    value: float


def find_metrics_files(run_dir: str) -> tuple[list[str], list[str]]:
    """Return (event files, metrics.jsonl files) under ``run_dir``, recursively, sorted."""
    if not os.path.isdir(run_dir):
        raise MetricsReadError(f"run folder {run_dir!r} does not exist or is not a folder")
    event_files: list[str] = []
    jsonl_files: list[str] = []
    for root, dirs, files in os.walk(run_dir):
        dirs.sort()  # deterministic order, so ties between files break the same way every time
        for name in sorted(files):
            if "tfevents" in name:
                event_files.append(os.path.join(root, name))
            elif name == METRICS_FILENAME:
                jsonl_files.append(os.path.join(root, name))
    return event_files, jsonl_files


def _event_file_records(path: str, file_index: int, tag: str, tags_seen: set[str]) -> list[_Record]:
    """Scalars of ``tag`` in one event file, timed by each event's own wall time."""
    # One accumulator per file keeps every event (size 0 = unbounded) and turns off
    # orphan purging: a resumed run re-logging earlier steps is data to merge, not a crash.
    acc = event_accumulator.EventAccumulator(
        path,
        size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0},
        purge_orphaned_data=False,
    )
    acc.Reload()
    tags = acc.Tags()
    scalar_tags = set(tags[event_accumulator.SCALARS])
    tensor_tags = set(tags[event_accumulator.TENSORS])
    tags_seen.update(scalar_tags, tensor_tags)
    records: list[_Record] = []
    if tag in scalar_tags:
        for pos, ev in enumerate(acc.Scalars(tag)):
            records.append(_Record(ev.wall_time, file_index, pos, int(ev.step), float(ev.value)))
    elif tag in tensor_tags:
        # Writers using the TF2 summary API store scalars as 0-d tensors.
        for pos, ev in enumerate(acc.Tensors(tag)):
            array = tensor_util.make_ndarray(ev.tensor_proto)
            if array.size != 1:
                raise MetricsReadError(f"tag {tag!r} in {path} holds a tensor of shape {array.shape}, not a scalar")
            records.append(_Record(ev.wall_time, file_index, pos, int(ev.step), float(array.item())))
    return records


def _jsonl_file_records(path: str, file_index: int, tag: str, tags_seen: set[str]) -> list[_Record]:
    """Values of ``tag`` in one metrics.jsonl; lines carry no time, so the file's mtime
    stands for all of them and a later line beats an earlier one (appended on resume)."""
    mtime = os.path.getmtime(path)
    records: list[_Record] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MetricsReadError(f"{path}:{line_no}: not a JSON object: {exc}") from exc
            if not isinstance(row, dict) or ITERATION_KEY not in row:
                raise MetricsReadError(f"{path}:{line_no}: expected an object with an {ITERATION_KEY!r} key")
            tags_seen.update(k for k in row if k != ITERATION_KEY)
            if tag in row:
                try:
                    iteration, value = int(row[ITERATION_KEY]), float(row[tag])
                except (TypeError, ValueError) as exc:
                    raise MetricsReadError(f"{path}:{line_no}: non-numeric iteration or {tag!r}: {exc}") from exc
                records.append(_Record(mtime, file_index, line_no, iteration, value))
    return records


def read_scalars(run_dir: str, tag: str) -> dict[int, float]:
    """Return ``{iteration: value}`` for ``tag`` over every event and metrics file in ``run_dir``.

    Where an iteration was logged more than once the newest record wins: newest by
    event wall time (TensorBoard) or file mtime (metrics.jsonl), then by file path
    and position within the file.
    """
    return read_run(run_dir, tag)[0]


def read_run(run_dir: str, tag: str) -> tuple[dict[int, float], list[str]]:
    """``read_scalars`` and the files that held ``tag`` (so a report can say what it read)."""
    event_files, jsonl_files = find_metrics_files(run_dir)
    if not event_files and not jsonl_files:
        raise MetricsReadError(
            f"no TensorBoard event files (*tfevents*) or {METRICS_FILENAME} files under {run_dir!r}"
        )
    tags_seen: set[str] = set()
    records: list[_Record] = []
    for index, path in enumerate(event_files):
        records.extend(_event_file_records(path, index, tag, tags_seen))
    for index, path in enumerate(jsonl_files, start=len(event_files)):
        records.extend(_jsonl_file_records(path, index, tag, tags_seen))
    if not records:
        known = ", ".join(repr(t) for t in sorted(tags_seen)) or "none"
        raise MetricsReadError(f"tag {tag!r} not found under {run_dir!r}; tags present: {known}")
    records.sort(key=lambda r: (r.time, r.file_index, r.position))
    curve: dict[int, float] = {}
    for record in records:
        curve[record.iteration] = record.value
    all_files = event_files + jsonl_files
    used = [all_files[i] for i in sorted({r.file_index for r in records})]
    return dict(sorted(curve.items())), used
