"""Replication interface: one Raft group per partition, behind a small engine-agnostic API.

The node talks to a `Replicator` (one per process) and its `PartitionGroup`s; the state
machine it supplies implements `StateMachine`. The only implementation today is
`kvstore.replication.pysyncobj_engine.PySyncObjReplicator` (the one package that imports
pysyncobj); nothing here depends on it, so the engine can be replaced.

Write path on the leader:
1. `group.propose_async(command_bytes, timeout_s)` returns a future at once (`propose` is
   the blocking form); a non-leader fails it with `NotLeaderError` naming the last known
   leader. Many proposals of many groups can be in flight; `when_all` waits for a set of
   them with one wake-up.
2. The engine's thread takes every proposal queued since its last round: per group it
   appends them to the log (one RocksDB write per round for all groups) and ships them to
   each follower in one message.
3. Once a majority has them in their logs, they are committed; every replica calls
   `StateMachine.apply(partition, command, index)` in log order, on the engine's thread.
4. The future completes with the leader's `apply` result.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import BinaryIO, NewType, Protocol

from kvstore.replication.futures import when_all

__all__ = [
    "FollowerProgress",
    "GroupStatus",
    "MembershipChangeError",
    "NodeId",
    "NotLeaderError",
    "PartitionGroup",
    "ProposalTimeoutError",
    "ReplicationError",
    "Replicator",
    "StateMachine",
    "when_all",
]

NodeId = NewType("NodeId", str)


class ReplicationError(Exception):
    """Base of the replication errors."""


class NotLeaderError(ReplicationError):
    """This replica is not the partition's leader; `leader` is the last known one (or None)."""

    def __init__(self, partition: int, leader: NodeId | None) -> None:
        super().__init__(partition, leader)  # args stay (partition, leader): the error pickles
        self.partition = partition
        self.leader = leader

    def __str__(self) -> str:
        return f"partition {self.partition}: not the leader (leader hint: {self.leader})"


class ProposalTimeoutError(ReplicationError):
    """No outcome within the timeout: the command may or may not be committed later."""


class MembershipChangeError(ReplicationError):
    """A membership change or leadership transfer did not complete."""


class StateMachine(Protocol):
    """What a partition replica applies; supplied by the caller, shared by all its groups.

    `apply`, `applied_index` and `restore` run on the engine's driver thread; `snapshot`
    runs on a background thread, concurrently with `apply` of the same partition.
    """

    def apply(self, partition: int, command: bytes, index: int) -> bytes | None:
        """Apply the committed command at log `index` and return its result.

        Must be deterministic, skip an `index` at or below `applied_index` (replays after a
        restart), store `index` atomically with the data, and never raise: catch and
        return an error value instead (a raising apply would block the group forever).
        """
        ...

    def applied_index(self, partition: int) -> int:
        """Return the last log index applied to the partition (0 if none), durably stored."""
        ...

    def snapshot(self, partition: int, out: BinaryIO) -> int:
        """Write a self-contained, consistent snapshot of the partition to `out`.

        The state written must include every entry applied before the call (a later state
        is fine: its stored applied index makes the replay skip what it covers). Returns the
        applied index the snapshot holds.
        """
        ...

    def restore(self, partition: int, inp: BinaryIO) -> None:
        """Replace the partition's data with the snapshot read from `inp`."""
        ...


@dataclass(frozen=True)
class FollowerProgress:
    """The leader's view of one follower."""

    node: NodeId
    match_index: int
    lag: int
    connected: bool


@dataclass(frozen=True)
class GroupStatus:
    """One replica's view of its group."""

    partition: int
    node: NodeId
    is_leader: bool
    leader: NodeId | None
    term: int
    commit_index: int
    applied_index: int
    log_entries: int
    members: tuple[NodeId, ...]
    followers: tuple[FollowerProgress, ...] = field(default=())


class PartitionGroup(Protocol):
    """The local replica of one partition's Raft group. Thread-safe."""

    partition: int

    def propose(self, command: bytes, timeout_s: float = 5.0) -> bytes | None:
        """Replicate `command`; return the leader's apply result once committed and applied.

        Raises NotLeaderError (with a hint) when this replica is not the leader,
        ProposalTimeoutError when there is no outcome in time, ReplicationError otherwise;
        ValueError for a command over the engine's size limit.
        """
        ...

    def propose_async(self, command: bytes, timeout_s: float = 5.0) -> Future[bytes | None]:
        """Start replicating `command`; return a future of the leader's apply result. Never blocks.

        The future fails with the errors `propose` raises (ValueError included); it
        completes on the engine's thread, so its done-callbacks must be short. Proposals
        of one group made by one thread are committed in the order they were made.
        """
        ...

    def is_leader(self) -> bool:
        """Return whether this replica currently acts as leader (False within ~2 s of losing quorum)."""
        ...

    def serves_leader_reads(self) -> bool:
        """Return whether a read here now sees every write acknowledged before it.

        True only on a leader that has applied everything committed before its term and
        heard from a majority within a lease shorter than the minimum election timeout
        (so, barring an asymmetric partition, no newer leader can exist yet).
        """
        ...

    def leader(self) -> NodeId | None:
        """Return the last known leader, or None."""
        ...

    def status(self) -> GroupStatus:
        """Return a consistent snapshot of this replica's view of the group."""
        ...

    def add_member(self, node: NodeId, address: str, timeout_s: float = 10.0) -> None:
        """Add a replica (leader only); returns once the change is committed."""
        ...

    def wait_caught_up(self, node: NodeId, timeout_s: float = 30.0, max_lag: int = 0) -> None:
        """Wait (on the leader) until `node` has every entry committed at the call, within `max_lag`."""
        ...

    def transfer_leadership(self, node: NodeId | None = None, timeout_s: float = 10.0) -> NodeId:
        """Hand leadership to `node` (or the most caught-up follower); return the new leader."""
        ...

    def remove_member(self, node: NodeId, timeout_s: float = 10.0) -> None:
        """Remove a replica (leader only; not the leader itself: transfer first)."""
        ...


class Replicator(Protocol):
    """All Raft groups of one node process, driven without a thread per group."""

    node_id: NodeId

    @property
    def address(self) -> str:
        """Return the `host:port` peers use to reach this node (valid after `start`)."""
        ...

    def start(self) -> None:
        """Bind the Raft port and start the driver."""
        ...

    def add_group(self, partition: int, members: Mapping[NodeId, str]) -> PartitionGroup:
        """Open (or reopen from disk) the local replica of `partition` with these members."""
        ...

    def remove_group(self, partition: int, *, purge: bool = True) -> None:
        """Stop the local replica; with `purge`, delete its log and snapshot."""
        ...

    def group(self, partition: int) -> PartitionGroup:
        """Return the local replica of `partition`; KeyError if there is none."""
        ...

    def partitions(self) -> list[int]:
        """Return the partitions with a local replica."""
        ...

    def close(self) -> None:
        """Stop every group, the driver and the port; idempotent."""
        ...
