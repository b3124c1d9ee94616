"""Read the next global batch in a background thread while the current one trains.

The batch at ``consumed`` samples is a pure function of ``consumed`` (DESIGN.md section 4),
so prefetching changes timing only: the batches, and the losses, are the same as without it.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Prefetcher(Generic[T]):
    """``get(consumed)`` returns ``load(consumed, batch(consumed))`` and starts loading the next
    batch, at ``consumed + batch(consumed)`` (``batch`` gives the global batch size there)."""

    def __init__(self, load: Callable[[int, int], T], batch: Callable[[int], int], enabled: bool) -> None:
        self.load, self.batch = load, batch
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if enabled else None
        self.pending: tuple[int, Future] | None = None

    def get(self, consumed: int) -> T:
        size = self.batch(consumed)
        if self.pool is None:
            return self.load(consumed, size)
        if self.pending is not None and self.pending[0] == consumed:
            batch = self.pending[1].result()
        else:
            batch = self.load(consumed, size)
        upcoming = consumed + size
        self.pending = (upcoming, self.pool.submit(self.load, upcoming, self.batch(upcoming)))
        return batch

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
