"""Wait for many proposal futures with one wake-up, not a thread or a callback each."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

__all__ = ["when_all"]


def when_all(futures: Sequence[Future[Any]]) -> Future[None]:
    """Return a future that completes (with None) once every one of `futures` is done.

    It never fails: read each future's own result or exception afterwards. Thread-safe;
    completes on the thread that finishes the last of `futures` (the engine's, for
    proposals), so `asyncio.wrap_future(when_all(fs))` costs one event-loop wake-up.
    """
    combined: Future[None] = Future()
    remaining = [len(futures)]
    lock = threading.Lock()

    def one_done(_: Future[Any]) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last and combined.set_running_or_notify_cancel():  # False: the waiter gave up (cancelled)
            combined.set_result(None)

    if not futures and combined.set_running_or_notify_cancel():
        combined.set_result(None)
    for future in futures:
        future.add_done_callback(one_done)
    return combined
