"""Replicator nodes in child processes (so kill -9 is real), driven over a pipe.

`NodeProc` starts one node process; `RaftCluster` starts several, opens groups on all of
them and always stops every process (kill -9 as the last resort) in `close`.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from kvstore.replication.node_process import ReplicatorProcess, ServedNode
from tests.conftest import wait_until

TEST_CONFIG: dict[str, Any] = {"balance_leaders": False}


def _test_node(node_id: str, data_dir: str, port: int, config: dict[str, Any]) -> ServedNode:
    """Child process: a replicator over a `RecordingStateMachine`, with the requests tests make."""
    from kvstore.replication import NodeId
    from kvstore.replication.pysyncobj_engine import PySyncObjConfig, PySyncObjReplicator
    from tests.replication.sm import RecordingStateMachine

    logging.basicConfig(
        filename=os.path.join(data_dir, "node.log"),
        level=logging.INFO,
        format="%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s",
    )
    config = dict(config)
    sm = RecordingStateMachine(
        os.path.join(data_dir, "sm"),
        snapshot_delay_s=config.pop("snapshot_delay_s", 0.0),
        restore_delay_s=config.pop("restore_delay_s", 0.0),
    )
    rep = PySyncObjReplicator(NodeId(node_id), PySyncObjConfig(data_dir=data_dir, port=port, **config), sm)
    rep.start()
    handlers: dict[str, Callable[..., Any]] = {
        "add_group": lambda p, members: bool(rep.add_group(p, members)),
        "remove_group": lambda p: rep.remove_group(p),
        "propose": lambda p, cmd, timeout_s: rep.group(p).propose(cmd, timeout_s),
        "status": lambda p: rep.group(p).status(),
        "is_leader": lambda p: rep.group(p).is_leader(),
        "leaders": lambda: [p for p in rep.partitions() if rep.group(p).is_leader()],
        "entries": lambda p: sm.entries(p),
        "applied": lambda p: sm.applied_index(p),
        "add_member": lambda p, node, address: rep.group(p).add_member(node, address),
        "remove_member": lambda p, node: rep.group(p).remove_member(node),
        "transfer": lambda p, node: rep.group(p).transfer_leadership(node),
        "wait_caught_up": lambda p, node: rep.group(p).wait_caught_up(node, timeout_s=30),
        "block": lambda nodes: rep.set_blocked_peers(set(nodes)),
        "compact": lambda p: rep.group(p)._raft.forceLogCompaction(),
        "snapshot_exists": lambda p: os.path.exists(os.path.join(data_dir, "snapshots", f"p{p}.snap")),
        "fail_on": lambda cmd: setattr(sm, "fail_on", cmd),
        "serializing": lambda p: rep.group(p)._raft._SyncObj__serializer._job is not None,
        "log_entries": lambda p: rep.group(p).status().log_entries,
        "restoring": lambda p: rep.group(p)._raft._kv_restoring,
        "propose_many": lambda items, timeout_s: _propose_many(rep, items, timeout_s),
        "io_counts": lambda: {"log_writes": rep.log_writes(), "messages": rep._mux.messages_sent},
    }

    def close() -> None:
        rep.close()
        sm.close()

    return ServedNode(rep.address, handlers, close)


def _propose_many(rep: Any, items: list[tuple[int, bytes]], timeout_s: float) -> list[Any]:
    """Propose every (partition, command) at once with `propose_async`; return results or exceptions."""
    from kvstore.replication import when_all

    futures = [rep.group(p).propose_async(command, timeout_s) for p, command in items]
    when_all(futures).result(timeout_s + 10)
    return [f.exception() or f.result() for f in futures]


class NodeError(Exception):
    """The node process answered a request with an error."""


class NodeProc(ReplicatorProcess):
    """One replicator node process as tests use it (test settings, node log on disk)."""

    def __init__(self, node_id: str, data_dir: str, config: dict[str, Any] | None = None) -> None:
        super().__init__(node_id, data_dir, _test_node, {**TEST_CONFIG, **(config or {})})

    def log_tail(self, lines: int = 60) -> str:
        try:
            with open(os.path.join(self.data_dir, "node.log"), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"


class RaftCluster:
    """N node processes sharing the same groups."""

    def __init__(self, root: str, nodes: int, config: dict[str, Any] | None = None) -> None:
        self.root = root
        self.nodes = {f"n{i}": NodeProc(f"n{i}", os.path.join(root, f"n{i}"), config) for i in range(nodes)}
        self.members: dict[int, dict[str, str]] = {}

    def start(self) -> None:
        for node in self.nodes.values():
            node.start()

    def add_node(self, node_id: str, config: dict[str, Any] | None = None) -> NodeProc:
        node = NodeProc(node_id, os.path.join(self.root, node_id), config)
        self.nodes[node_id] = node
        node.start()
        return node

    def open_groups(self, partitions: Iterable[int], node_ids: Iterable[str] | None = None) -> None:
        chosen = list(node_ids or self.nodes)
        for p in partitions:
            self.members[p] = {n: self.nodes[n].address for n in chosen}
            for n in chosen:
                self.nodes[n].rpc("add_group", p, self.members[p])

    def reopen(self, node_id: str) -> None:
        """Restart a stopped or killed node on its old port and reopen its groups."""
        node = self.nodes[node_id]
        node.start()
        for p, members in self.members.items():
            if node_id in members:
                node.rpc("add_group", p, members)

    def live(self) -> list[NodeProc]:
        return [n for n in self.nodes.values() if n.alive]

    def leader(self, partition: int, timeout_s: float = 20.0) -> NodeProc:
        def find() -> NodeProc | None:
            for node in self.live():
                if node_in_group(node, self.members[partition]) and node.rpc("is_leader", partition):
                    return node
            return None

        found = wait_until(find, timeout_s=timeout_s, interval_s=0.1, what=f"a leader of partition {partition}")
        assert found is not None
        return found

    def wait_applied_everywhere(self, partition: int, index: int, timeout_s: float = 30.0) -> None:
        for node in self.live():
            if node_in_group(node, self.members[partition]):
                wait_until(
                    functools.partial(_applied_at_least, node, partition, index),
                    timeout_s=timeout_s,
                    what=f"{node.node_id} applied {index} on partition {partition}",
                )

    def close(self) -> None:
        for node in self.nodes.values():
            node.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {n.node_id} ---\n{n.log_tail()}" for n in self.nodes.values())


def _applied_at_least(node: NodeProc, partition: int, index: int) -> bool:
    return bool(node.rpc("applied", partition) >= index)


def node_in_group(node: NodeProc, members: dict[str, str]) -> bool:
    return node.node_id in members


def propose_stream(
    cluster: RaftCluster, partition: int, count: int, prefix: bytes, *, on_each: Callable[[int], None] | None = None
) -> list[bytes]:
    """Propose `count` commands to the current leader, following leader changes; return the acknowledged ones."""
    acked: list[bytes] = []
    deadline = time.monotonic() + 60
    i = 0
    while i < count and time.monotonic() < deadline:
        if on_each is not None:
            on_each(i)
        command = prefix + b"-%06d" % i
        try:
            leader = cluster.leader(partition)
            leader.rpc("propose", partition, command, 5.0, timeout_s=15)
        except (EOFError, OSError, NodeError, TimeoutError, AssertionError) as exc:
            logging.getLogger(__name__).info("proposal %d not acknowledged: %r", i, exc)
            i += 1
            continue
        except Exception as exc:  # NotLeaderError and friends: not acknowledged
            logging.getLogger(__name__).info("proposal %d refused: %r", i, exc)
            i += 1
            continue
        acked.append(command)
        i += 1
    return acked
