"""`Replicator` on PySyncObj 0.3.17: the only module that imports pysyncobj.

Each local partition replica is a `SyncObj` with one replicated method taking our command
bytes. What we replace or configure, and why (measured facts in shared/notes/pysyncobj.md):

- `autoTick=False`, one `Driver` thread for all groups, and every group's poller is the
  driver's (`_RaftGroup._poller`): no thread per group. With `appendEntriesUseBatch=False`
  a queued proposal marks its group for the driver's next round (`_DriverNotifier`), so a
  commit takes milliseconds instead of an append period.
- Proposals go through the driver (`propose_async`): every proposal queued since the last
  round is appended in that round and shipped to each follower in one message
  (`_RaftGroup._checkCommandsToApply`), not one message per proposal.
- `_GroupTransport` sends through the node's `Mux`: one port and one TCP connection per
  peer for all groups, msgpack on the wire, peers outside the group refused.
- `_Journal` keeps the log in RocksDB (`raft_log.py`): compaction is one atomic range
  delete, and before a group opens we trim the log to the snapshot on disk, closing both
  crash windows of pysyncobj's file journal.
- `_AsyncSerializer` writes snapshots on a background thread (the driver never waits for
  one), as one file: our header then the state machine's payload.

pysyncobj internals we touch (tests: tests/replication/test_internals.py; 6 in test_cluster.py;
4 has none yet):
1. `pysyncobj.pickle.__protocol = 4`: log entries hold our bytes without protocol 2's
   latin-1 blow-up (a 26.6 KB batch became 44.5 KB).
2. `pysyncobj.syncobj.createJournal` is wrapped so a `Journal` instance passed as
   `journalFile` is used as is (there is no public journal seam).
3. `SyncObj._SyncObj__serializer` is replaced after construction by `_AsyncSerializer`.
4. The group's PipeNotifier (`_SyncObj__pipeNotifier`, a pipe per group) is closed after
   construction and replaced by `_DriverNotifier`.
5. `_SyncObj__raftNextIndex` is kept from moving back on a stale successful ack (see
   `_GroupTransport._deliver_ack`): pysyncobj otherwise resends entries and followers truncate
   and rewrite acknowledged (even applied) entries.
6. A received snapshot is restored on the snapshot thread before pysyncobj sees its last
   chunk (`_GroupTransport._start_restore`, reads `_Serializer__incomingTransmissionFile`);
   the group's ticks and messages wait meanwhile, other groups carry on.
7. `_SyncObj__sendAppendEntries` is shadowed by a no-op while `_checkCommandsToApply` takes
   the queued commands, then called once (`_RaftGroup._checkCommandsToApply`).
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import struct
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from typing import Any, BinaryIO

import msgpack
import pysyncobj.pickle as _pysyncobj_pickle
import pysyncobj.syncobj as _pysyncobj_syncobj
from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.config import FAIL_REASON, SERIALIZER_STATE
from pysyncobj.journal import Journal
from pysyncobj.node import TCPNode
from pysyncobj.serializer import Serializer
from pysyncobj.transport import Transport

from kvstore.replication import (
    FollowerProgress,
    GroupStatus,
    MembershipChangeError,
    NodeId,
    NotLeaderError,
    ProposalTimeoutError,
    ReplicationError,
    StateMachine,
)
from kvstore.replication.driver import Driver
from kvstore.replication.mux import Mux, Poller
from kvstore.replication.proposals import Deadlines, Result, settle
from kvstore.replication.raft_log import Entry, GroupLog, LogStore

log = logging.getLogger(__name__)

__all__ = ["PySyncObjConfig", "PySyncObjGroup", "PySyncObjReplicator"]

# ---- internals patched (see the module docstring) ----
setattr(_pysyncobj_pickle, "__protocol", 4)  # a dunder module global: setattr is the only spelling
_library_create_journal = _pysyncobj_syncobj.createJournal


def _create_journal(journal_file: Any) -> Any:
    return journal_file if isinstance(journal_file, Journal) else _library_create_journal(journal_file)


_pysyncobj_syncobj.createJournal = _create_journal

KEEP_NEXT_INDEX_ON_STALE_ACK = True  # the fix in `_GroupTransport._deliver_ack`; tests turn it off
ASYNC_RESTORE = True  # `_GroupTransport._start_restore`; False restores on the driver thread

_DUMP_MAGIC = b"KVRSNAP1"
_DUMP_HEADER = struct.Struct(">8sQI")  # magic, state machine index (patched in last), header size
_LOOPBACK_PREFIXES = ("127.", "localhost")
# Reasons that mean the command was not (and will not be) committed: safe to retry elsewhere.
_NOT_LEADER_REASONS = (FAIL_REASON.NOT_LEADER, FAIL_REASON.MISSING_LEADER, FAIL_REASON.DISCARDED)
# Reasons that leave the outcome open (a command forwarded to a leader that then changed).
_UNKNOWN_REASONS = (FAIL_REASON.LEADER_CHANGED, FAIL_REASON.UNKNOWN_OUTCOME)


class ConfigError(ValueError):
    """A replication setting is invalid."""


@dataclass(frozen=True)
class PySyncObjConfig:
    """Settings of a node's replication engine. Times in seconds."""

    data_dir: str
    bind_host: str = "127.0.0.1"
    port: int = 0
    secret: bytes | None = None
    synced: bool = False
    election_timeout_s: tuple[float, float] = (1.0, 2.0)
    heartbeat_s: float = 0.25
    tick_s: float = 0.1
    leader_fallback_s: float = 2.0
    reconnect_s: float = 0.5
    log_compaction_min_entries: int = 1000
    log_compaction_min_time_s: float = 300.0
    log_compaction_max_bytes: int = 16 * 1024 * 1024
    append_batch_bytes: int = 512 * 1024
    max_command_bytes: int = 448 * 1024
    snapshot_chunk_bytes: int = 256 * 1024
    compress_min_bytes: int | None = None
    balance_leaders: bool = True
    balance_interval_s: float = 3.0

    def validate(self) -> None:
        """Raise ConfigError naming the setting that is out of range."""
        low, high = self.election_timeout_s
        if not 0 < low < high:
            raise ConfigError(f"election_timeout_s {self.election_timeout_s}: need 0 < min < max")
        if not 0 < self.heartbeat_s * 3 < low:
            raise ConfigError(f"heartbeat_s {self.heartbeat_s}: must be below election min / 3 ({low / 3:.3f})")
        if not self.heartbeat_s < self.leader_fallback_s:
            raise ConfigError(f"leader_fallback_s {self.leader_fallback_s} must exceed heartbeat_s {self.heartbeat_s}")
        if not 0 < self.tick_s <= self.heartbeat_s:
            raise ConfigError(f"tick_s {self.tick_s} must be in (0, heartbeat_s]")
        if not 0 < self.max_command_bytes < self.append_batch_bytes - 1024:
            # pysyncobj's path for one entry >= the batch size chunks it with an off-by-one
            # ('finish' is decided against the command length, not the pickled length).
            raise ConfigError(f"max_command_bytes {self.max_command_bytes} must be < append_batch_bytes - 1 KiB")
        if self.log_compaction_min_entries < 2:
            raise ConfigError("log_compaction_min_entries must be >= 2")
        if self.secret is None and not self.bind_host.startswith(_LOOPBACK_PREFIXES):
            raise ConfigError(f"bind_host {self.bind_host}: a cluster secret is required off loopback")


