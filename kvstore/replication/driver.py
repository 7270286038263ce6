"""One thread that runs every local Raft group: poll sockets, tick groups, flush.

Groups are ticked when something happened to them (a message arrived, a proposal was
queued, a snapshot finished) and all of them every `tick_s`, so idle groups cost a few
microseconds per period and a proposal is handled as soon as it is queued. Other threads
hand work to the driver with `call` or `call_soon`, which wake it through a pipe: at most
one byte per round however many threads hand over work (`_wake_pending`), and everything
handed over before a round starts is handled in that round (a burst of proposals becomes
one tick of each group, one log write and one send per peer).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

from kvstore.replication.mux import READ, Poller

log = logging.getLogger(__name__)

T = TypeVar("T")


class Tickable(Protocol):
    def tick(self) -> None: ...


class Driver:
    """The event loop thread shared by all groups of a node."""

    def __init__(
        self, poller: Poller, *, tick_s: float, on_idle_tick: Callable[[float], None], on_flush: Callable[[], None]
    ) -> None:
        self.poller = poller
        self._tick_s = tick_s
        self._on_idle_tick = on_idle_tick
        self._on_flush = on_flush
        self.groups: dict[int, Tickable] = {}
        self._dirty: set[int] = set()
        self._calls: collections.deque[tuple[Callable[[], Any], Future[Any] | None]] = collections.deque()
        self._wake_pending = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        poller.subscribe(self._wake_r, self._drain_wake, READ)
        self._stop = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="raft-driver", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def mark(self, partition: int) -> None:
        """Tick `partition` in the next round (driver thread, or any thread followed by `wake`)."""
        self._dirty.add(partition)

    def call_soon(self, fn: Callable[[], Any]) -> None:
        """Run `fn` on the driver thread soon, without waiting; callable from any thread.

        An exception `fn` raises is logged, not propagated.
        """
        self._calls.append((fn, None))
        self.wake()

    def mark_threadsafe(self, partition: int) -> None:
        """Tick `partition` soon; callable from any thread."""
        if threading.current_thread() is self._thread:
            self._dirty.add(partition)
            return
        self._calls.append((lambda: self._dirty.add(partition), None))
        self.wake()

    def wake(self) -> None:
        """Make the driver start a round soon; one pipe write until that round starts."""
        if self._closed or self._wake_pending:
            return
        self._wake_pending = True
        with contextlib.suppress(BlockingIOError):  # a full pipe: the driver is awake anyway
            os.write(self._wake_w, b"w")

    def call(self, fn: Callable[[], T], timeout_s: float | None = 30.0) -> T:
        """Run `fn` on the driver thread and return its result (re-raises its exception)."""
        if threading.current_thread() is self._thread:
            return fn()
        if self._stop or not self._thread.is_alive():
            raise RuntimeError("raft driver is not running")
        future: Future[T] = Future()
        self._calls.append((fn, future))
        self.wake()
        if self._stop and not self._thread.is_alive():  # stopped after the check: nobody will run it
            self._fail_calls()
        return future.result(timeout_s)

    def stop(self) -> None:
        self._stop = True
        self.wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(10)
        if not self._thread.is_alive():
            self._fail_calls()  # handed over after the last round: their callers must not wait
        self._closed = True
        self.poller.unsubscribe(self._wake_r)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _fail_calls(self) -> None:
        """Fail every call still queued (the driver thread has ended); drop queued `call_soon`s."""
        while self._calls:
            try:
                _, future = self._calls.popleft()
            except IndexError:  # another thread emptied it meanwhile
                return
            if future is not None and future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("raft driver stopped before running this call"))

    def _drain_wake(self, fd: int, mask: int) -> None:
        try:
            while os.read(fd, 4096):
                pass
        except BlockingIOError:
            pass

    def _run(self) -> None:
        next_tick = time.monotonic()
        while not self._stop:
            try:
                next_tick = self._round(next_tick)
            except Exception:  # one bad event must not stop every group of the node
                log.exception("raft driver round failed")
                time.sleep(0.01)
        self._run_calls()

    def _round(self, next_tick: float) -> float:
        busy = self._dirty or self._calls
        self.poller.poll(0.0 if busy else max(0.0, next_tick - time.monotonic()))
        # Cleared before the calls are taken: work queued after this point wakes the next round.
        self._wake_pending = False
        self._run_calls()
        now = time.monotonic()
        if now >= next_tick:
            next_tick = now + self._tick_s
            self._on_idle_tick(now)
            due = list(self.groups)
        else:
            due = list(self._dirty)
        self._dirty.clear()
        for partition in due:
            group = self.groups.get(partition)
            if group is not None:
                try:
                    group.tick()
                except Exception:
                    log.exception("raft tick failed partition=%d", partition)
        self._on_flush()
        return next_tick

    def _run_calls(self) -> None:
        while self._calls:
            fn, future = self._calls.popleft()
            if future is None:
                try:
                    fn()
                except Exception:
                    log.exception("raft driver call failed")
                continue
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)
