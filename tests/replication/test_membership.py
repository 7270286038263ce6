"""Membership primitives: add a replica, wait for catch-up, transfer leadership, remove a replica."""

from __future__ import annotations

import pytest

from kvstore.replication import MembershipChangeError
from tests.conftest import wait_until
from tests.replication.harness import RaftCluster, propose_stream

pytestmark = pytest.mark.cluster


def test_add_catch_up_transfer_remove(tmp_path: object) -> None:
    raft = RaftCluster(str(tmp_path), 3, {"log_compaction_min_entries": 20})
    try:
        raft.start()
        raft.open_groups([0])
        acked = propose_stream(raft, 0, 60, b"m")
        leader = raft.leader(0)
        wait_until(lambda: leader.rpc("snapshot_exists", 0), what="a compacted leader log")

        new = raft.add_node("n3")
        members = {**raft.members[0], "n3": new.address}
        new.rpc("add_group", 0, members)
        leader.rpc("add_member", 0, "n3", new.address)
        raft.members[0] = members
        leader.rpc("wait_caught_up", 0, "n3")
        assert [c for _, c in new.rpc("entries", 0)][-len(acked) :] == acked

        assert leader.rpc("transfer", 0, "n3") == "n3"
        wait_until(lambda: new.rpc("is_leader", 0), what="n3 leading partition 0")
        acked += propose_stream(raft, 0, 10, b"after-transfer")

        with pytest.raises(MembershipChangeError):
            new.rpc("remove_member", 0, "n3")  # a leader cannot remove itself
        new.rpc("remove_member", 0, leader.node_id)
        status = new.rpc("status", 0)
        assert leader.node_id not in status.members and "n3" in status.members
        leader.rpc("remove_group", 0)
        del raft.members[0][leader.node_id]
        acked += propose_stream(raft, 0, 10, b"after-remove")
        live = [n for n in raft.live() if n.node_id in raft.members[0]]
        top = max(n.rpc("applied", 0) for n in live)
        raft.wait_applied_everywhere(0, top)
        views = [n.rpc("entries", 0) for n in live]
        assert all(v == views[0] for v in views)
        assert set(acked) <= {c for _, c in views[0]}
    finally:
        raft.close()
