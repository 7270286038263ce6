"""Network faults through the mux's test filter: an isolated leader steps down within ~2 s."""

from __future__ import annotations

import time

import pytest

from tests.conftest import wait_until
from tests.replication.harness import RaftCluster, propose_stream

pytestmark = pytest.mark.cluster


def test_isolated_leader_stops_claiming_leadership(raft3: RaftCluster) -> None:
    raft3.open_groups([0])
    acked = propose_stream(raft3, 0, 10, b"i")
    old = raft3.leader(0)
    others = [n for n in raft3.nodes.values() if n is not old]
    old.rpc("block", [n.node_id for n in others])
    for node in others:
        node.rpc("block", [old.node_id])
    start = time.monotonic()
    wait_until(lambda: not old.rpc("is_leader", 0), timeout_s=5, what="the isolated leader stepping down")
    stepped_down_s = time.monotonic() - start
    print(f"isolated leader stepped down after {stepped_down_s:.2f} s")
    assert stepped_down_s < 3.0
    new = wait_until(lambda: next((n for n in others if n.rpc("is_leader", 0)), None), what="a majority leader")
    assert new is not None
    acked += [c for c in [b"majority-1", b"majority-2"] if new.rpc("propose", 0, c, 5.0)]
    assert not old.rpc("is_leader", 0)

    old.rpc("block", [])
    for node in others:
        node.rpc("block", [])
    top = new.rpc("applied", 0)
    wait_until(lambda: old.rpc("applied", 0) >= top, what="the old leader catching up")
    assert old.rpc("entries", 0) == new.rpc("entries", 0)
