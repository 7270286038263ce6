"""Replicated partitions (replicas=3): identical replicas, leader loss, whole-cluster restart.

Real node processes on 127.0.0.1; every fixture stops its cluster. Each test starts its
own cluster because the tests kill nodes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from kvclient import Client, KvError
from kvclient._codec import pack_ids
from kvclient._proto import kvstore_pb2 as pb
from kvclient._proto import kvstore_pb2_grpc as pb_grpc
from kvclient._ring import partitions_of
from kvstore.launcher import LocalCluster
from tests.cluster.replicated import PATIENT, partition_leaders, read_direct
from tests.conftest import wait_until

TABLE = "replicated"
DIM = 4
KEYS = 256
PARTITIONS = 8


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    cluster = LocalCluster.open(str(tmp_path / "c"))
    try:
        cluster.up(3, partitions=PARTITIONS, replicas=3, cache_bytes="16MiB")
        yield cluster
    finally:
        cluster.down()


def _replica_views(
    kv: Client, cluster: LocalCluster, ids: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For each running node: the ids it holds a replica of, and (found, rows) read directly from it."""
    parts = partitions_of(TABLE, ids, kv.view.partitions)
    out = {}
    for node in cluster.running():
        mine = np.array([node.node_id in kv.view.proto.placement[p].node_ids for p in parts])
        found, rows = read_direct(cluster, node.node_id, TABLE, ids[mine], DIM)
        out[node.node_id] = (ids[mine], found, rows)
    return out


def _all_replicas_equal(kv: Client, cluster: LocalCluster, ids: np.ndarray, expected: np.ndarray) -> bool:
    """Every running replica of every id holds exactly `expected[id]`."""
    for held, found, rows in _replica_views(kv, cluster, ids).values():
        if not found.all() or not np.array_equal(rows, expected[held.astype(np.intp)]):
            return False
    return True


def _client_sees(kv: Client, ids: np.ndarray, expected: np.ndarray, deleted: int) -> bool:
    """The client reads `expected` for every id but the first `deleted`, which are absent."""
    res = kv.get(TABLE, ids)
    return (
        not res.found[:deleted].any()
        and bool(res.found[deleted:].all())
        and np.array_equal(res.values[deleted:], expected[deleted:])
    )


def test_every_replica_returns_the_written_data(cluster: LocalCluster) -> None:
    with Client(cluster.seeds, deadline_s=10.0, retry=PATIENT) as kv:
        kv.create_table(TABLE, dim=DIM)
        ids = np.arange(KEYS, dtype=np.uint64)
        vectors = np.random.default_rng(1).standard_normal((KEYS, DIM)).astype(np.float32)
        assert kv.put(TABLE, ids, vectors) == KEYS
        assert kv.delete(TABLE, ids[:8]) == 8
        # Reads go to any replica, and a follower applies a commit a moment after the leader.
        wait_until(lambda: _client_sees(kv, ids, vectors, deleted=8), what="the client to read its writes")
        # Every node holds every partition (3 nodes, 3 replicas); each one converges to the same rows.
        wait_until(
            lambda: _all_replicas_equal(kv, cluster, ids[8:], vectors),
            timeout_s=10.0,
            what="every replica to hold the written rows",
        )
        for _, found, _ in _replica_views(kv, cluster, ids[:8]).values():
            assert not found.any()
        # Every partition has exactly one leader among the nodes.
        wait_until(lambda: len(partition_leaders(cluster)) == PARTITIONS, what="a leader for every partition")
        assert set(partition_leaders(cluster).values()) <= {"n1", "n2", "n3"}
        # Bad input is refused before anything is proposed, by leaders and followers alike.
        for node in cluster.nodes:
            bad = pb.PutRequest(table=TABLE, ids=pack_ids(ids[:2]), values=b"\0" * 5, dtype=pb.FLOAT32)
            with grpc.insecure_channel(node.address) as channel, pytest.raises(grpc.RpcError) as info:
                pb_grpc.DataStub(channel).MultiPut(bad, timeout=5.0)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _all_replicas_equal(kv, cluster, ids[8:], vectors)
        # A batch larger than one Raft entry per partition is split into several commands.
        kv.create_table("wide", dim=256)
        big = np.random.default_rng(3).standard_normal((4000, 256)).astype(np.float32)
        assert kv.put("wide", np.arange(4000), big) == 4000
        wait_until(lambda: np.array_equal(kv.get("wide", np.arange(4000)).values, big), what="the wide batch")


