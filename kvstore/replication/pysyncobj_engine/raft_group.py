"""One partition's replica: a `SyncObj` ticked by the driver, applying through the state machine."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.node import TCPNode

from kvstore.replication.pysyncobj_engine.snapshots import read_dump_header
from kvstore.replication.pysyncobj_engine.transport import DriverNotifier, GroupPoller, GroupTransport
from kvstore.replication.raft_log import Entry, GroupLog

if TYPE_CHECKING:
    from kvstore.replication.pysyncobj_engine.replicator import PySyncObjReplicator

log = logging.getLogger(__name__)


class RaftGroup(SyncObj):
    """One partition's replica: a SyncObj ticked by the driver, applying through the state machine."""

    def __init__(self, replicator: PySyncObjReplicator, partition: int, others: list[str], conf: SyncObjConf) -> None:
        self._kv_replicator = replicator
        self._kv_partition = partition
        self._kv_group_poller = GroupPoller(replicator, partition)
        self._kv_transport: GroupTransport | None = None
        self._kv_log: GroupLog
        self._kv_restoring = False
        super().__init__(replicator.address, others, conf, transportClass=self._kv_make_transport)

    @property
    def _poller(self) -> GroupPoller:
        return self._kv_group_poller

    @_poller.setter
    def _poller(self, value: Any) -> None:
        pass  # pysyncobj assigns a poller of its own; every group uses the driver's

    def _kv_make_transport(self, syncobj: Any, self_node: Any, others: Any) -> GroupTransport:
        self._kv_transport = GroupTransport(self._kv_replicator, self._kv_partition, syncobj, self_node, others)
        return self._kv_transport

    @replicated
    def _kv_apply(self, command: bytes) -> bytes | None:
        # pysyncobj applies entry raftLastApplied + 1 and increments afterwards.
        index = self.raftLastApplied + 1
        try:
            return self._kv_replicator._sm.apply(self._kv_partition, command, index)
        except Exception:  # the contract says never raise; a raise would re-apply forever
            log.exception("state machine apply raised partition=%d index=%d", self._kv_partition, index)
            return None

    def tick(self) -> None:
        if not self._kv_restoring:
            self.doTick(0.0)

    def _checkCommandsToApply(self) -> None:  # noqa: N802 (pysyncobj's name)
        # With appendEntriesUseBatch=False pysyncobj sends append_entries to every follower
        # after each command it appends: k queued proposals became k messages per follower,
        # k acks back and k follower log writes. Append them all, then send once.
        raft_log = self._SyncObj__raftLog
        last_before = raft_log[-1][1]
        self._SyncObj__sendAppendEntries = _no_send  # shadows the method for this call only
        try:
            super()._checkCommandsToApply()
        finally:
            del self._SyncObj__sendAppendEntries
        if raft_log[-1][1] != last_before and self._isLeader():
            self._SyncObj__sendAppendEntries()

    def _kv_replace_notifier(self) -> None:
        """Close pysyncobj's notifier pipe (one per group) and mark the group on the driver instead."""
        notifier = getattr(self, "_SyncObj__pipeNotifier", None)
        for fd in list(self._kv_group_poller.fds):
            self._kv_group_poller.unsubscribe(fd)
        if notifier is not None:
            for name in ("_PipeNotifier__pipeR", "_PipeNotifier__pipeW"):
                pipe_fd = getattr(notifier, name, None)
                if pipe_fd is not None:
                    os.close(pipe_fd)
        self._SyncObj__pipeNotifier = DriverNotifier(self._kv_replicator._driver, self._kv_partition)

    def _kv_restore_file(self, path: str) -> None:
        sm, partition = self._kv_replicator._sm, self._kv_partition
        with open(path, "rb") as inp:
            index = read_dump_header(inp)["sm_index"]
            if sm.applied_index(partition) < index:  # else local data already holds the snapshot
                sm.restore(partition, inp)
                log.info("snapshot restored partition=%d index=%d (off the driver thread)", partition, index)

    def _kv_load_dump(self, path: str) -> tuple[Entry, Entry, list[TCPNode]]:
        sm = self._kv_replicator._sm
        with open(path, "rb") as inp:
            header = read_dump_header(inp)
            last, prev = tuple(header["last"]), tuple(header["prev"])
            local, index = sm.applied_index(self._kv_partition), header["sm_index"]
            if local < index:  # else local data already holds the snapshot: keep it, replay the log
                sm.restore(self._kv_partition, inp)
                log.info("snapshot restored partition=%d index=%d (local was %d)", self._kv_partition, index, local)
        return last, prev, [TCPNode(address) for address in header["cluster"]]

    def _kv_unsubscribe_all(self) -> None:
        for fd in list(self._kv_group_poller.fds):
            self._kv_group_poller.unsubscribe(fd)


def _no_send() -> None:
    pass
