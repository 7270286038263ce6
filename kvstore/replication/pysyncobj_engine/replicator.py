"""`Replicator` for one node process: one port, one driver thread, one snapshot thread."""

from __future__ import annotations

import collections
import functools
import logging
import os
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from pysyncobj import SyncObjConf

from kvstore.replication import MembershipChangeError, NodeId, NotLeaderError, ReplicationError, StateMachine
from kvstore.replication.driver import Driver
from kvstore.replication.mux import Mux, Poller
from kvstore.replication.proposals import Deadlines, Result, settle
from kvstore.replication.pysyncobj_engine.config import PySyncObjConfig
from kvstore.replication.pysyncobj_engine.group import PySyncObjGroup
from kvstore.replication.pysyncobj_engine.journal import GroupJournal
from kvstore.replication.pysyncobj_engine.raft_group import RaftGroup
from kvstore.replication.pysyncobj_engine.snapshots import AsyncSerializer, read_dump_header
from kvstore.replication.raft_log import GroupLog, LogStore

log = logging.getLogger(__name__)


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
        raft = RaftGroup(self, partition, others, self._syncobj_conf(group_log, dump_path))
        raft._kv_log = group_log
        raft._kv_replace_notifier()
        raft._SyncObj__serializer = AsyncSerializer(raft, dump_path, self.config.snapshot_chunk_bytes)
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
            header = read_dump_header(inp)
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
            journalFile=GroupJournal(group_log),
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
            elif not group.takes_proposals():
                settle(future, error=group.not_leader())
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
            if preferred != self.address and self._mux.is_up(preferred) and not group._handing_over():
                group.start_transfer(preferred)
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


def _unused_hook(*args: Any) -> Any:
    raise AssertionError("replaced by AsyncSerializer")