# ---- pysyncobj seams ----


class _Journal(Journal):
    """pysyncobj's journal interface over a `GroupLog` (RocksDB-backed)."""

    def __init__(self, group_log: GroupLog) -> None:
        self._log = group_log

    def add(self, command: bytes, idx: int, term: int) -> None:
        self._log.add(bytes(command), int(idx), int(term))

    def clear(self) -> None:
        self._log.clear()

    def deleteEntriesFrom(self, entryFrom: int) -> None:  # noqa: N802, N803
        self._log.delete_from(entryFrom)

    def deleteEntriesTo(self, entryTo: int) -> None:  # noqa: N802, N803
        self._log.delete_to(entryTo)

    def __getitem__(self, item: Any) -> Any:
        return self._log.entries[item]

    def __len__(self) -> int:
        return len(self._log.entries)

    def _destroy(self) -> None:
        pass

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:  # noqa: N802, N803
        self._log.set_commit_index(raftCommitIndex)

    def getRaftCommitIndex(self) -> int:  # noqa: N802
        return self._log.commit_index

    def setCurrentTerm(self, term: int, votedForNodeId: str | None) -> None:  # noqa: N802, N803
        self._log.set_term(term, votedForNodeId)

    def getCurrentTerm(self) -> int:  # noqa: N802
        return self._log.term

    def getVotedForNodeId(self) -> str | None:  # noqa: N802
        return self._log.voted_for


class _GroupPoller:
    """What a group sees as its poller: subscriptions go to the driver's, `poll` is a no-op."""

    def __init__(self, replicator: PySyncObjReplicator, partition: int) -> None:
        self._replicator = replicator
        self._partition = partition
        self.fds: set[int] = set()

    def subscribe(self, fd: int, callback: Any, mask: int) -> None:
        def on_event(fd: int, ev: int) -> None:
            callback(fd, ev)
            self._replicator._driver.mark(self._partition)

        self.fds.add(fd)
        self._replicator._poller.subscribe(fd, on_event, mask)

    def unsubscribe(self, fd: int) -> None:
        self.fds.discard(fd)
        self._replicator._poller.unsubscribe(fd)

    def poll(self, timeout: float) -> None:
        pass


