"""Cluster metadata in its own Raft group: map changes survive node loss and whole-cluster restarts.

Real node processes on 127.0.0.1 (4 nodes, replicas=3: n1..n3 are the metadata members, n4
is not); every test starts its own cluster because the tests kill nodes, and stops it.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from kvclient import Client, ClientError, UnavailableError
from kvclient._proto import kvstore_pb2 as pb
from kvclient._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.launcher import LocalCluster
from kvstore.meta_group import META_GROUP
from tests.cluster.replicated import PATIENT
from tests.conftest import wait_until

DIM = 4


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    cluster = LocalCluster.open(str(tmp_path / "c"))
    try:
        cluster.up(4, partitions=8, replicas=3, cache_bytes="16MiB")
        yield cluster
    finally:
        cluster.down()


def _admin(cluster: LocalCluster, node_id: str) -> tuple[grpc.Channel, pb_grpc.AdminStub]:
    address = next(n.address for n in cluster.nodes if n.node_id == node_id)
    channel = grpc.insecure_channel(address)
    return channel, pb_grpc.AdminStub(channel)


def _map_of(cluster: LocalCluster, node_id: str) -> pb.ClusterMap:
    channel, admin = _admin(cluster, node_id)
    with channel:
        return admin.GetClusterMap(pb.GetClusterMapRequest(), timeout=2.0)


def _tables(cluster: LocalCluster, node_id: str) -> set[str]:
    return {t.name for t in _map_of(cluster, node_id).tables}


def _meta_leader(cluster: LocalCluster) -> str | None:
    for node in cluster.running():
        channel, admin = _admin(cluster, node.node_id)
        try:
            with channel:
                groups = admin.GetPartitionStatus(pb.PartitionStatusRequest(), timeout=2.0).groups
        except grpc.RpcError:
            continue
        if any(g.partition == META_GROUP and g.is_leader for g in groups):
            return node.node_id
    return None


def _create(cluster: LocalCluster, via: str, name: str, timeout_s: float = 20.0) -> pb.ClusterMap:
    """CreateTable sent to one node directly (no client fallback): that node must get it committed."""
    channel, admin = _admin(cluster, via)
    schema = pb.TableSchema(name=name, kind=pb.EMBEDDING, dim=DIM, dtype=pb.FLOAT32)
    with channel:
        return admin.CreateTable(pb.CreateTableRequest(schema=schema), timeout=timeout_s)


def test_members_and_forwarding(cluster: LocalCluster) -> None:
    cmap = _map_of(cluster, "n4")
    assert list(cmap.meta_node_ids) == ["n1", "n2", "n3"]
    wait_until(lambda: _meta_leader(cluster) is not None, what="a metadata leader")
    leader = _meta_leader(cluster)
    follower = next(n for n in ("n1", "n2", "n3") if n != leader)
    # A change sent to a follower member and to a non-member is forwarded to the leader.
    by_follower = _create(cluster, follower, "from_follower")
    by_outsider = _create(cluster, "n4", "from_outsider")
    assert by_outsider.epoch > by_follower.epoch
    wait_until(
        lambda: all({"from_follower", "from_outsider"} <= _tables(cluster, n) for n in ("n1", "n2", "n3", "n4")),
        what="every node's map to hold both tables",
    )
    # Concurrent changes through different nodes all land, each in its own epoch, with unique table ids.
    names = [f"t{i}" for i in range(8)]
    vias = ["n1", "n2", "n3", "n4"]
    with ThreadPoolExecutor(4) as pool:
        maps = list(pool.map(lambda i: _create(cluster, vias[i % 4], names[i]), range(len(names))))
    assert len({m.epoch for m in maps}) == len(names)
    final = _map_of(cluster, leader or "n1")
    assert set(names) <= {t.name for t in final.tables}
    ids = [t.table_id for t in final.tables]
    assert len(ids) == len(set(ids))
    # A map too large for one Raft entry (448 KiB) is refused as the caller's error, and changes nothing.
    with Client(cluster.seeds, deadline_s=10.0, retry=PATIENT) as kv:
        with pytest.raises(ClientError, match="more than one metadata entry holds") as info:
            for i in range(10):  # 64 KiB of default vector each
                kv.create_table(f"wide{i}", dim=16384, default=np.full(16384, 0.5, dtype=np.float32))
        assert info.value.field == "table"
        created = {t.name for t in kv.list_tables()}
        epoch = kv.refresh_map().epoch
    assert f"wide{i}" not in created and "wide0" in created
    assert _map_of(cluster, "n4").epoch == epoch


def test_a_table_survives_the_loss_of_the_metadata_leader(cluster: LocalCluster) -> None:
    wait_until(lambda: _meta_leader(cluster) is not None, what="a metadata leader")
    leader = _meta_leader(cluster)
    assert leader is not None
    _create(cluster, "n4", "before")
    cluster.kill(leader)
    # A new metadata leader is elected among the two members left; the change commits there.
    after = _create(cluster, "n4", "after")
    assert {"before", "after"} <= {t.name for t in after.tables}
    survivors = [n for n in ("n1", "n2", "n3", "n4") if n != leader]
    seeds = [n.address for n in cluster.nodes if n.node_id in survivors]
    with Client(seeds, deadline_s=10.0, retry=PATIENT) as kv:
        kv.put("after", np.arange(32), np.ones((32, DIM), dtype=np.float32))
        # Read-your-writes needs the leader: a follower may apply the commit a round later.
        assert kv.get("after", np.arange(32), consistency="leader").found.all()
    # The dead leader comes back and catches up with the map it missed.
    cluster.start_node(leader, cache_bytes="16MiB")
    cluster.wait_ready(leader)
    wait_until(lambda: "after" in _tables(cluster, leader), timeout_s=20.0, what=f"{leader} to learn the new table")


def test_map_changes_survive_killing_every_node(cluster: LocalCluster) -> None:
    with Client(cluster.seeds, deadline_s=10.0, retry=PATIENT) as kv:
        kv.create_table("kept", dim=DIM)
        kv.create_table("dropped", dim=DIM)
        kv.drop_table("dropped")
        kv.put("kept", np.arange(64), np.full((64, DIM), 3.0, dtype=np.float32))
        epoch = kv.refresh_map().epoch
    for node in cluster.nodes:
        cluster.kill(node.node_id)
    wait_until(lambda: not cluster.running(), what="every node to exit")
    for node in cluster.nodes:
        cluster.start_node(node.node_id, cache_bytes="16MiB")
    for node in cluster.nodes:
        cluster.wait_ready(node.node_id)
    for node_id in ("n1", "n2", "n3", "n4"):
        cmap = _map_of(cluster, node_id)
        assert cmap.epoch >= epoch
        assert {t.name for t in cmap.tables} == {"kept"}
    # Metadata still takes changes after the restart.
    assert "again" in {t.name for t in _create(cluster, "n2", "again").tables}
    with Client(cluster.seeds, deadline_s=15.0, retry=PATIENT) as kv:
        res = kv.get("kept", np.arange(64))
        assert res.found.all() and np.all(res.values == 3.0)


def test_without_a_metadata_majority_changes_fail_and_change_nothing(cluster: LocalCluster) -> None:
    wait_until(lambda: _meta_leader(cluster) is not None, what="a metadata leader")
    before = _map_of(cluster, "n4")
    cluster.kill("n1")
    cluster.kill("n2")
    # A change the survivor appended while it still led would have an unknown outcome (it commits
    # when the members come back); once it has stepped down, nothing can be appended.
    wait_until(lambda: _meta_leader(cluster) is None, what="the lone metadata member to step down")
    with pytest.raises(grpc.RpcError) as info:
        _create(cluster, "n4", "nope", timeout_s=30.0)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(UnavailableError), Client([cluster.nodes[3].address], deadline_s=15.0) as kv:
        kv.create_table("nope", dim=DIM)
    # Nothing changed: not on the survivors, and not after the members come back.
    assert _map_of(cluster, "n4").epoch == before.epoch
    assert _map_of(cluster, "n3").epoch == before.epoch
    for node in ("n1", "n2"):
        cluster.start_node(node, cache_bytes="16MiB")
        cluster.wait_ready(node)
    wait_until(lambda: _meta_leader(cluster) is not None, timeout_s=20.0, what="a metadata leader again")
    assert "nope" not in _tables(cluster, "n3")
    assert "later" in {t.name for t in _create(cluster, "n3", "later").tables}
