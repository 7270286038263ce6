"""Replicator node processes for the Raft benches: an in-memory state machine, driven over a pipe."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any, BinaryIO

import msgpack

_CTX = mp.get_context("spawn")


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


def _load(rep: Any, partitions: list[int], seconds: float, command: bytes) -> tuple[list[float], int]:
    """Propose `command` back to back on each partition (one thread each).

    Returns the latencies in ms and the largest follower lag (entries) seen meanwhile.
    """
    from kvstore.replication import ReplicationError

    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def run(p: int) -> None:
        group, mine = rep.group(p), []
        while time.monotonic() < stop_at:
            start = time.perf_counter()
            try:
                group.propose(command, 10.0)
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


def _serve(conn: Connection, node_id: str, data_dir: str, config: dict[str, Any]) -> None:
    from kvstore.replication import NodeId
    from kvstore.replication.pysyncobj_engine import PySyncObjConfig, PySyncObjReplicator

    rep = PySyncObjReplicator(NodeId(node_id), PySyncObjConfig(data_dir=data_dir, **config), MemStateMachine())
    rep.start()
    conn.send(rep.address)
    handlers: dict[str, Callable[..., Any]] = {
        "open": lambda members, parts: [rep.add_group(p, members) and None for p in parts],
        "leaders": lambda: [p for p in rep.partitions() if rep.group(p).is_leader()],
        "load": lambda parts, seconds, command: _load(rep, parts, seconds, command),
    }
    try:
        while True:
            try:
                op, args = conn.recv()
            except EOFError:
                break
            if op == "exit":
                break
            conn.send(handlers[op](*args))
    finally:
        rep.close()


class Node:
    def __init__(self, node_id: str, data_dir: str, config: dict[str, Any]) -> None:
        self.node_id = node_id
        parent, child = _CTX.Pipe()
        self.proc = _CTX.Process(target=_serve, args=(child, node_id, data_dir, config))
        self.proc.start()
        child.close()
        self.conn = parent
        self.address: str = parent.recv()

    def rpc(self, op: str, *args: Any) -> Any:
        self.conn.send((op, args))
        return self.conn.recv()

    def cpu_s(self) -> float:
        """Return the process's user + system CPU seconds (from /proc)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            self.conn.send(("exit", ()))
        self.proc.join(15)
        if self.proc.is_alive() and self.proc.pid is not None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.join(5)


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
