"""Node loss and restart: clear errors within the deadline, nothing acknowledged lost."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvclient import Client, DeadlineExceededError, KeyStatus, UnavailableError
from kvclient._ring import partitions_of
from kvstore.launcher import ClusterError, LocalCluster
from tests.conftest import wait_until

TABLE = "durable"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A cluster of its own per test: these tests kill nodes."""
    cluster = LocalCluster.open(str(tmp_path / "c"))
    try:
        cluster.up(3, partitions=16, replicas=1, cache_bytes="16MiB")
        yield cluster
    finally:
        cluster.down()


def _load(kv: Client, n: int = 3000) -> np.ndarray:
    kv.create_table(TABLE, dim=8)
    vectors = np.random.default_rng(0).standard_normal((n, 8)).astype(np.float32)
    kv.put(TABLE, np.arange(n), vectors)
    return vectors


def _keys_on(kv: Client, node_id: str, n: int) -> np.ndarray:
    ids = np.arange(n, dtype=np.uint64)
    parts = partitions_of(TABLE, ids, kv.view.partitions)
    return np.array([node_id in kv.view.proto.placement[p].node_ids for p in parts])


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_restarted_node_keeps_its_data_and_clients_reconnect(cluster: LocalCluster, sig: int) -> None:
    with Client(cluster.seeds, deadline_s=10.0) as kv:
        vectors = _load(kv)
        cluster.kill("n2", sig)
        wait_until(
            lambda: not cluster.running() or "n2" not in [n.node_id for n in cluster.running()], what="n2 to stop"
        )
        cluster.start_node("n2", cache_bytes="16MiB")
        cluster.wait_ready("n2")
        res = kv.get(TABLE, np.arange(3000))
        assert res.found.all()
        np.testing.assert_array_equal(res.values, vectors)


def test_whole_cluster_restart_keeps_tables_and_data(cluster: LocalCluster) -> None:
    with Client(cluster.seeds) as kv:
        vectors = _load(kv)
    cluster.down()
    reopened = LocalCluster.open(cluster.root)
    try:
        seeds = reopened.up(3)
        with Client(seeds) as kv:
            assert [t.name for t in kv.list_tables()] == [TABLE]
            np.testing.assert_array_equal(kv.get(TABLE, np.arange(3000)).values, vectors)
    finally:
        reopened.down()


def test_down_node_gives_unavailable_naming_it_within_the_deadline(cluster: LocalCluster) -> None:
    with Client(cluster.seeds) as kv:
        vectors = _load(kv)
        on_n3 = _keys_on(kv, "n3", 3000)
        cluster.kill("n3", signal.SIGKILL)
        wait_until(lambda: "n3" not in [n.node_id for n in cluster.running()], what="n3 to die")
        started = time.monotonic()
        with pytest.raises(UnavailableError, match="n3"):
            kv.get(TABLE, np.arange(3000), deadline_s=1.0)
        assert time.monotonic() - started < 4.0  # the deadline plus generous slack, never a hang
        assert kv.stats.unavailable_retries > 0 and kv.stats.failed_calls == 1
        part = kv.get(TABLE, np.arange(3000), deadline_s=0.5, partial=True)
        assert kv.stats.partial_keys == int(on_n3.sum())
        assert (part.status[on_n3] == KeyStatus.ERROR).all()
        assert part.found[~on_n3].all()
        np.testing.assert_array_equal(part.values[~on_n3], vectors[~on_n3])
        with pytest.raises(UnavailableError, match="n3"):
            kv.put(TABLE, np.arange(3000), vectors, deadline_s=0.5)


def test_a_stopped_node_cannot_hold_a_call_past_its_deadline(cluster: LocalCluster) -> None:
    """A frozen node (SIGSTOP) stops reading: writes to it fill gRPC's flow-control window."""
    wide = np.ones((100_000, 128), dtype=np.float32)  # 51 MB a put, a third of it for n2
    with Client(cluster.seeds) as kv:
        vectors = _load(kv)
        kv.create_table("wide", dim=128)
        on_n2 = _keys_on(kv, "n2", 3000)
        cluster.kill("n2", signal.SIGSTOP)
        try:
            took = []
            for _ in range(3):  # the first put may fit the window; the next ones cannot
                started = time.monotonic()
                with pytest.raises((DeadlineExceededError, UnavailableError)):
                    kv.put("wide", np.arange(len(wide)), wide, deadline_s=1.0)
                took.append(time.monotonic() - started)
            assert max(took) < 8.0, took  # the deadline plus generous slack, never a hang
            # Keys on the other nodes still read at once.
            res = kv.get(TABLE, np.arange(3000)[~on_n2], deadline_s=2.0)
            assert res.found.all()
            np.testing.assert_array_equal(res.values, vectors[~on_n2])
        finally:
            cluster.kill("n2", signal.SIGCONT)


def test_second_cluster_up_on_a_running_folder_is_refused(cluster: LocalCluster) -> None:
    with pytest.raises(ClusterError, match="already running"):
        LocalCluster.open(cluster.root).up(3)
    assert len(cluster.running()) == 3
