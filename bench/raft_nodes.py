"""Replicator node processes for the Raft benches: an in-memory state machine, driven over a pipe.

The process launcher is `kvstore.replication.node_process` (the tests' harness uses it too).
"""

from __future__ import annotations

import collections
import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, BinaryIO

import msgpack

from kvstore.replication.node_process import ReplicatorProcess, ServedNode


class MemStateMachine:
    """Counts applied commands per partition; snapshots are the counters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._applied: dict[int, int] = {}
        self._bytes: dict[int, int] = {}

    def apply(self, partition: int, command: bytes, index: int) -> bytes | None:
        with self._lock:
            if index <= self._applied.get(partition, 0):
                return None
            self._applied[partition] = index
            self._bytes[partition] = self._bytes.get(partition, 0) + len(command)
            return b"ok"

    def applied_index(self, partition: int) -> int:
        with self._lock:
            return self._applied.get(partition, 0)

    def snapshot(self, partition: int, out: BinaryIO) -> int:
        with self._lock:
            applied, size = self._applied.get(partition, 0), self._bytes.get(partition, 0)
        out.write(msgpack.packb([applied, size]))
        return applied

    def restore(self, partition: int, inp: BinaryIO) -> None:
        applied, size = msgpack.unpackb(inp.read())
        with self._lock:
            self._applied[partition], self._bytes[partition] = applied, size


def _load(
    rep: Any, partitions: list[int], seconds: float, command: bytes, in_flight: int = 1
) -> tuple[list[float], int]:
    """Propose `command` back to back on each partition (one thread each, `in_flight` at a time).

    Returns the latencies in ms and the largest follower lag (entries) seen meanwhile.
    """
    from kvstore.replication import ReplicationError

    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def run(p: int) -> None:
        group, mine = rep.group(p), []
        window: collections.deque[tuple[float, Future[bytes | None]]] = collections.deque()
        while time.monotonic() < stop_at or window:
            if len(window) < in_flight and time.monotonic() < stop_at:
                window.append((time.perf_counter(), group.propose_async(command, 10.0)))
                continue
            start, future = window.popleft()
            try:
                future.result()
            except ReplicationError:  # leadership moved: not counted
                time.sleep(0.01)
                continue
            mine.append((time.perf_counter() - start) * 1000)
        with lock:
            latencies.extend(mine)

    max_lag = [0]

    def sample_lag() -> None:  # how far the slowest follower trails, while the load runs
        while time.monotonic() < stop_at:
            for p in partitions:
                lags = [f.lag for f in rep.group(p).status().followers]
                max_lag[0] = max([max_lag[0], *lags])
            time.sleep(0.2)

    threads = [threading.Thread(target=run, args=(p,)) for p in partitions]
    threads.append(threading.Thread(target=sample_lag))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, max_lag[0]


def _bench_node(node_id: str, data_dir: str, port: int, config: dict[str, Any]) -> ServedNode:
    """Child process: a replicator over a `MemStateMachine`, with the requests the benches make."""
    from kvstore.replication import NodeId
    from kvstore.replication.pysyncobj_engine import PySyncObjConfig, PySyncObjReplicator

    rep = PySyncObjReplicator(
        NodeId(node_id), PySyncObjConfig(data_dir=data_dir, port=port, **config), MemStateMachine()
    )
    rep.start()
    handlers: dict[str, Callable[..., Any]] = {
        "open": lambda members, parts: [rep.add_group(p, members) and None for p in parts],
        "leaders": lambda: [p for p in rep.partitions() if rep.group(p).is_leader()],
        "load": lambda parts, seconds, command, in_flight: _load(rep, parts, seconds, command, in_flight),
    }
    return ServedNode(rep.address, handlers, rep.close)


class Node(ReplicatorProcess):
    """A started bench node process."""

    def __init__(self, node_id: str, data_dir: str, config: dict[str, Any]) -> None:
        super().__init__(node_id, data_dir, _bench_node, config)
        self.start()


@contextlib.contextmanager
def cluster(nodes: int, partitions: int, config: dict[str, Any] | None = None) -> Iterator[list[Node]]:
    """Start `nodes` processes with `partitions` groups on every node; stop them all afterwards."""
    with tempfile.TemporaryDirectory(prefix="raft-bench-") as root:
        started: list[Node] = []
        try:
            for i in range(nodes):
                data_dir = os.path.join(root, f"n{i}")
                os.makedirs(data_dir)
                started.append(Node(f"n{i}", data_dir, config or {}))
            members = {n.node_id: n.address for n in started}
            for node in started:
                node.rpc("open", members, list(range(partitions)))
            yield started
        finally:
            for node in started:
                node.stop()


def wait_for_leaders(nodes: list[Node], partitions: int, timeout_s: float = 60.0) -> dict[str, list[int]]:
    """Wait until every partition has exactly one leader; return node -> partitions it leads."""
    deadline = time.monotonic() + timeout_s
    while True:
        leaders = {n.node_id: n.rpc("leaders") for n in nodes}
        if sum(len(v) for v in leaders.values()) == partitions or time.monotonic() > deadline:
            return leaders
        time.sleep(0.2)
