"""`Replicator` on PySyncObj 0.3.17: the only package that imports pysyncobj.

Each local partition replica is a `SyncObj` with one replicated method taking our command
bytes. Modules, one job each:

- `config`: `PySyncObjConfig` and its checks;
- `patches`: the two process-wide changes to pysyncobj (internals 1 and 2 below);
- `journal`: pysyncobj's journal interface over our RocksDB log;
- `transport`: a group's poller, notifier and transport over the node's `Mux`;
- `snapshots`: snapshot files written and read off the driver thread;
- `raft_group`: the `SyncObj` subclass, ticked by the driver;
- `group`: `PySyncObjGroup`, the public `PartitionGroup`;
- `replicator`: `PySyncObjReplicator`, the public `Replicator` (driver, port, proposals).

What we replace or configure, and why (measured facts in shared/notes/pysyncobj.md):

- `autoTick=False`, one `Driver` thread for all groups, and every group's poller is the
  driver's (`RaftGroup._poller`): no thread per group. With `appendEntriesUseBatch=False`
  a queued proposal marks its group for the driver's next round (`DriverNotifier`), so a
  commit takes milliseconds instead of an append period.
- Proposals go through the driver (`propose_async`): every proposal queued since the last
  round is appended in that round and shipped to each follower in one message
  (`RaftGroup._checkCommandsToApply`), not one message per proposal.
- `GroupTransport` sends through the node's `Mux`: one port and one TCP connection per
  peer for all groups, msgpack on the wire, peers outside the group refused.
- `GroupJournal` keeps the log in RocksDB (`raft_log.py`): compaction is one atomic range
  delete, and before a group opens we trim the log to the snapshot on disk, closing both
  crash windows of pysyncobj's file journal.
- `AsyncSerializer` writes snapshots on a background thread (the driver never waits for
  one), as one file: our header then the state machine's payload.

pysyncobj internals we touch (tests: tests/replication/test_internals.py; 6 in test_cluster.py;
4 and 7 by the I/O counts in test_propose_async.py):
1. `pysyncobj.pickle.__protocol = 4`: log entries hold our bytes without protocol 2's
   latin-1 blow-up (a 26.6 KB batch became 44.5 KB).
2. `pysyncobj.syncobj.createJournal` is wrapped so a `Journal` instance passed as
   `journalFile` is used as is (there is no public journal seam).
3. `SyncObj._SyncObj__serializer` is replaced after construction by `AsyncSerializer`.
4. The group's PipeNotifier (`_SyncObj__pipeNotifier`, a pipe per group) is closed after
   construction and replaced by `DriverNotifier`.
5. `_SyncObj__raftNextIndex` is kept from moving back on a stale successful ack (see
   `GroupTransport._deliver_ack`): pysyncobj otherwise resends entries and followers truncate
   and rewrite acknowledged (even applied) entries.
6. A received snapshot is restored on the snapshot thread before pysyncobj sees its last
   chunk (`GroupTransport._start_restore`, reads `_Serializer__incomingTransmissionFile`);
   the group's ticks and messages wait meanwhile, other groups carry on.
7. `_SyncObj__sendAppendEntries` is shadowed by a no-op while `_checkCommandsToApply` takes
   the queued commands, then called once (`RaftGroup._checkCommandsToApply`).
"""

from __future__ import annotations

from kvstore.replication.pysyncobj_engine import patches  # noqa: F401 (applied on import)
from kvstore.replication.pysyncobj_engine.config import ConfigError, PySyncObjConfig
from kvstore.replication.pysyncobj_engine.group import PySyncObjGroup
from kvstore.replication.pysyncobj_engine.replicator import PySyncObjReplicator

__all__ = ["ConfigError", "PySyncObjConfig", "PySyncObjGroup", "PySyncObjReplicator"]
