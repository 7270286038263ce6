"""Three replicator processes on 127.0.0.1: commit, apply, failover, catch-up, restart."""

from __future__ import annotations

import time

import pytest

from kvstore.replication import NotLeaderError
from tests.conftest import wait_until
from tests.replication.harness import RaftCluster, propose_stream

pytestmark = pytest.mark.cluster


def test_groups_commit_and_apply_identically_everywhere(raft3: RaftCluster) -> None:
    partitions = range(4)
    raft3.open_groups(partitions)
    expected = {}
    for p in partitions:
        leader = raft3.leader(p)
        commands = [b"p%d-cmd-%d" % (p, i) for i in range(20)]
        for command in commands:
            result = leader.rpc("propose", p, command, 5.0)
            assert result.startswith(b"ok:")
        expected[p] = commands
    for p in partitions:
        applied = max(n.rpc("applied", p) for n in raft3.live())
        raft3.wait_applied_everywhere(p, applied)
        views = [n.rpc("entries", p) for n in raft3.live()]
        assert all(view == views[0] for view in views)
        assert [c for _, c in views[0]] == expected[p]


def _assert_identical(raft: RaftCluster, partition: int, acked: list[bytes]) -> list[bytes]:
    """Every live replica holds the same commands, and every acknowledged one is among them."""
    top = max(n.rpc("applied", partition) for n in raft.live())
    raft.wait_applied_everywhere(partition, top)
    views = [n.rpc("entries", partition) for n in raft.live()]
    assert all(view == views[0] for view in views), "replicas differ"
    commands = [c for _, c in views[0]]
    missing = set(acked) - set(commands)
    assert not missing, f"{len(missing)} acknowledged commands lost, e.g. {sorted(missing)[:3]}"
    return commands


def test_leader_kill_loses_no_acknowledged_command(raft3: RaftCluster) -> None:
    raft3.open_groups([0, 1])
    first_leader = raft3.leader(0)
    killed: list[float] = []

    def kill_at(i: int) -> None:
        if i == 40:
            first_leader.kill()
            killed.append(time.monotonic())

    acked = propose_stream(raft3, 0, 120, b"k", on_each=kill_at)
    assert len(acked) >= 100
    _assert_identical(raft3, 0, acked)
    raft3.reopen(first_leader.node_id)
    commands = _assert_identical(raft3, 0, acked)
    assert len(commands) >= len(acked)


def test_failover_time_is_bounded(raft3: RaftCluster) -> None:
    raft3.open_groups([0])
    leader = raft3.leader(0)
    leader.rpc("propose", 0, b"before", 5.0)
    leader.kill()
    start = time.monotonic()
    acked = propose_stream(raft3, 0, 1, b"after")
    failover_s = time.monotonic() - start
    print(f"failover (kill -9 of the leader to the next acknowledged commit): {failover_s:.2f} s")
    assert acked and failover_s < 6.0
    _assert_identical(raft3, 0, [b"before", *acked])


def test_follower_restart_catches_up_from_snapshot_and_log(tmp_path: object) -> None:
    raft = RaftCluster(str(tmp_path), 3, {"log_compaction_min_entries": 20})
    try:
        raft.start()
        raft.open_groups([0])
        leader = raft.leader(0)
        follower = next(n for n in raft.live() if n is not leader)
        acked = propose_stream(raft, 0, 10, b"a")
        follower.kill()
        acked += propose_stream(raft, 0, 80, b"b")
        wait_until(lambda: leader.rpc("snapshot_exists", 0), what="a snapshot on the leader")
        wait_until(lambda: leader.rpc("log_entries", 0) < 60, what="a compacted leader log")
        raft.reopen(follower.node_id)
        commands = _assert_identical(raft, 0, acked)
        assert len(commands) == len(acked)
        acked += propose_stream(raft, 0, 10, b"c")
        _assert_identical(raft, 0, acked)
    finally:
        raft.close()