class _DriverNotifier:
    """Stands in for pysyncobj's PipeNotifier: a queued command marks its group for the driver."""

    def __init__(self, driver: Driver, partition: int) -> None:
        self._driver = driver
        self._partition = partition

    def notify(self) -> None:
        self._driver.mark_threadsafe(self._partition)


class _GroupTransport(Transport):
    """pysyncobj transport of one group over the node's shared `Mux`."""

    def __init__(
        self, replicator: PySyncObjReplicator, partition: int, syncobj: Any, self_node: Any, others: Any
    ) -> None:
        super().__init__(syncobj, self_node, others)
        self._syncObj = syncobj
        self._held: list[tuple[TCPNode, dict[str, Any]]] | None = None  # while a snapshot restores
        self._replicator = replicator
        self._partition = partition
        self.nodes: dict[str, TCPNode] = {node.address: node for node in others}

    @property
    def ready(self) -> bool:
        return True

    def addNode(self, node: TCPNode) -> None:  # noqa: N802
        self.nodes[node.address] = node
        self._replicator._peers_changed()
        if self._replicator._mux.is_up(node.address):
            self._onNodeConnected(node)

    def dropNode(self, node: TCPNode) -> None:  # noqa: N802
        if self.nodes.pop(node.address, None) is not None:
            self._onNodeDisconnected(node)
        self._replicator._peers_changed()

    def send(self, node: TCPNode, message: Any) -> bool:
        if node.address not in self.nodes:
            return False
        return self._replicator._mux.send(node.address, self._partition, message)

    def deliver(self, peer: str, message: dict[str, Any]) -> None:
        node = self.nodes.get(peer)
        if node is None:
            return  # a peer outside this group's members is refused
        if self._held is not None:
            self._held.append((node, message))  # delivered in order once the restore is done
            return
        if _is_last_snapshot_chunk(message) and self._start_restore():
            self._held = [(node, message)]
            return
        if KEEP_NEXT_INDEX_ON_STALE_ACK and message.get("type") == "next_node_idx" and message.get("success"):
            self._deliver_ack(node, message)
        else:
            self._onMessageReceived(node, message)

    def _deliver_ack(self, node: TCPNode, message: dict[str, Any]) -> None:
        # pysyncobj sets nextIndex to the acknowledged index + 1 on every successful ack, so
        # an ack that overtakes entries already sent moves nextIndex back; the entries are
        # sent again and the follower truncates and rewrites its log from there (entries it
        # had acknowledged, even applied: a kill -9 in between loses them on that replica).
        # The leader keeps the larger nextIndex; a follower that really lacks entries still
        # answers reset=True, which pysyncobj honours.
        next_index = self._syncObj._SyncObj__raftNextIndex
        before = next_index.get(node)
        self._onMessageReceived(node, message)
        after = next_index.get(node)
        if before is not None and after is not None and after < before:
            next_index[node] = before

    def _start_restore(self) -> bool:
        """Restore the received snapshot on the snapshot thread; the group pauses meanwhile.

        pysyncobj would restore inside the message handler, on the driver thread, stalling
        every group of the node (and their leaderships) for as long as the restore takes.
        """
        raft = self._syncObj
        incoming = getattr(raft._SyncObj__serializer, "_Serializer__incomingTransmissionFile", None)
        if not ASYNC_RESTORE or incoming is None:
            return False
        incoming.flush()
        raft._kv_restoring = True
        replicator = self._replicator
        job = replicator._snapshots.submit(raft._kv_restore_file, incoming.name)
        job.add_done_callback(lambda _: replicator._driver.call_soon(lambda: self._finish_restore(job)))
        return True

    def _finish_restore(self, job: Future[None]) -> None:
        raft, held = self._syncObj, self._held or []
        self._held = None
        raft._kv_restoring = False
        if job.exception() is not None:
            log.error(
                "snapshot restore failed partition=%d error=%r (retrying on the driver thread)",
                self._partition,
                job.exception(),
            )
        if self._replicator._groups.get(self._partition) is None:
            return  # the group was removed meanwhile
        node, last_chunk = held[0]
        self._onMessageReceived(node, last_chunk)  # pysyncobj installs it; our data is already there
        for node, message in held[1:]:
            self.deliver(node.address, message)
        self._replicator._driver.mark(self._partition)

    def link_changed(self, peer: str, up: bool) -> None:
        node = self.nodes.get(peer)
        if node is not None:
            (self._onNodeConnected if up else self._onNodeDisconnected)(node)

    def announce_links(self) -> None:
        for address, node in self.nodes.items():
            if self._replicator._mux.is_up(address):
                self._onNodeConnected(node)

    def destroy(self) -> None:
        self.setOnMessageReceivedCallback(None)
        self.setOnNodeConnectedCallback(None)
        self.setOnNodeDisconnectedCallback(None)