class _Writer(threading.Thread):
    """Writes version v (all keys = v) in a loop; records what was acknowledged and when."""

    def __init__(self, seeds: list[str]) -> None:
        super().__init__(daemon=True)
        self.seeds = seeds
        self.stop = threading.Event()
        self.acked: list[tuple[int, float]] = []  # (version, monotonic time of the ack)
        self.attempted = 0
        self.errors: list[str] = []

    def run(self) -> None:
        ids = np.arange(KEYS, dtype=np.uint64)
        with Client(self.seeds, deadline_s=10.0) as kv:  # default retry policy
            version = 0
            while not self.stop.is_set():
                version += 1
                self.attempted = version
                try:
                    kv.put(TABLE, ids, np.full((KEYS, DIM), version, dtype=np.float32))
                except KvError as err:
                    self.errors.append(f"{time.monotonic():.3f} {err!r}")
                    continue
                self.acked.append((version, time.monotonic()))


class _Reader(threading.Thread):
    """Reads every key in a loop; records failures (there must be none while a replica lives)."""

    def __init__(self, seeds: list[str]) -> None:
        super().__init__(daemon=True)
        self.seeds = seeds
        self.stop = threading.Event()
        self.reads = 0
        self.errors: list[str] = []

    def run(self) -> None:
        ids = np.arange(KEYS, dtype=np.uint64)
        with Client(self.seeds, deadline_s=5.0) as kv:
            while not self.stop.is_set():
                try:
                    res = kv.get(TABLE, ids)
                    assert res.found.all()
                    self.reads += 1
                except (KvError, AssertionError) as err:
                    self.errors.append(f"{time.monotonic():.3f} {err!r}")


def _versions(kv: Client, cluster: LocalCluster, node_ids: list[str]) -> dict[str, np.ndarray]:
    ids = np.arange(KEYS, dtype=np.uint64)
    out = {}
    for node_id in node_ids:
        found, rows = read_direct(cluster, node_id, TABLE, ids, DIM)
        out[node_id] = np.where(found, rows[:, 0], -1.0)
    return out


def test_leader_kill_during_writes_loses_nothing_acknowledged(cluster: LocalCluster) -> None:
    with Client(cluster.seeds, deadline_s=10.0, retry=PATIENT) as kv:
        kv.create_table(TABLE, dim=DIM)
        zeros = np.zeros((KEYS, DIM), dtype=np.float32)
        kv.put(TABLE, np.arange(KEYS), zeros)
        wait_until(lambda: _all_replicas_equal(kv, cluster, np.arange(KEYS, dtype=np.uint64), zeros), what="replicas")
        writer, reader = _Writer(cluster.seeds), _Reader(cluster.seeds)
        writer.start()
        reader.start()
        try:
            wait_until(lambda: len(writer.acked) >= 20 and reader.reads >= 20, what="writes and reads to flow")
            victim: str = wait_until(lambda: partition_leaders(cluster).get(0, ""), what="a leader for partition 0")
            killed_at = time.monotonic()
            cluster.kill(victim, signal.SIGKILL)
            wait_until(lambda: victim not in [n.node_id for n in cluster.running()], what="the leader to die")
            acked_before = len([a for a in writer.acked if a[1] < killed_at])
            wait_until(
                lambda: len([a for a in writer.acked if a[1] > killed_at]) >= 20,
                timeout_s=20.0,
                what="writes to resume after the leader died",
            )
            reads_after_kill = reader.reads
            wait_until(lambda: reader.reads >= reads_after_kill + 10, what="reads to continue")
        finally:
            writer.stop.set()
            reader.stop.set()
            writer.join(30)
            reader.join(30)
        after = [t for _, t in writer.acked if t > killed_at]
        gaps = np.diff([killed_at, *after])
        failover_s = float(gaps.max())
        first_s = after[0] - killed_at
        print(f"failover: first ack {first_s:.2f} s after kill -9 of {victim}; longest gap {failover_s:.2f} s")
        print(f"writer errors: {writer.errors}")
        assert failover_s < 10.0  # one election (1-2 s timeouts) plus client backoff, with slack
        assert acked_before >= 1
        assert reader.errors == [], reader.errors[:3]
        last_acked = writer.acked[-1][0]
        # Restart the killed node: it catches up and ends with the same data as the others.
        cluster.start_node(victim, cache_bytes="16MiB")
        cluster.wait_ready(victim)
        names = [n.node_id for n in cluster.nodes]

        def converged() -> bool:
            seen = _versions(kv, cluster, names)
            first = seen[names[0]]
            return all(np.array_equal(v, first) for v in seen.values()) and bool((first == first[0]).all())

        wait_until(converged, timeout_s=30.0, what="the restarted node to catch up")
        final = _versions(kv, cluster, names)[names[0]]
        # Every key holds the last acknowledged version or a later attempted one (a write that
        # timed out on the client may still have committed): nothing acknowledged is lost.
        assert last_acked <= final[0] <= writer.attempted
        res = kv.get(TABLE, np.arange(KEYS))
        assert res.found.all() and (res.values == final[0]).all()


