"""A replicator node in a child process, driven over a pipe (for Raft benches and tests).

A child process (spawned, so kill -9 is real and no state leaks from the parent) builds its
node with a `NodeFactory`, a top-level function so it pickles, that returns a
`ServedNode`: the replicator's address, request handlers by name, and a close function.
The parent sends ``(op, args)``; the child answers ``("ok", value)`` or ``("err", exception)``.
`stop` asks the child to exit and kills it (SIGKILL) if it does not in time.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

_CTX = mp.get_context("spawn")


@dataclass
class ServedNode:
    """What a child serves: the replicator's Raft address, handlers by op name, and cleanup."""

    address: str
    handlers: dict[str, Callable[..., Any]]
    close: Callable[[], None]


NodeFactory = Callable[[str, str, int, dict[str, Any]], ServedNode]
"""(node_id, data_dir, port, config) -> ServedNode, run in the child."""


def _child(
    conn: Connection, factory: NodeFactory, node_id: str, data_dir: str, port: int, config: dict[str, Any]
) -> None:
    node = factory(node_id, data_dir, port, config)
    conn.send(node.address)
    try:
        while True:
            try:
                op, args = conn.recv()
            except EOFError:
                break
            if op == "exit":
                break
            try:
                conn.send(("ok", node.handlers[op](*args)))
            except Exception as exc:
                conn.send(("err", exc))
    finally:
        node.close()
        with contextlib.suppress(OSError):
            conn.send(("ok", "bye"))


class ReplicatorProcess:
    """One node process; `start` it, then `rpc` (or `request` + `reply` to overlap nodes)."""

    def __init__(self, node_id: str, data_dir: str, factory: NodeFactory, config: dict[str, Any] | None = None) -> None:
        self.node_id = node_id
        self.data_dir = data_dir
        self.config = dict(config or {})
        self.port = 0
        self.address = ""
        self._factory = factory
        self._proc: Any = None
        self._conn: Connection | None = None
        os.makedirs(data_dir, exist_ok=True)

    def start(self, timeout_s: float = 30.0) -> None:
        """Spawn the child and wait for its address; a restart rebinds the same port."""
        parent, child = _CTX.Pipe()
        args = (child, self._factory, self.node_id, self.data_dir, self.port, self.config)
        self._proc = _CTX.Process(target=_child, args=args)
        self._proc.start()
        child.close()
        self._conn = parent
        if not parent.poll(timeout_s):
            self.kill()
            raise RuntimeError(f"node {self.node_id} did not start")
        self.address = parent.recv()
        self.port = int(self.address.rsplit(":", 1)[1])

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def request(self, op: str, *args: Any) -> None:
        """Send a request without waiting; collect the answer with `reply`."""
        assert self._conn is not None, f"node {self.node_id} is not running"
        self._conn.send((op, args))

    def reply(self, timeout_s: float = 60.0) -> Any:
        """Return the answer to the last request; re-raise the child's exception."""
        assert self._conn is not None, f"node {self.node_id} is not running"
        if not self._conn.poll(timeout_s):
            raise TimeoutError(f"node {self.node_id}: no answer within {timeout_s} s")
        status, value = self._conn.recv()
        if status == "err":
            raise value
        return value

    def rpc(self, op: str, *args: Any, timeout_s: float = 60.0) -> Any:
        self.request(op, *args)
        return self.reply(timeout_s)

    def cpu_s(self) -> float:
        """Return the process's user + system CPU seconds (from /proc)."""
        with open(f"/proc/{self._proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kill(self) -> None:
        """kill -9 the process."""
        if self._proc is not None and self._proc.is_alive():
            os.kill(self._proc.pid, signal.SIGKILL)
            self._proc.join(10)
        self._close_conn()

    def stop(self) -> None:
        """Close the replicator cleanly; kill -9 if it does not exit in time."""
        if self._proc is None:
            return
        if self._proc.is_alive() and self._conn is not None:
            with contextlib.suppress(OSError, EOFError):
                self._conn.send(("exit", ()))
                self._conn.poll(15)
            self._proc.join(15)
        self.kill()
        self._proc = None

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
