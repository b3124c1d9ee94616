"""Progress bars for long conversions and loads: shown on a terminal, silent in logs.

``enabled=None`` (the default everywhere) shows the bar only when stderr is a TTY, so a job
whose output goes to a file gets no carriage-return noise; True or False forces it either way.
"""
from __future__ import annotations

import sys

from tqdm import tqdm


def show_progress(enabled: bool | None) -> bool:
    return sys.stderr.isatty() if enabled is None else bool(enabled)


def progress_bar(total: int, desc: str, unit: str, enabled: bool | None = None, **kwargs) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, disable=not show_progress(enabled), file=sys.stderr, **kwargs)
