"""The pysyncobj internals we patch, each with the problem it fixes; and single-process checks."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from concurrent.futures import Future
from typing import Any

import msgpack
import pysyncobj.pickle
import pytest

from kvstore.replication import NodeId
from kvstore.replication.driver import Driver
from kvstore.replication.mux import Poller
from kvstore.replication.pysyncobj_engine import (
    ConfigError,
    PySyncObjConfig,
    PySyncObjReplicator,
    journal,
    snapshots,
    transport,
)
from tests.conftest import wait_until
from tests.replication.inproc import members_of, replicators, wait_leader
from tests.replication.sm import RecordingStateMachine


def _ok(result: bytes | None) -> bool:
    return result is not None and result.startswith(b"ok:")


def test_pickle_protocol_4_keeps_bytes_compact() -> None:
    payload = os.urandom(26_600)
    assert len(pysyncobj.pickle.dumps((0, (payload,)))) < len(payload) + 64  # protocol 2: ~1.7x


def test_groups_use_the_rocksdb_journal(tmp_path: Any) -> None:
    with replicators(str(tmp_path), 1) as reps:
        rep, _ = reps[0]
        group = rep.add_group(0, members_of(reps))
        assert isinstance(group._raft._SyncObj__raftLog, journal.GroupJournal)
        assert isinstance(group._raft._SyncObj__serializer, snapshots.AsyncSerializer)


def _single_node(data_dir: str, sm_dir: str, **config: Any) -> tuple[PySyncObjReplicator, RecordingStateMachine]:
    sm = RecordingStateMachine(sm_dir)
    rep = PySyncObjReplicator(NodeId("n0"), PySyncObjConfig(data_dir=data_dir, balance_leaders=False, **config), sm)
    rep.start()
    return rep, sm


def _crash_after_snapshot_before_compaction(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[str, int, int]:
    """Leave a snapshot on disk whose log was never compacted, plus entries after it."""
    data_dir = os.path.join(str(tmp_path), "n0")
    port = 0
    rep, sm = _single_node(data_dir, os.path.join(str(tmp_path), "sm0"))
    try:
        group = rep.add_group(0, {NodeId("n0"): rep.address})
        wait_until(group.is_leader, what="a single-node leader")
        for i in range(30):
            group.propose(b"a%d" % i)
        # The snapshot completes and is renamed, but compaction never runs (the crash window).
        monkeypatch.setattr(
            snapshots.AsyncSerializer,
            "checkSerializing",
            lambda self: (0, None) if self._job is None else (1, self._job_id),
        )
        rep._driver.call(group._raft.forceLogCompaction)
        dump = os.path.join(data_dir, "snapshots", "p0.snap")
        wait_until(lambda: os.path.exists(dump), what="the snapshot file")
        for i in range(30):
            group.propose(b"b%d" % i)
        total = sm.applied_index(0)
        with open(dump, "rb") as f:
            _, _, size = struct.unpack(">8sQI", f.read(20))
            snapshot_index = msgpack.unpackb(f.read(size))["last"][1]
        port = int(rep.address.rsplit(":", 1)[1])
    finally:
        rep.close()
        sm.close()
        monkeypatch.undo()
    assert snapshot_index < total
    return data_dir, snapshot_index, port


def _reopen_with_empty_state(tmp_path: Any, data_dir: str, name: str) -> int:
    rep, sm = _single_node(data_dir, os.path.join(str(tmp_path), name))  # an empty state machine: all from disk
    try:
        rep.add_group(0, {NodeId("n0"): rep.address})
        wait_until(lambda: sm.applied_index(0) > 0, what="the snapshot restored")
        wait_until(lambda: rep.group(0).status().applied_index >= rep.group(0).status().commit_index, what="replay")
        return sm.applied_index(0)
    finally:
        rep.close()
        sm.close()


def test_snapshot_without_compaction_reproduces_pysyncobj_log_loss(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pysyncobj clears the log when it does not start with the snapshot's entries."""
    data_dir, snapshot_index, _ = _crash_after_snapshot_before_compaction(tmp_path, monkeypatch)
    monkeypatch.setattr(PySyncObjReplicator, "_trim_to_dump", staticmethod(lambda group_log, path: None))
    assert _reopen_with_empty_state(tmp_path, data_dir, "sm-bug") == snapshot_index  # later entries lost


