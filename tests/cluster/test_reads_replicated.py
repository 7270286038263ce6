"""Reads on replicated partitions (replicas=3): leader reads, hedging around a stopped replica,
failover after a leader dies, and a cut-off leader refusing leader reads.

Real node processes on 127.0.0.1. SIGSTOP/SIGCONT go only to our own node processes (by
pid, through `LocalCluster.kill`), and every stopped node is resumed in a `finally`.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from kvclient import AsyncClient, Client, ClientError, ClientStats, NotLeaderError
from kvclient._codec import pack_ids
from kvclient._connection import ERROR_METADATA_KEY
from kvclient._errors import error_from_proto
from kvclient._proto import kvstore_pb2 as pb
from kvclient._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.launcher import LocalCluster
from tests.cluster.replicated import PATIENT, ids_of_partition, partition_leaders
from tests.cluster.test_replication import DIM, KEYS, PARTITIONS, TABLE, _all_replicas_equal
from tests.conftest import wait_until


def _up(root: Path) -> LocalCluster:
    cluster = LocalCluster.open(str(root))
    cluster.up(3, partitions=PARTITIONS, replicas=3, cache_bytes="16MiB")
    return cluster


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """One replicated cluster for the tests that leave every node running at their end."""
    cluster = LocalCluster.open(str(tmp_path_factory.mktemp("reads")))
    try:
        cluster.up(3, partitions=PARTITIONS, replicas=3, cache_bytes="16MiB")
        with Client(cluster.seeds, deadline_s=10.0, retry=PATIENT) as kv:
            kv.create_table(TABLE, dim=DIM)
        yield cluster
    finally:
        cluster.down()


@pytest.fixture
def cluster(shared: LocalCluster) -> LocalCluster:
    wait_until(lambda: len(partition_leaders(shared)) == PARTITIONS, what="a leader for every partition")
    return shared


def _leader_read(address: str, ids: np.ndarray) -> pb.GetResponse | NotLeaderError:
    """Unary leader read to one node: its answer, or the NOT_LEADER error it sent."""
    req = pb.GetRequest(table=TABLE, ids=pack_ids(ids), consistency=pb.LEADER)
    with grpc.insecure_channel(address) as channel:
        try:
            resp: pb.GetResponse = pb_grpc.DataStub(channel).MultiGet(req, timeout=5.0)
            return resp
        except grpc.RpcError as err:
            for key, value in err.trailing_metadata() or ():
                if key == ERROR_METADATA_KEY:
                    refused = error_from_proto(pb.Error.FromString(value))
                    if isinstance(refused, NotLeaderError):
                        return refused
            raise


def test_leader_reads_see_every_acknowledged_write(cluster: LocalCluster) -> None:
    ids = np.arange(KEYS, dtype=np.uint64)
    with Client(cluster.seeds, deadline_s=10.0, retry=PATIENT) as kv:
        # A fresh client assumes replica 0 leads; where it does not, NOT_LEADER hints correct it.
        leaders = partition_leaders(cluster)
        misplaced = [p for p, n in leaders.items() if kv.view.proto.placement[p].node_ids[0] != n]
        kv.put(TABLE, ids, np.zeros((KEYS, DIM), dtype=np.float32))
        for version in range(1, 101):
            kv.put(TABLE, ids, np.full((KEYS, DIM), version, dtype=np.float32))
            res = kv.get(TABLE, ids, consistency="leader")
            assert res.found.all(), f"round {version}"
            seen = np.unique(res.values).tolist()
            assert seen == [version], f"round {version}: leader read saw {seen}"
        print(f"misplaced leaders {misplaced}; stats {kv.stats}")
        if misplaced:
            assert kv.stats.leader_chases > 0
        kv.create_table("feats", kind="features", if_not_exists=True)
        for version in range(1, 21):
            kv.put_features("feats", ids[:50], [{"v": version}] * 50)
            got = kv.get_features("feats", ids[:50], consistency="leader")
            assert got.records == [{"v": version}] * 50
        calls = kv.stats.calls
        for bad in ("strong", "LEADER", None, 1):
            with pytest.raises(ClientError) as info:
                kv.get(TABLE, ids, consistency=bad)  # type: ignore[arg-type]
            assert info.value.field == "consistency"
        with pytest.raises(ClientError):
            kv.get_features("feats", ids, consistency="replica")
        assert kv.stats.calls == calls  # refused before anything was sent


def test_followers_refuse_leader_reads_naming_the_leader(cluster: LocalCluster) -> None:
    leaders = partition_leaders(cluster)
    ids = ids_of_partition(TABLE, KEYS, PARTITIONS, 0)
    for node in cluster.nodes:
        answer = _leader_read(node.address, ids)
        if node.node_id == leaders[0]:
            assert isinstance(answer, pb.GetResponse) and len(answer.found) == len(ids)
        else:
            assert isinstance(answer, NotLeaderError)
            assert answer.leaders.get(0) in (leaders[0], "")  # "" only mid-election


def test_reads_hedge_around_a_stopped_replica(cluster: LocalCluster) -> None:
    ids = np.arange(KEYS, dtype=np.uint64)
    vectors = np.random.default_rng(7).standard_normal((KEYS, DIM)).astype(np.float32)
    with Client(cluster.seeds, deadline_s=10.0, retry=PATIENT) as kv:
        kv.put(TABLE, ids, vectors)
        wait_until(lambda: _all_replicas_equal(kv, cluster, ids, vectors), what="every replica to hold the rows")
        for _ in range(5):  # open a stream to every node before one stops
            kv.get(TABLE, ids)
        first = kv.view.proto.placement[0].node_ids[0]  # the first choice for partition 0's keys
        victim = next(n for n in cluster.nodes if n.node_id == first)
        before = (kv.stats.hedges, kv.stats.hedges_won)
        cluster.kill(victim.node_id, signal.SIGSTOP)
        try:
            start = time.monotonic()
            for round_ in range(60):
                res = kv.get(TABLE, ids)
                assert res.found.all() and np.array_equal(res.values, vectors), f"round {round_}"
            took_s = time.monotonic() - start
        finally:
            cluster.kill(victim.node_id, signal.SIGCONT)
        print(f"60 reads with {victim.node_id} stopped: {took_s:.2f} s; stats {kv.stats}")
        assert kv.stats.hedges > before[0]
        assert kv.stats.hedges_won > before[1]
        assert took_s < 30.0  # without hedging, each read touching the stopped node waits 10 s
        assert kv.stats.failed_calls == 0


def test_a_cut_off_leader_stops_serving_leader_reads(cluster: LocalCluster) -> None:
    ids = np.arange(KEYS, dtype=np.uint64)
    with Client(cluster.seeds, deadline_s=10.0, retry=PATIENT) as kv:
        kv.put(TABLE, ids, np.ones((KEYS, DIM), dtype=np.float32))
    leader_id = partition_leaders(cluster)[0]
    leader = next(n for n in cluster.nodes if n.node_id == leader_id)
    others = [n for n in cluster.nodes if n is not leader]
    mine = ids_of_partition(TABLE, KEYS, PARTITIONS, 0)
    assert isinstance(_leader_read(leader.address, mine), pb.GetResponse)
    for node in others:  # the leader is now cut off from both peers
        cluster.kill(node.node_id, signal.SIGSTOP)
    try:
        start = time.monotonic()
        refused = wait_until(
            lambda: isinstance(_leader_read(leader.address, mine), NotLeaderError),
            timeout_s=10.0,
            interval_s=0.1,
            what="the cut-off leader to refuse leader reads",
        )
        stepped_down_s = time.monotonic() - start
        # Reads from any replica never wait for Raft: the cut-off node still serves them.
        with grpc.insecure_channel(leader.address) as channel:
            plain = pb_grpc.DataStub(channel).MultiGet(pb.GetRequest(table=TABLE, ids=pack_ids(mine)), timeout=5.0)
        assert np.frombuffer(plain.found, dtype=np.bool_).all()
    finally:
        for node in others:
            cluster.kill(node.node_id, signal.SIGCONT)
    print(f"cut-off leader {leader_id} refused leader reads after {stepped_down_s:.2f} s")
    assert refused
    # The read lease (0.8 s), not PySyncObj's 2 s step-down, ended it (slack for a slow machine).
    assert stepped_down_s < 1.8, stepped_down_s
    with Client(cluster.seeds, deadline_s=10.0, retry=PATIENT) as kv:
        res = wait_until(lambda: kv.get(TABLE, ids, consistency="leader"), what="leader reads to work again")
        assert res.found.all() and (res.values == 1).all()


def test_leader_reads_follow_leadership_after_the_leader_dies(tmp_path: Path) -> None:
    cluster = _up(tmp_path / "c")
    try:
        ids = np.arange(KEYS, dtype=np.uint64)
        with Client(cluster.seeds, deadline_s=10.0, retry=PATIENT) as kv:
            kv.create_table(TABLE, dim=DIM)
            kv.put(TABLE, ids, np.ones((KEYS, DIM), dtype=np.float32))
            assert (kv.get(TABLE, ids, consistency="leader").values == 1).all()  # leaders now cached
            wait_until(lambda: len(partition_leaders(cluster)) == PARTITIONS, what="a leader for every partition")
            leaders = partition_leaders(cluster)
            # A leader that is also some partition's first replica: fresh clients read from it first.
            first = {reps.node_ids[0] for reps in kv.view.proto.placement}
            victim = next(n for n in leaders.values() if n in first)
            cluster.kill(victim, signal.SIGKILL)
            wait_until(lambda: victim not in [n.node_id for n in cluster.running()], what="the leader to die")
            chases = kv.stats.leader_chases
            res = kv.get(TABLE, ids, consistency="leader")
            assert res.found.all() and (res.values == 1).all()
            assert kv.stats.leader_chases > chases  # a live replica named the new leader
            kv.put(TABLE, ids, np.full((KEYS, DIM), 2, dtype=np.float32))
            assert (kv.get(TABLE, ids, consistency="leader").values == 2).all()
            twos = np.full((KEYS, DIM), 2, dtype=np.float32)  # followers apply a commit a round later
            wait_until(lambda: _all_replicas_equal(kv, cluster, ids, twos), what="the live replicas to hold the rows")
            print(f"after killing {victim}: stats {kv.stats}")
        with Client(cluster.seeds, deadline_s=10.0, retry=PATIENT, hedge_after_ms=None) as fresh:
            # Its first choice for some partitions is the dead node: those reads fail over at once
            # (hedging off, so that a slow connection attempt is not hedged before it fails).
            res = fresh.get(TABLE, ids)
            assert res.found.all() and (res.values == 2).all()
            assert fresh.stats.read_failovers > 0 and fresh.stats.unavailable_retries == 0
            print(f"fresh client: stats {fresh.stats}")
    finally:
        cluster.down()


def test_cancelled_reads_leave_the_shared_stream_working(cluster: LocalCluster) -> None:
    """Hedging cancels losing requests; cancelling one must not fail the others on its stream."""
    ids = np.arange(KEYS, dtype=np.uint64)

    async def scenario() -> tuple[int, ClientStats]:
        async with AsyncClient(cluster.seeds, deadline_s=10.0, retry=PATIENT, hedge_after_ms=None) as kv:
            await kv.put(TABLE, ids, np.full((KEYS, DIM), 3, dtype=np.float32))
            for _ in range(200):  # followers apply the put a moment after the leader
                if all([((await kv.get(TABLE, ids)).values == 3).all() for _ in range(3)]):
                    break
                await asyncio.sleep(0.05)
            cancelled = 0
            for round_ in range(40):
                tasks = [asyncio.ensure_future(kv.get(TABLE, ids[i::4])) for i in range(4)]
                for _ in range(round_ % 4):  # cancel at different points of the send
                    await asyncio.sleep(0)
                tasks[0].cancel()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                cancelled += isinstance(results[0], asyncio.CancelledError)
                for res in results[1:]:
                    assert not isinstance(res, BaseException), res
                    assert res.found.all() and (res.values == 3).all()
            return cancelled, kv.stats

    cancelled, stats = asyncio.run(scenario())
    print(f"cancelled {cancelled} of 40; stats {stats}")
    assert cancelled > 0
    assert stats.unavailable_retries == 0 and stats.failed_calls == 0