class _AsyncSerializer(Serializer):
    """Snapshots written on the replicator's snapshot thread, as one file: header + payload."""

    def __init__(self, group: _RaftGroup, path: str, chunk_bytes: int) -> None:
        super().__init__(path, chunk_bytes, False, None, None, None)
        self._group = group
        self._path = path
        self._job: Future[bool] | None = None
        self._job_id: int | None = None
        self._lock = threading.Lock()
        self._cancelled = False

    def serialize(self, data: Any, id: int) -> None:  # pysyncobj's signature
        if self._job is not None or getattr(self, "_Serializer__incomingTransmissionFile", None) is not None:
            return
        _, last, prev, cluster = data
        self._job_id = id
        self._cancelled = False
        replicator = self._group._kv_replicator
        self._job = replicator._snapshots.submit(self._write, tuple(last), tuple(prev), [n.address for n in cluster])

    def checkSerializing(self) -> tuple[int, int | None]:  # noqa: N802
        job = self._job
        if job is None:
            return SERIALIZER_STATE.NOT_SERIALIZING, None
        if not job.done():
            return SERIALIZER_STATE.SERIALIZING, self._job_id
        self._job = None
        ok = job.exception() is None and bool(job.result())
        if ok:
            self.__dict__["_Serializer__transmissions"] = {}  # as the library does: resend from the new file
        return (SERIALIZER_STATE.SUCCESS if ok else SERIALIZER_STATE.FAILED), self._job_id

    def cancel(self) -> None:
        """Make a snapshot in progress end without replacing the current file."""
        with self._lock:
            self._cancelled = True

    def setTransmissionData(self, data: Any) -> bool:  # noqa: N802
        if data is not None and data[1]:  # the first chunk of an incoming snapshot
            with self._lock:
                self._cancelled = True  # our own dump in progress must not replace the leader's
        return bool(super().setTransmissionData(data))

    def deserialize(self) -> tuple[Any, ...]:
        return (None, *self._group._kv_load_dump(self._path))

    def _write(self, last: Entry, prev: Entry, cluster: list[str]) -> bool:
        group = self._group
        replicator = group._kv_replicator
        tmp = self._path + ".tmp"
        try:
            with open(tmp, "wb") as out:
                header = msgpack.packb({"last": list(last), "prev": list(prev), "cluster": cluster}, use_bin_type=True)
                out.write(_DUMP_HEADER.pack(_DUMP_MAGIC, 0, len(header)) + header)
                sm_index = replicator._sm.snapshot(group._kv_partition, out)
                out.seek(0)
                out.write(_DUMP_HEADER.pack(_DUMP_MAGIC, sm_index, len(header)))
                out.flush()
                if replicator.config.synced:
                    os.fsync(out.fileno())
            with self._lock:
                if self._cancelled:
                    os.unlink(tmp)
                    return False
                os.replace(tmp, self._path)
            if replicator.config.synced:
                _fsync_dir(os.path.dirname(self._path))
            log.info("snapshot written partition=%d index=%d sm_index=%d", group._kv_partition, last[1], sm_index)
            return True
        except Exception:
            log.exception("snapshot failed partition=%d", group._kv_partition)
            return False
        finally:
            replicator._driver.mark_threadsafe(group._kv_partition)


def _is_last_snapshot_chunk(message: dict[str, Any]) -> bool:
    serialized = message.get("serialized") if message.get("type") == "append_entries" else None
    return isinstance(serialized, list | tuple) and len(serialized) == 3 and bool(serialized[2])


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_dump_header(inp: BinaryIO) -> dict[str, Any]:
    """Read our header and leave `inp` at the state machine's payload."""
    magic, sm_index, size = _DUMP_HEADER.unpack(inp.read(_DUMP_HEADER.size))
    if magic != _DUMP_MAGIC:
        raise ValueError(f"not a kvstore snapshot (magic {magic!r})")
    header: dict[str, Any] = msgpack.unpackb(inp.read(size), raw=False)
    header["sm_index"] = sm_index
    return header


