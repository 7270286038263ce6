"""`PartitionGroup` over one `RaftGroup`: proposals, status, membership, leadership transfer."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import TYPE_CHECKING, Any

from pysyncobj.config import FAIL_REASON

from kvstore.replication import (
    FollowerProgress,
    GroupStatus,
    MembershipChangeError,
    NodeId,
    NotLeaderError,
    ProposalTimeoutError,
    ReplicationError,
)
from kvstore.replication.proposals import Result, settle
from kvstore.replication.pysyncobj_engine.raft_group import RaftGroup

if TYPE_CHECKING:
    from kvstore.replication.pysyncobj_engine.replicator import PySyncObjReplicator

# Reasons that mean the command was not (and will not be) committed: safe to retry elsewhere.
NOT_LEADER_REASONS = (FAIL_REASON.NOT_LEADER, FAIL_REASON.MISSING_LEADER, FAIL_REASON.DISCARDED)
# Reasons that leave the outcome open (a command forwarded to a leader that then changed).
UNKNOWN_REASONS = (FAIL_REASON.LEADER_CHANGED, FAIL_REASON.UNKNOWN_OUTCOME)


class PySyncObjGroup:
    """`PartitionGroup` over one `RaftGroup`. Thread-safe."""

    def __init__(self, replicator: PySyncObjReplicator, partition: int, raft: RaftGroup) -> None:
        self._replicator = replicator
        self.partition = partition
        self._raft = raft
        self._change_lock = threading.Lock()
        # While a leadership transfer is pending: until when, in which term, to whom (None: PySyncObj's pick).
        self._handover: tuple[float, int, NodeId | None] = (0.0, -1, None)

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
        elif not self.takes_proposals():
            settle(future, error=self.not_leader())
        else:
            self._replicator._submit(self.partition, command, future, time.monotonic() + timeout_s)
        return future

    def takes_proposals(self) -> bool:
        """Leader, and not handing leadership over (an entry appended now would make the
        target's log shorter than the old leader's, so the others would refuse to elect it)."""
        return bool(self._raft._isLeader()) and not self._handing_over()

    def not_leader(self) -> NotLeaderError:
        """The refusal for a proposal here, naming the transfer's target while one is pending."""
        if self._handing_over():  # no hint when PySyncObj picks the target: the client backs off
            return NotLeaderError(self.partition, self._handover[2])
        return NotLeaderError(self.partition, self.leader())

    def _handing_over(self) -> bool:
        """A transfer started in this term is pending (a later term, led here again, is not one)."""
        until, term, _ = self._handover
        return until > time.monotonic() and term == self._raft._SyncObj__raftCurrentTerm

    def start_transfer(self, address: str | None, callback: Any = None) -> None:
        """Ask PySyncObj to hand leadership to `address` (driver thread), as Raft's TimeoutNow.

        Until the target is elected, or for at most the minimum election timeout, this leader
        takes no new proposals and serves no leader reads (etcd does the same): the target
        stays as caught up as the transfer required, so it wins at once instead of losing
        elections to replicas with longer logs, and a read here cannot miss a write the new
        leader already took.
        """

        def on_result(result: Any, error: int) -> None:
            if error == FAIL_REASON.SUCCESS:
                target = None if address is None else self._replicator._node_of(address)
                until = time.monotonic() + self._replicator.config.election_timeout_s[0]
                self._handover = (until, self._raft._SyncObj__raftCurrentTerm, target)
            if callback is not None:
                callback(result, error)

        self._raft.transferLeadership(address, callback=on_result)

    def _outcome(self, future: Future[Result], result: Any, error: int) -> None:
        """pysyncobj's callback (driver thread): complete `future` from its outcome."""
        if error == FAIL_REASON.SUCCESS:
            settle(future, result)
        elif error in NOT_LEADER_REASONS:
            settle(future, error=NotLeaderError(self.partition, self.leader()))
        elif error in UNKNOWN_REASONS:
            settle(future, error=ProposalTimeoutError(f"partition {self.partition}: outcome unknown (reason {error})"))
        else:
            settle(future, error=ReplicationError(f"partition {self.partition}: proposal failed (reason {error})"))

    def is_leader(self) -> bool:
        return bool(self._raft._isLeader())

    def serves_leader_reads(self) -> bool:
        raft = self._raft
        if not raft._isLeader() or self._handing_over():
            return False
        noop = raft._SyncObj__noopIDx  # the no-op a new leader commits first in its term
        if noop is None or raft.raftLastApplied < noop:
            return False
        others = len(raft._SyncObj__otherNodes)
        since = time.monotonic() - self._replicator.config.read_lease_s
        try:  # read from another thread than the driver's: a concurrent change is a miss, not an error
            heard = sum(1 for t in list(raft._SyncObj__lastResponseTime.values()) if t > since)
        except RuntimeError:
            return False
        return 1 + heard > (others + 1) / 2

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
                        lambda cb: self._replicator._driver.call(lambda: self.start_transfer(address, cb)),
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
