"""`propose_async`: many proposals in flight, batched per driver round, outcomes through futures."""

from __future__ import annotations

from typing import Any

import pytest

from kvstore.replication import NotLeaderError, ProposalTimeoutError, ReplicationError, when_all
from tests.conftest import wait_until
from tests.replication.harness import RaftCluster
from tests.replication.inproc import members_of, replicators, wait_leader


@pytest.mark.cluster
def test_a_burst_of_proposals_commits_in_order_with_few_log_writes_and_messages(raft3: RaftCluster) -> None:
    partitions = [0, 1, 2, 3]
    raft3.open_groups(partitions)
    per_partition = 100
    leader = raft3.leader(0)
    for p in partitions[1:]:  # one node leads all four, so one call proposes the whole burst
        current = raft3.leader(p)
        if current is not leader:
            current.rpc("transfer", p, leader.node_id)
    assert all(raft3.leader(p) is leader for p in partitions)
    items = [(p, b"p%d-%04d" % (p, i)) for i in range(per_partition) for p in partitions]
    before = leader.rpc("io_counts")
    results = leader.rpc("propose_many", items, 30.0)
    after = leader.rpc("io_counts")

    assert [r[:3] if isinstance(r, bytes) else r for r in results] == [b"ok:"] * len(items)
    # One log write and one append message per follower per round, not one per proposal:
    # one per proposal would be 400 writes and 800 append messages.
    assert after["log_writes"] - before["log_writes"] < len(items) // 4
    assert after["messages"] - before["messages"] < len(items) // 2
    for p in partitions:
        raft3.wait_applied_everywhere(p, leader.rpc("applied", p))
        views = [[c for _, c in n.rpc("entries", p)] for n in raft3.live()]
        assert all(view == views[0] for view in views)
        assert views[0][-per_partition:] == [c for q, c in items if q == p]  # in the order proposed


def test_outcomes_arrive_through_the_future(tmp_path: Any) -> None:
    with replicators(str(tmp_path), 3) as reps:
        groups = [rep.add_group(0, members_of(reps)) for rep, _ in reps]
        leader = wait_leader(groups)
        follower = next(g for g in groups if g is not leader)

        leader_sm = next(sm for rep, sm in reps if rep is leader._replicator)
        assert leader.propose_async(b"first").result(10) == b"ok:%d" % leader_sm.applied_index(0)
        refused = follower.propose_async(b"to a follower")
        with pytest.raises(NotLeaderError) as info:
            refused.result(10)
        assert info.value.leader == leader._replicator.node_id
        too_big = leader.propose_async(b"x" * (leader._replicator.config.max_command_bytes + 1))
        with pytest.raises(ValueError, match="max_command_bytes"):
            too_big.result(10)
        with pytest.raises(ValueError, match="max_command_bytes"):
            leader.propose(b"x" * (leader._replicator.config.max_command_bytes + 1))


def test_a_proposal_that_cannot_commit_times_out(tmp_path: Any) -> None:
    with replicators(str(tmp_path), 3) as reps:
        groups = [rep.add_group(0, members_of(reps)) for rep, _ in reps]
        leader = wait_leader(groups)
        others = {rep.node_id for rep, _ in reps if rep is not leader._replicator}
        leader._replicator.set_blocked_peers(others)  # no follower hears it: no majority
        future = leader.propose_async(b"stranded", timeout_s=0.5)
        with pytest.raises(ProposalTimeoutError):
            future.result(10)
        with pytest.raises(ProposalTimeoutError):
            leader.propose(b"stranded too", timeout_s=0.5)


def test_closing_fails_proposals_in_flight_and_later_ones(tmp_path: Any) -> None:
    with replicators(str(tmp_path), 3) as reps:
        groups = [rep.add_group(0, members_of(reps)) for rep, _ in reps]
        leader = wait_leader(groups)
        rep = leader._replicator
        rep.set_blocked_peers({r.node_id for r, _ in reps if r is not rep})
        stranded = [leader.propose_async(b"s%d" % i, timeout_s=60) for i in range(5)]
        rep.close()
        when_all(stranded).result(10)
        assert all(isinstance(f.exception(), ReplicationError) for f in stranded)
        with pytest.raises(ReplicationError):
            leader.propose_async(b"after close").result(10)


def test_a_leader_handing_over_refuses_proposals_and_leader_reads_naming_the_target(tmp_path: Any) -> None:
    with replicators(str(tmp_path), 3) as reps:
        groups = [rep.add_group(0, members_of(reps)) for rep, _ in reps]
        leader = wait_leader(groups)
        assert leader.propose(b"before") is not None
        rep = next(r for r, _ in reps if r.group(0) is leader)
        target = next(r for r, _ in reps if r is not rep)
        term = leader.status().term
        rep._driver.call(lambda: leader.start_transfer(target.address))
        # Until the target is elected (or an election timeout passes) nothing new is taken here.
        refused = leader.propose_async(b"during", 5.0).exception(5.0)
        assert isinstance(refused, NotLeaderError) and refused.leader == target.node_id
        assert not leader.serves_leader_reads()
        new = target.group(0)
        wait_until(new.is_leader, what="the target to lead")
        assert new.status().term > term
        assert new.propose(b"after") is not None