def test_snapshot_without_compaction_keeps_the_log_after_our_trim(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir, snapshot_index, _ = _crash_after_snapshot_before_compaction(tmp_path, monkeypatch)
    assert _reopen_with_empty_state(tmp_path, data_dir, "sm-fixed") > snapshot_index + 25


def test_a_raising_apply_does_not_block_the_group(tmp_path: Any) -> None:
    with replicators(str(tmp_path), 1) as reps:
        rep, sm = reps[0]
        group = rep.add_group(0, members_of(reps))
        wait_until(group.is_leader, what="a single-node leader")
        sm.fail_on = b"boom"
        assert group.propose(b"boom") is None
        assert _ok(group.propose(b"fine"))


def test_commit_latency_is_milliseconds_not_the_append_period(tmp_path: Any) -> None:
    import time

    with replicators(str(tmp_path), 3) as reps:
        groups = [rep.add_group(0, members_of(reps)) for rep, _ in reps]
        leader = wait_leader(groups)
        leader.propose(b"warm-up")
        start = time.perf_counter()
        for i in range(50):
            leader.propose(b"x%d" % i)
        per_commit_ms = (time.perf_counter() - start) / 50 * 1000
        assert per_commit_ms < 50, per_commit_ms  # the append period is 250 ms


def test_a_wrong_secret_is_refused_and_the_majority_commits(tmp_path: Any) -> None:
    with replicators(str(tmp_path), 3, secrets=[b"s3cret", b"s3cret", b"other"]) as reps:
        groups = [rep.add_group(0, members_of(reps)) for rep, _ in reps]
        leader = wait_leader(groups[:2])
        assert _ok(leader.propose(b"x"))
        assert not reps[2][0]._mux.is_up(reps[0][0].address)
        assert reps[2][1].applied_index(0) == 0


def test_an_unknown_peer_is_disconnected(tmp_path: Any) -> None:
    with replicators(str(tmp_path), 2) as reps:
        reps[0][0].add_group(0, members_of(reps))
        host, port = reps[0][0].address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            hello = msgpack.packb({"addr": "127.0.0.1:1", "nonce": b"n" * 16})
            sock.sendall(struct.pack(">IBI", len(hello), 0, 0) + hello)
            assert sock.recv(100) == b""  # closed without a reply


def test_secret_is_required_off_loopback(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="secret"):
        PySyncObjConfig(data_dir=str(tmp_path), bind_host="10.0.0.5").validate()


def _follower_truncations_under_load(tmp_path: Any, monkeypatch: pytest.MonkeyPatch, seconds: float) -> int:
    from kvstore.replication import raft_log

    cuts: list[int] = []
    original = raft_log.GroupLog.delete_from

    def counting(self: raft_log.GroupLog, position: int) -> None:
        if position < len(self.entries):
            cuts.append(len(self.entries) - position)
        original(self, position)

    monkeypatch.setattr(raft_log.GroupLog, "delete_from", counting)
    with replicators(str(tmp_path), 3) as reps:
        groups = [rep.add_group(0, members_of(reps)) for rep, _ in reps]
        leader = wait_leader(groups)
        command = os.urandom(26_000)
        stop_at = time.monotonic() + seconds

        def run() -> None:
            while time.monotonic() < stop_at and not (cuts and not transport.KEEP_NEXT_INDEX_ON_STALE_ACK):
                leader.propose(command)

        threads = [threading.Thread(target=run) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return len(cuts)


def test_stale_acks_make_pysyncobj_followers_rewrite_acknowledged_entries(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transport, "KEEP_NEXT_INDEX_ON_STALE_ACK", False)
    assert _follower_truncations_under_load(tmp_path, monkeypatch, 8.0) > 0


def test_keeping_next_index_stops_follower_rewrites(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _follower_truncations_under_load(tmp_path, monkeypatch, 3.0) == 0


def test_synced_mode_commits(tmp_path: Any) -> None:
    with replicators(str(tmp_path), 3, synced=True) as reps:
        groups = [rep.add_group(0, members_of(reps)) for rep, _ in reps]
        leader = wait_leader(groups)
        for i in range(20):
            assert _ok(leader.propose(b"s%d" % i))
        assert reps[0][0]._log_store is not None and reps[0][0]._log_store.synced


def test_work_handed_to_a_stopped_driver_fails_instead_of_waiting() -> None:
    poller = Poller()
    driver = Driver(poller, tick_s=0.05, on_idle_tick=lambda now: None, on_flush=lambda: None)
    driver.start()
    try:
        assert driver.call(lambda: 7) == 7
        # A call that slips in after the driver's last round (the thread has ended, stop() not done yet).
        driver._stop = True
        driver.wake()
        driver._thread.join(5)
        late: Future[int] = Future()
        driver._calls.append((lambda: 8, late))
    finally:
        driver.stop()
        poller.close()
    with pytest.raises(RuntimeError, match="stopped before running"):
        late.result(0)
    with pytest.raises(RuntimeError, match="not running"):
        driver.call(lambda: 9, timeout_s=5.0)
