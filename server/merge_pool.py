"""The merge pool: merges run on threads of their own (never Python's default pool, which the
rest of the server shares), in two lanes by size, each with a bounded queue.

A small composition merges in the small lane and so never waits behind large ones; a lane
whose queue is full refuses a new merge at once (MergeQueueFull) instead of letting the wait
grow without bound."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from server import metrics

T = TypeVar("T")


class MergeQueueFull(RuntimeError):
    """A lane has `num_workers` merges running and `queue_size` waiting; the merge did not start."""

    def __init__(self, lane: str, queue_size: int) -> None:
        super().__init__(
            f"The server is busy merging other compositions ({lane} merges: {queue_size} already waiting). "
            "Retry later, or use a composition that is already cached."
        )
        self.lane = lane


class MergeLane:
    """A thread pool of `num_workers` with at most `queue_size` merges waiting for a worker."""

    def __init__(self, name: str, num_workers: int, queue_size: int) -> None:
        self.name = name
        self.queue_size = queue_size
        self.max_pending = num_workers + queue_size
        self._executor = ThreadPoolExecutor(num_workers, thread_name_prefix=f"loramix-merge-{name}")
        self._lock = threading.Lock()
        self.num_pending = 0  # running + waiting; decremented by the worker when fn returns

    async def run(self, fn: Callable[..., T], *args) -> T:
        """fn(*args) on one of this lane's workers. Raises MergeQueueFull if the lane is full."""
        with self._lock:
            if self.num_pending >= self.max_pending:
                raise MergeQueueFull(self.name, self.queue_size)
            self.num_pending += 1
            metrics.MERGE_QUEUE_DEPTH.labels(lane=self.name).set(self.num_pending)
        future = self._executor.submit(fn, *args)
        future.add_done_callback(self._finished)
        return await asyncio.wrap_future(future)

    def _finished(self, _future) -> None:
        with self._lock:
            self.num_pending -= 1
            metrics.MERGE_QUEUE_DEPTH.labels(lane=self.name).set(self.num_pending)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class MergePool:
    """Two lanes: compositions of at most `small_max_skills` skills, and the rest."""

    def __init__(self, *, num_workers: int, queue_size: int, small_max_skills: int) -> None:
        self.small_max_skills = small_max_skills
        self.small = MergeLane("small", num_workers, queue_size)
        self.large = MergeLane("large", num_workers, queue_size)

    def lane_for(self, num_skills: int) -> MergeLane:
        """The lane a composition of `num_skills` skills merges in."""
        return self.small if num_skills <= self.small_max_skills else self.large

    def shutdown(self) -> None:
        """Stop the workers; merges still waiting are cancelled."""
        self.small.shutdown()
        self.large.shutdown()