def test_kill_all_nodes_and_restart_keeps_acknowledged_data(cluster: LocalCluster) -> None:
    ids = np.arange(KEYS, dtype=np.uint64)
    vectors = np.random.default_rng(2).standard_normal((KEYS, DIM)).astype(np.float32)
    with Client(cluster.seeds, deadline_s=10.0, retry=PATIENT) as kv:
        kv.create_table(TABLE, dim=DIM)
        kv.put(TABLE, ids, vectors)
        kv.put(TABLE, ids[: KEYS // 2], vectors[: KEYS // 2] * 2)
        kv.delete(TABLE, ids[-4:])
    expected = vectors.copy()
    expected[: KEYS // 2] *= 2
    for node in cluster.nodes:
        cluster.kill(node.node_id, signal.SIGKILL)
    wait_until(lambda: not cluster.running(), what="every node to die")
    for node in cluster.nodes:
        cluster.start_node(node.node_id, cache_bytes="16MiB")
    for node in cluster.nodes:
        cluster.wait_ready(node.node_id)
    with Client(cluster.seeds, deadline_s=10.0, retry=PATIENT) as kv:
        # A restarted follower learns the commit index from its leader's next heartbeat.
        wait_until(lambda: _client_sees(kv, ids[::-1], expected[::-1], deleted=4), what="the data to be back")
        wait_until(
            lambda: _all_replicas_equal(kv, cluster, ids[:-4], expected),
            timeout_s=15.0,
            what="every replica to hold the data after restart",
        )
        # And the groups accept writes again.
        assert kv.put(TABLE, ids[:4], vectors[:4]) == 4


def test_cli_status_shows_leaders_and_lag(cluster: LocalCluster) -> None:
    from tests.cluster.test_cli import kvstore

    with Client(cluster.seeds, deadline_s=10.0, retry=PATIENT) as kv:
        kv.create_table(TABLE, dim=DIM)
        kv.put(TABLE, np.arange(KEYS), np.ones((KEYS, DIM), dtype=np.float32))
    wait_until(lambda: len(partition_leaders(cluster)) == PARTITIONS, what="a leader for every partition")
    doc = json.loads(kvstore("status", "--json", "--dir", cluster.root).stdout)
    parts = doc["partition_status"]
    assert len(parts) == PARTITIONS
    assert all(p["leader"] in p["replicas"] and len(p["replicas"]) == 3 for p in parts)
    assert sum(n["leads"] for n in doc["nodes"]) == PARTITIONS
    assert all("max_lag" in n for n in doc["nodes"])
    meta = doc["metadata_group"]
    assert meta["members"] == ["n1", "n2", "n3"] and meta["leader"] in meta["members"]
    assert [n["node_id"] for n in doc["nodes"] if n["meta"]] == meta["members"]
    human = kvstore("status", "--partitions", "--dir", cluster.root).stdout
    assert "max lag" in human and "every partition has a leader" in human and "applied (lag)" in human
    assert re.search(r"metadata group: members n1,n2,n3  leader n[123]", human)  # the leader may move meanwhile
    # The secret is in a private file, never on a command line.
    secret = os.path.join(cluster.root, "raft.secret")
    assert os.stat(secret).st_mode & 0o077 == 0
    with open(secret) as f:
        token = f.read().strip()
    for node in cluster.running():
        with open(f"/proc/{node.pid}/cmdline", "rb") as f:
            assert token.encode() not in f.read()
