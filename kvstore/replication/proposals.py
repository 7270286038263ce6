"""Proposal futures waiting for an outcome, and their deadlines.

Used on the driver thread only (`track`, `expire`, `fail_all`): every future is completed on
that thread, so a completion can never race another. A deadline that passes fails the
future with `ProposalTimeoutError`; an outcome that arrives later is ignored.
"""

from __future__ import annotations

import heapq
import itertools
from concurrent.futures import Future

from kvstore.replication import ProposalTimeoutError, ReplicationError

Result = bytes | None


def settle(future: Future[Result], result: Result = None, error: BaseException | None = None) -> None:
    """Complete `future` with `result` or `error` unless it is already done (or cancelled)."""
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class Deadlines:
    """The deadlines of the proposals in flight on one node (a heap; driver thread only)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, Future[Result]]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def track(self, future: Future[Result], partition: int, deadline: float) -> None:
        heapq.heappush(self._heap, (deadline, next(self._seq), partition, future))

    def expire(self, now: float) -> int:
        """Fail the futures whose deadline is at or before `now`; return how many were still open."""
        failed = 0
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, partition, future = heapq.heappop(heap)
            if not future.done():
                failed += 1
                timeout = ProposalTimeoutError(f"partition {partition}: no outcome in time (may still commit)")
                settle(future, error=timeout)
        return failed

    def fail_all(self, reason: str) -> None:
        """Fail every open future (the replicator is closing)."""
        heap, self._heap = self._heap, []
        for _, _, partition, future in heap:
            settle(future, error=ReplicationError(f"partition {partition}: {reason}"))