class _RaftGroup(SyncObj):
    """One partition's replica: a SyncObj ticked by the driver, applying through the state machine."""

    def __init__(self, replicator: PySyncObjReplicator, partition: int, others: list[str], conf: SyncObjConf) -> None:
        self._kv_replicator = replicator
        self._kv_partition = partition
        self._kv_group_poller = _GroupPoller(replicator, partition)
        self._kv_transport: _GroupTransport | None = None
        self._kv_log: GroupLog
        self._kv_restoring = False
        super().__init__(replicator.address, others, conf, transportClass=self._kv_make_transport)

    @property
    def _poller(self) -> _GroupPoller:
        return self._kv_group_poller

    @_poller.setter
    def _poller(self, value: Any) -> None:
        pass  # pysyncobj assigns a poller of its own; every group uses the driver's

    def _kv_make_transport(self, syncobj: Any, self_node: Any, others: Any) -> _GroupTransport:
        self._kv_transport = _GroupTransport(self._kv_replicator, self._kv_partition, syncobj, self_node, others)
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
        self._SyncObj__pipeNotifier = _DriverNotifier(self._kv_replicator._driver, self._kv_partition)

    def _kv_restore_file(self, path: str) -> None:
        sm, partition = self._kv_replicator._sm, self._kv_partition
        with open(path, "rb") as inp:
            index = _read_dump_header(inp)["sm_index"]
            if sm.applied_index(partition) < index:  # else local data already holds the snapshot
                sm.restore(partition, inp)
                log.info("snapshot restored partition=%d index=%d (off the driver thread)", partition, index)

    def _kv_load_dump(self, path: str) -> tuple[Entry, Entry, list[TCPNode]]:
        sm = self._kv_replicator._sm
        with open(path, "rb") as inp:
            header = _read_dump_header(inp)
            last, prev = tuple(header["last"]), tuple(header["prev"])
            local, index = sm.applied_index(self._kv_partition), header["sm_index"]
            if local < index:  # else local data already holds the snapshot: keep it, replay the log
                sm.restore(self._kv_partition, inp)
                log.info("snapshot restored partition=%d index=%d (local was %d)", self._kv_partition, index, local)
        return last, prev, [TCPNode(address) for address in header["cluster"]]

    def _kv_unsubscribe_all(self) -> None:
        for fd in list(self._kv_group_poller.fds):
            self._kv_group_poller.unsubscribe(fd)


# ---- the public API ----