def test_kill_all_and_restart_keeps_every_acknowledged_command(raft3: RaftCluster) -> None:
    raft3.open_groups([0, 1])
    acked0 = propose_stream(raft3, 0, 40, b"x")
    acked1 = propose_stream(raft3, 1, 40, b"y")
    for node in list(raft3.nodes.values()):
        node.kill()
    for node_id in list(raft3.nodes):
        raft3.reopen(node_id)
    _assert_identical(raft3, 0, acked0)
    _assert_identical(raft3, 1, acked1)
    acked0 += propose_stream(raft3, 0, 5, b"z")
    _assert_identical(raft3, 0, acked0)


def test_kill_all_during_log_compaction_loses_nothing(tmp_path: object) -> None:
    raft = RaftCluster(str(tmp_path), 3, {"log_compaction_min_entries": 1000, "snapshot_delay_s": 1.5})
    try:
        raft.start()
        raft.open_groups([0])
        acked = propose_stream(raft, 0, 60, b"c")
        for node in raft.live():
            node.rpc("compact", 0)
        leader = raft.leader(0)
        wait_until(lambda: leader.rpc("serializing", 0), what="a snapshot in progress on the leader")
        for node in list(raft.nodes.values()):
            node.kill()
        for node_id in list(raft.nodes):
            raft.reopen(node_id)
        _assert_identical(raft, 0, acked)
        acked += propose_stream(raft, 0, 10, b"d")
        _assert_identical(raft, 0, acked)
    finally:
        raft.close()


def test_follower_refuses_proposals_with_a_leader_hint(raft3: RaftCluster) -> None:
    raft3.open_groups([0])
    leader = raft3.leader(0)
    follower = next(n for n in raft3.live() if n is not leader)
    wait_until(lambda: follower.rpc("status", 0).leader == leader.node_id, what="the follower knowing the leader")
    with pytest.raises(NotLeaderError) as info:
        follower.rpc("propose", 0, b"nope", 5.0)
    assert info.value.leader == leader.node_id
    status = leader.rpc("status", 0)
    assert status.is_leader and len(status.followers) == 2
    assert all(f.connected for f in status.followers)


def test_leaders_are_balanced_across_nodes(tmp_path: object) -> None:
    raft = RaftCluster(str(tmp_path), 3, {"balance_leaders": True, "balance_interval_s": 0.5})
    try:
        raft.start()
        raft.open_groups(range(6))

        def split() -> list[int] | None:
            counts = sorted(len(n.rpc("leaders")) for n in raft.live())
            return counts if counts == [2, 2, 2] else None

        wait_until(split, timeout_s=30, interval_s=0.2, what="two leaders per node")
    finally:
        raft.close()


def test_a_slow_snapshot_restore_does_not_stall_other_groups(tmp_path: object) -> None:
    raft = RaftCluster(str(tmp_path), 3, {"log_compaction_min_entries": 20})
    try:
        raft.start()
        raft.open_groups([0, 1])
        leader = raft.leader(0)
        follower = next(n for n in raft.live() if n is not leader)
        follower.kill()
        acked = propose_stream(raft, 0, 60, b"r")
        wait_until(lambda: leader.rpc("log_entries", 0) < 40, what="a compacted leader log")
        follower.config["restore_delay_s"] = 3.0  # longer than the election timeout
        raft.reopen(follower.node_id)
        worst_s, end = 0.0, time.monotonic() + 4.0
        while time.monotonic() < end:  # the driver keeps answering while partition 0 restores
            start = time.monotonic()
            follower.rpc("status", 1)
            worst_s = max(worst_s, time.monotonic() - start)
            time.sleep(0.05)
        print(f"slowest status call on the restoring node: {worst_s * 1000:.0f} ms")
        assert worst_s < 0.5
        _assert_identical(raft, 0, acked)
    finally:
        raft.close()
