"""`System`: one thing the harness measures (kvstore, a Redis peer, an in-process floor).

Life cycle, driven by `bench.runner`:
1. `start(dataset)` — blocking: start processes, load every row, check a sample of answers;
   raises `PeerUnavailableError` (the run skips the system, with the message) when a
   prerequisite is missing.
2. `open()` / `close()` — coroutines on the measuring event loop (async clients bind there).
3. `get(ids)` / `put(ids)` — coroutines the load generator calls, many at once.
4. `stop()` — blocking, always called (also after a failed start), idempotent.

Also: `server_pids()` for CPU accounting, `info()` for the report, `counters()` for client
retries and hedges when the client can tell.
"""

from __future__ import annotations

import abc
import os
import socket
import time
from typing import Any

import numpy as np

from bench.workload import F32, U64, Dataset


class PeerUnavailableError(RuntimeError):
    """A system cannot run here (e.g. `redis-server` is not installed); the message says how to fix it."""


class System(abc.ABC):
    """Base of every measured system; see the module docstring for the life cycle."""

    name: str = ""

    def __init__(self) -> None:
        self.dataset: Dataset | None = None

    @property
    def data(self) -> Dataset:
        if self.dataset is None:
            raise RuntimeError(f"{self.name}: start() was not called")
        return self.dataset

    @abc.abstractmethod
    def start(self, dataset: Dataset) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...

    async def open(self) -> None:  # noqa: B027 (optional hook)
        """Connect the clients that live on the measuring event loop."""

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Close what `open` connected."""

    async def quiesce(self, timeout_s: float = 10.0) -> None:  # noqa: B027 (optional hook)
        """Wait (bounded) until work left over from cancelled requests has finished.

        A cancelled asyncio task does not stop a call already running in a thread; this
        keeps an overloaded system's backlog out of the next system's slice.
        """

    @abc.abstractmethod
    async def get(self, ids: U64) -> tuple[F32, int]:
        """Return (float32 rows of `ids` in order, number of keys not answered)."""

    @abc.abstractmethod
    async def put(self, ids: U64) -> None:
        """Write the dataset's own rows of `ids` (so every later read still checks out)."""

    def server_pids(self) -> list[int]:
        """Return the pids of this system's server processes (empty for in-process floors)."""
        return []

    def info(self) -> dict[str, Any]:
        """Return what the report says about this system (client, server version, config)."""
        return {}

    def counters(self) -> dict[str, int | None]:
        """Return client retries and hedges so far (None where the client cannot tell)."""
        return {"retries": None, "hedges": None}

    def check_sample(self, get_sync: Any, count: int = 200) -> None:
        """Check `count` random keys through a blocking `get_sync(ids) -> rows`; raise if any differ."""
        ids = np.random.default_rng(99).integers(0, self.data.keys, size=min(count, self.data.keys), dtype=np.uint64)
        if not self.data.matches(ids, get_sync(ids)):
            raise RuntimeError(f"{self.name}: a sample read after loading returned wrong rows")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that the OS just handed out (free at this moment)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def machine_busy_s() -> float:
    """Return the CPU seconds all processes on the machine have used since boot (from /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """Return utime+stime of process `pid` in seconds (all threads), 0.0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    # After the ")" that ends comm, state is field 3; utime (14) and stime (15) are at 11, 12.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(predicate: Any, *, timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    """Poll `predicate` until it returns a truthy value; raise `TimeoutError` naming `what`."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as exc:  # not up yet: keep polling until the deadline
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not ready within {timeout_s:.0f} s (last: {last!r})")