class PySyncObjGroup:
    """`PartitionGroup` over one `_RaftGroup`. Thread-safe."""

    def __init__(self, replicator: PySyncObjReplicator, partition: int, raft: _RaftGroup) -> None:
        self._replicator = replicator
        self.partition = partition
        self._raft = raft
        self._change_lock = threading.Lock()

    def propose(self, command: bytes, timeout_s: float = 5.0) -> bytes | None:
        future = self.propose_async(command, timeout_s)
        try:
            return future.result(timeout_s + 5.0)  # the driver fails it at timeout_s
        except FutureTimeoutError:
            raise ProposalTimeoutError(f"partition {self.partition}: no outcome after {timeout_s} s") from None

    def propose_async(self, command: bytes, timeout_s: float = 5.0) -> Future[Result]:
        future: Future[Result] = Future()
        limit = self._replicator.config.max_command_bytes
        if len(command) > limit:
            settle(future, error=ValueError(f"command: {len(command)} bytes > max_command_bytes {limit}"))
        elif not self._raft._isLeader():
            settle(future, error=NotLeaderError(self.partition, self.leader()))
        else:
            self._replicator._submit(self.partition, command, future, time.monotonic() + timeout_s)
        return future

    def _outcome(self, future: Future[Result], result: Any, error: int) -> None:
        """pysyncobj's callback (driver thread): complete `future` from its outcome."""
        if error == FAIL_REASON.SUCCESS:
            settle(future, result)
        elif error in _NOT_LEADER_REASONS:
            settle(future, error=NotLeaderError(self.partition, self.leader()))
        elif error in _UNKNOWN_REASONS:
            settle(future, error=ProposalTimeoutError(f"partition {self.partition}: outcome unknown (reason {error})"))
        else:
            settle(future, error=ReplicationError(f"partition {self.partition}: proposal failed (reason {error})"))

    def is_leader(self) -> bool:
        return bool(self._raft._isLeader())

    def leader(self) -> NodeId | None:
        node = self._raft._getLeader()
        return None if node is None else self._replicator._node_of(node.address)

    def members(self) -> tuple[NodeId, ...]:
        return self.status().members

    def status(self) -> GroupStatus:
        return self._replicator._driver.call(self._status_now)

    def _status_now(self) -> GroupStatus:
        raft, node_of = self._raft, self._replicator._node_of
        status = raft.getStatus()
        is_leader = bool(raft._isLeader())
        last_index = raft._SyncObj__raftLog[-1][1]
        transport = raft._kv_transport
        others = sorted(transport.nodes) if transport else []
        followers = tuple(
            FollowerProgress(
                node=node_of(address),
                match_index=int(status.get(f"match_idx_server_{address}", 0)),
                lag=last_index - int(status.get(f"match_idx_server_{address}", 0)),
                connected=status.get(f"partner_node_status_server_{address}") == 2,
            )
            for address in others
        )
        leader = status["leader"]
        return GroupStatus(
            partition=self.partition,
            node=self._replicator.node_id,
            is_leader=is_leader,
            leader=None if leader is None else node_of(leader.address),
            term=int(status["raft_term"]),
            commit_index=int(status["commit_idx"]),
            applied_index=int(status["last_applied"]),
            log_entries=int(status["log_len"]),
            members=tuple(sorted([self._replicator.node_id, *(node_of(a) for a in others)])),
            followers=followers if is_leader else (),
        )

    # ---- membership ----

    def add_member(self, node: NodeId, address: str, timeout_s: float = 10.0) -> None:
        self._replicator._remember(node, address)
        with self._change_lock:
            self._change(lambda cb: self._raft.addNodeToCluster(address, callback=cb), address, True, timeout_s)

    def remove_member(self, node: NodeId, timeout_s: float = 10.0) -> None:
        if node == self._replicator.node_id:
            raise MembershipChangeError(
                f"partition {self.partition}: a replica cannot remove itself; transfer leadership first"
            )
        address = self._replicator._address_of(node)
        with self._change_lock:
            self._change(lambda cb: self._raft.removeNodeFromCluster(address, callback=cb), address, False, timeout_s)

    def _change(self, start: Any, address: str, adding: bool, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            transport = self._raft._kv_transport
            if transport is not None and (address in transport.nodes) == adding:
                return  # already done (a retry after an unknown outcome, or an idempotent call)
            if not self._raft._isLeader():
                raise NotLeaderError(self.partition, self.leader())
            error = self._wait_callback(start, deadline)
            if error == FAIL_REASON.SUCCESS:
                return
            if error != FAIL_REASON.REQUEST_DENIED or time.monotonic() >= deadline:
                raise MembershipChangeError(f"partition {self.partition}: change of {address} failed (reason {error})")
            time.sleep(0.05)  # denied until the new leader's no-op is applied

    def _wait_callback(self, start: Any, deadline: float) -> int | None:
        done = threading.Event()
        box: list[int] = []

        def on_result(result: Any, error: int) -> None:
            box.append(error)
            done.set()

        start(on_result)
        if not done.wait(max(0.0, deadline - time.monotonic())):
            raise MembershipChangeError(f"partition {self.partition}: no outcome before the deadline")
        return box[0]

    def wait_caught_up(self, node: NodeId, timeout_s: float = 30.0, max_lag: int = 0) -> None:
        target = self.status().commit_index - max_lag
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status()
            if not status.is_leader:
                raise NotLeaderError(self.partition, status.leader)
            match = next((f.match_index for f in status.followers if f.node == node), None)
            if match is not None and match >= target:
                return
            if time.monotonic() >= deadline:
                raise MembershipChangeError(f"partition {self.partition}: {node} at {match}, needs {target}")
            time.sleep(0.05)

    def transfer_leadership(self, node: NodeId | None = None, timeout_s: float = 10.0) -> NodeId:
        address = None if node is None else self._replicator._address_of(node)
        deadline = time.monotonic() + timeout_s
        with self._change_lock:
            while time.monotonic() < deadline:
                leader = self.leader()
                if leader is not None and leader != self._replicator.node_id and (node is None or leader == node):
                    return leader
                if self._raft._isLeader():
                    error = self._wait_callback(
                        lambda cb: self._replicator._driver.call(
                            lambda: self._raft.transferLeadership(address, callback=cb)
                        ),
                        deadline,
                    )
                    if error == FAIL_REASON.SUCCESS:
                        self._wait_leader_change(min(deadline, time.monotonic() + 3.0))
                        continue
                time.sleep(0.05)
        raise MembershipChangeError(f"partition {self.partition}: leadership not transferred to {node}")

    def _wait_leader_change(self, until: float) -> None:
        while time.monotonic() < until and self._raft._isLeader():
            time.sleep(0.02)


class PySyncObjReplicator:
    """`Replicator` for one node process: one port, one driver thread, one snapshot thread."""

    def __init__(self, node_id: NodeId, config: PySyncObjConfig, state_machine: StateMachine) -> None:
        config.validate()
        self.node_id = node_id
        self.config = config
        self._sm = state_machine
        self._groups: dict[int, PySyncObjGroup] = {}
        self._addresses: dict[NodeId, str] = {}
        self._nodes: dict[str, NodeId] = {}
        self._poller = Poller()
        self._proposals: collections.deque[tuple[int, bytes, Future[Result], float]] = collections.deque()
        self._take_scheduled = False
        self._deadlines = Deadlines()
        self._mux = Mux(
            self._poller,
            secret=config.secret,
            on_message=self._on_message,
            on_link=self._on_link,
            reconnect_s=config.reconnect_s,
            compress_min_bytes=config.compress_min_bytes,
            before_write=self._flush_log,
        )
        self._driver = Driver(
            self._poller, tick_s=config.tick_s, on_idle_tick=self._on_idle_tick, on_flush=self._end_round
        )
        self._snapshots = ThreadPoolExecutor(1, thread_name_prefix="raft-snapshot")
        self._log_store: LogStore | None = None
        self._next_balance = 0.0
        self._started = False
        self._closed = False

    @property
    def address(self) -> str:
        return self._mux.address

    def start(self) -> None:
        os.makedirs(os.path.join(self.config.data_dir, "snapshots"), exist_ok=True)
        self._log_store = LogStore(os.path.join(self.config.data_dir, "raftlog"), synced=self.config.synced)
        self._mux.listen(self.config.bind_host, self.config.port)
        self._remember(self.node_id, self.address)
        self._driver.start()
        self._started = True
        log.info("replicator started node=%s address=%s synced=%s", self.node_id, self.address, self.config.synced)

    # ---- groups ----

    def add_group(self, partition: int, members: Mapping[NodeId, str]) -> PySyncObjGroup:
        if not self._started or self._closed:
            raise RuntimeError("replicator is not running")
        if members.get(self.node_id) != self.address:
            raise ValueError(
                f"members must map this node {self.node_id} to {self.address}, got {members.get(self.node_id)}"
            )
        for node, address in members.items():
            self._remember(node, address)
        others = sorted(address for node, address in members.items() if node != self.node_id)
        return self._driver.call(lambda: self._open_group(partition, others))

    def _open_group(self, partition: int, others: list[str]) -> PySyncObjGroup:
        existing = self._groups.get(partition)
        if existing is not None:
            return existing
        assert self._log_store is not None
        group_log = self._log_store.group(partition)
        dump_path = os.path.join(self.config.data_dir, "snapshots", f"p{partition}.snap")
        if os.path.exists(dump_path):
            self._trim_to_dump(group_log, dump_path)
        raft = _RaftGroup(self, partition, others, self._syncobj_conf(group_log, dump_path))
        raft._kv_log = group_log
        raft._kv_replace_notifier()
        raft._SyncObj__serializer = _AsyncSerializer(raft, dump_path, self.config.snapshot_chunk_bytes)
        group = PySyncObjGroup(self, partition, raft)
        self._groups[partition] = group
        self._driver.groups[partition] = raft
        self._peers_changed()
        assert raft._kv_transport is not None
        raft._kv_transport.announce_links()
        self._driver.mark(partition)
        log.info("group opened partition=%d members=%s log_entries=%d", partition, others, len(group_log.entries))
        return group

    @staticmethod
    def _trim_to_dump(group_log: GroupLog, dump_path: str) -> None:
        # pysyncobj clears the whole log when its first two entries differ from the dump's
        # (a crash between writing a snapshot and compacting): trim to the dump instead.
        with open(dump_path, "rb") as inp:
            header = _read_dump_header(inp)
        _, prev_index, prev_term = header["prev"]
        if not group_log.trim_before(prev_index, prev_term):
            log.warning("log does not hold the snapshot's entry partition=%d index=%d", group_log.partition, prev_index)

    def _syncobj_conf(self, group_log: GroupLog, dump_path: str) -> SyncObjConf:
        cfg = self.config
        return SyncObjConf(
            autoTick=False,
            appendEntriesUseBatch=False,
            appendEntriesPeriod=cfg.heartbeat_s,
            raftMinTimeout=cfg.election_timeout_s[0],
            raftMaxTimeout=cfg.election_timeout_s[1],
            leaderFallbackTimeout=cfg.leader_fallback_s,
            connectionRetryTime=cfg.reconnect_s,
            connectionTimeout=max(3.5, cfg.election_timeout_s[1]),
            appendEntriesBatchSizeBytes=cfg.append_batch_bytes,
            logCompactionMinEntries=cfg.log_compaction_min_entries,
            logCompactionMinTime=cfg.log_compaction_min_time_s,
            logCompactionBatchSize=cfg.snapshot_chunk_bytes,
            journalFile=_Journal(group_log),
            fullDumpFile=dump_path,
            serializer=_unused_hook,
            deserializer=_unused_hook,
            dynamicMembershipChange=True,
            commandsWaitLeader=False,
        )

    def remove_group(self, partition: int, *, purge: bool = True) -> None:
        self._driver.call(lambda: self._close_group(partition, purge))

    def _close_group(self, partition: int, purge: bool) -> None:
        group = self._groups.pop(partition, None)
        self._driver.groups.pop(partition, None)
        if group is None:
            return
        group._raft._SyncObj__serializer.cancel()
        group._raft.destroy()
        group._raft._kv_unsubscribe_all()
        self._peers_changed()
        if purge:
            assert self._log_store is not None
            self._log_store.drop(partition)
            dump = os.path.join(self.config.data_dir, "snapshots", f"p{partition}.snap")
            for path in (dump, dump + ".tmp", dump + ".1.tmp"):
                if os.path.exists(path):
                    os.unlink(path)
        log.info("group closed partition=%d purge=%s", partition, purge)

    def group(self, partition: int) -> PySyncObjGroup:
        return self._groups[partition]

    def partitions(self) -> list[int]:
        return sorted(self._groups)

    def log_writes(self) -> int:
        """Return the RocksDB writes the Raft log made so far (one per driver round at most)."""
        return 0 if self._log_store is None else self._log_store.writes

    def leader_count(self) -> int:
        return sum(1 for g in list(self._groups.values()) if g.is_leader())

    def set_blocked_peers(self, nodes: set[NodeId]) -> None:
        """Test-only fault: drop every message to and from these nodes (TCP stays up)."""
        addresses = {self._addresses[n] for n in nodes}
        self._driver.call(lambda: setattr(self._mux, "blocked", addresses))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._started:
            try:
                self._driver.call(self._close_all, timeout_s=30)
            except RuntimeError:  # the driver thread is gone: nothing else touches the groups
                self._close_all()
            finally:
                self._snapshots.shutdown(wait=True)  # before the driver: jobs end by waking it
                self._driver.stop()
        self._snapshots.shutdown(wait=True)
        self._mux.close()
        self._poller.close()
        if self._log_store is not None:
            self._log_store.close()

    def _close_all(self) -> None:
        for partition in list(self._groups):
            self._close_group(partition, purge=False)
        self._take_proposals()
        self._deadlines.fail_all("the replicator closed")

    # ---- proposals ----

    def _submit(self, partition: int, command: bytes, future: Future[Result], deadline: float) -> None:
        """Queue a proposal for the driver's next round (any thread)."""
        if self._closed:
            settle(future, error=ReplicationError(f"partition {partition}: the replicator is closed"))
            return
        self._proposals.append((partition, command, future, deadline))
        if not self._take_scheduled:  # one driver call takes every proposal queued before it runs
            self._take_scheduled = True
            self._driver.call_soon(self._take_proposals)

    def _take_proposals(self) -> None:
        """Hand every queued proposal to its group (driver thread); each group ticks this round."""
        self._take_scheduled = False  # before taking: a proposal queued after this schedules a new call
        while self._proposals:
            partition, command, future, deadline = self._proposals.popleft()
            group = self._groups.get(partition)
            if group is None:
                settle(future, error=NotLeaderError(partition, None))
            elif not group._raft._isLeader():
                settle(future, error=NotLeaderError(partition, group.leader()))
            elif not future.done():
                self._deadlines.track(future, partition, deadline)
                group._raft._kv_apply(command, callback=functools.partial(group._outcome, future))

    # ---- driver callbacks ----

    def _flush_log(self) -> None:
        if self._log_store is not None:
            self._log_store.flush()

    def _end_round(self) -> None:
        self._deadlines.expire(time.monotonic())
        self._flush_log()
        self._mux.flush()

    def _on_message(self, peer: str, partition: int, message: dict[str, Any]) -> None:
        group = self._groups.get(partition)
        if group is not None and group._raft._kv_transport is not None:
            group._raft._kv_transport.deliver(peer, message)
            self._driver.mark(partition)

    def _on_link(self, peer: str, up: bool) -> None:
        for partition, group in self._groups.items():
            if group._raft._kv_transport is not None:
                group._raft._kv_transport.link_changed(peer, up)
                self._driver.mark(partition)

    def _on_idle_tick(self, now: float) -> None:
        self._mux.maintain(now)
        for group in self._groups.values():
            # pysyncobj compacts by entry count or age; the whole log is in RAM, so bound its bytes too
            if group._raft._kv_log.size_bytes > self.config.log_compaction_max_bytes:
                group._raft.forceLogCompaction()
        if self.config.balance_leaders and now >= self._next_balance:
            self._next_balance = now + self.config.balance_interval_s
            self._balance_leaders()

    def _balance_leaders(self) -> None:
        """Hand each group we lead to its preferred replica (members sorted, rotated by partition)."""
        moved = 0
        for partition, group in self._groups.items():
            raft = group._raft
            if moved >= 4 or not raft._isLeader() or group._change_lock.locked() or raft._kv_transport is None:
                continue
            members = sorted([self.address, *raft._kv_transport.nodes])
            preferred = members[partition % len(members)]
            if preferred != self.address and self._mux.is_up(preferred):
                raft.transferLeadership(preferred, callback=None)
                moved += 1

    def _peers_changed(self) -> None:
        peers: set[str] = set()
        for group in self._groups.values():
            if group._raft._kv_transport is not None:
                peers.update(group._raft._kv_transport.nodes)
        self._mux.set_peers(peers)

    # ---- address book ----

    def learn_addresses(self, addresses: Mapping[NodeId, str]) -> None:
        """Record node ids of Raft addresses (for leader hints and member lists)."""
        for node, address in addresses.items():
            self._remember(node, address)

    def _remember(self, node: NodeId, address: str) -> None:
        self._addresses[node] = address
        self._nodes[address] = node

    def _node_of(self, address: str) -> NodeId:
        return self._nodes.get(address, NodeId(address))

    def _address_of(self, node: NodeId) -> str:
        try:
            return self._addresses[node]
        except KeyError:
            raise MembershipChangeError(f"unknown node {node!r}: add it with its address first") from None


def _no_send() -> None:
    pass


def _unused_hook(*args: Any) -> Any:
    raise AssertionError("replaced by _AsyncSerializer")
