"""Replica membership steps (the Replicas service and `kvstore.replica_ops`) on real nodes.

One 4-node cluster with replicas=3 per module: each partition has one node outside its
group (the "outsider"). Each test works on its own partition, so the tests share the
cluster; every fixture stops its nodes.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from kvclient import Client, KvError, NotLeaderError
from kvclient._connection import ERROR_METADATA_KEY
from kvclient._errors import error_from_proto
from kvclient._proto import kvstore_pb2 as pb
from kvclient._proto import kvstore_pb2_grpc as pb_grpc
from kvstore.cli import main as cli_main
from kvstore.launcher import LocalCluster
from kvstore.replica_ops import ReplicaOps
from tests.cluster.replicated import PATIENT, address, ids_of_partition, partition_leaders, read_direct
from tests.conftest import wait_until

PARTITIONS = 8
TABLE = "members"
DIM = 4
KEYS = 512


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster.open(str(tmp_path_factory.mktemp("members")))
    try:
        cluster.up(4, partitions=PARTITIONS, replicas=3, cache_bytes="16MiB")
        with Client(cluster.seeds, deadline_s=10.0, retry=PATIENT) as kv:
            kv.create_table(TABLE, dim=DIM)
            wait_until(lambda: len(partition_leaders(cluster)) == PARTITIONS, what="a leader for every partition")
        yield cluster
    finally:
        cluster.down()


@pytest.fixture
def cluster(shared_cluster: LocalCluster) -> LocalCluster:
    return shared_cluster  # named `cluster` so a failing test shows the node logs


# ---- helpers ----


def _placement(cluster: LocalCluster) -> list[list[str]]:
    with grpc.insecure_channel(cluster.seeds[0]) as channel:
        cmap = pb_grpc.AdminStub(channel).GetClusterMap(pb.GetClusterMapRequest(), timeout=5.0)
    return [list(p.node_ids) for p in cmap.placement]


def _outsider(cluster: LocalCluster, part: int) -> str:
    placed = _placement(cluster)[part]
    return next(n.node_id for n in cluster.nodes if n.node_id not in placed)


def _status(cluster: LocalCluster, node_id: str, part: int) -> pb.GroupStatus | None:
    """`node_id`'s view of `part`'s group (None: it holds no replica)."""
    with grpc.insecure_channel(address(cluster, node_id)) as channel:
        resp = pb_grpc.AdminStub(channel).GetPartitionStatus(pb.PartitionStatusRequest(), timeout=5.0)
    return next((g for g in resp.groups if g.partition == part), None)


def _leader(cluster: LocalCluster, part: int) -> str:
    return wait_until(lambda: partition_leaders(cluster).get(part, ""), what=f"a leader of partition {part}")


def _views(cluster: LocalCluster, part: int) -> dict[str, pb.GroupStatus]:
    """Every node's view of `part` (nodes holding a replica only)."""
    return {n.node_id: st for n in cluster.nodes if (st := _status(cluster, n.node_id, part)) is not None}


def _step(cluster: LocalCluster, at: str, step: str, *, rpc_timeout_s: float = 30.0, **fields: Any) -> pb.ReplicaReply:
    """Send one Replicas step to node `at`."""
    with grpc.insecure_channel(address(cluster, at)) as channel:
        stub = pb_grpc.ReplicasStub(channel)
        reply: pb.ReplicaReply = getattr(stub, step)(pb.ReplicaRequest(**fields), timeout=rpc_timeout_s)
        return reply


def _refused(cluster: LocalCluster, at: str, step: str, **fields: Any) -> tuple[grpc.StatusCode, KvError]:
    """Run a step that must fail; return its gRPC status and the in-band error."""
    with pytest.raises(grpc.RpcError) as info:
        _step(cluster, at, step, **fields)
    return _error_of(info.value)


def _error_of(err: grpc.RpcError) -> tuple[grpc.StatusCode, KvError]:
    detail = dict(err.trailing_metadata() or ())[ERROR_METADATA_KEY]
    return err.code(), error_from_proto(pb.Error.FromString(detail))


def _ops(cluster: LocalCluster, method: str, *args: Any, **kwargs: Any) -> Any:
    async def run() -> Any:
        async with ReplicaOps(cluster.seeds, deadline_s=60.0) as ops:
            return await getattr(ops, method)(*args, **kwargs)

    return asyncio.run(run())


# ---- tests ----


def test_add_transfer_remove_keeps_every_acknowledged_write(cluster: LocalCluster) -> None:
    part = 1
    ids = ids_of_partition(TABLE, KEYS, PARTITIONS, part)
    assert len(ids) > 10
    expected = np.random.default_rng(1).standard_normal((len(ids), DIM)).astype(np.float32)
    with Client(cluster.seeds, deadline_s=10.0, retry=PATIENT) as kv:
        assert kv.put(TABLE, ids, expected) == len(ids)
    placed, new = _placement(cluster)[part], _outsider(cluster, part)

    # Add: the new replica opens, joins, and holds everything committed before.
    status = _ops(cluster, "add", part, new)
    assert sorted(status.members) == sorted([*placed, new])
    top = status.commit_index
    wait_until(
        lambda: (st := _status(cluster, new, part)) is not None and st.applied_index >= top,
        what="the new replica to apply what was committed",
    )
    mine = _status(cluster, new, part)
    assert mine is not None and sorted(mine.members) == sorted([*placed, new])
    for node_id in placed:
        view = _status(cluster, node_id, part)
        assert view is not None and new in view.members
    # The map still places the partition elsewhere: the new replica serves no data requests.
    with pytest.raises(grpc.RpcError) as info:
        read_direct(cluster, new, TABLE, ids, DIM)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # Transfer to the new replica, then remove an old one (moving the leadership first if it leads).
    assert _ops(cluster, "transfer", part, new) == new
    # The map still lists the removed replica: clients try the first listed replica first,
    # and a removed one answers UNAVAILABLE without a leader hint, so remove the last listed.
    victim, kept = placed[-1], placed[:-1]
    after = _ops(cluster, "remove", part, victim)
    assert victim not in after.members and new in after.members and len(after.members) == 3
    assert _status(cluster, victim, part) is None  # closed and deleted on the removed node
    for node_id in [*kept, new]:
        view = _status(cluster, node_id, part)
        assert view is not None and sorted(view.members) == sorted(after.members)

    # Writes go on once a replica the map places here leads (the map was not changed).
    keep = kept[0]
    update = expected + 100.0
    errors: list[KvError] = []
    with Client(cluster.seeds, deadline_s=10.0, retry=PATIENT) as kv:
        for _ in range(5):
            assert _ops(cluster, "transfer", part, keep) == keep
            try:
                assert kv.put(TABLE, ids[: len(ids) // 2], update[: len(ids) // 2]) == len(ids) // 2
                break
            except KvError as err:  # the leader balancer moved the leadership to the unplaced replica
                errors.append(err)
        else:
            pytest.fail(f"no write to the partition succeeded in 5 attempts: {errors!r}")
    expected[: len(ids) // 2] = update[: len(ids) // 2]

    # Every remaining replica reaches the same applied index; the placed ones serve every row.
    members = [*kept, new]
    wait_until(
        lambda: len({(st := _status(cluster, n, part)) and st.applied_index for n in members}) == 1,
        what="identical applied indexes on every remaining replica",
    )
    for node_id in kept:
        found, rows = read_direct(cluster, node_id, TABLE, ids, DIM)
        assert found.all() and np.array_equal(rows, expected)


def test_bad_steps_are_refused_and_change_nothing(cluster: LocalCluster) -> None:
    part = 2
    placed, outsider = _placement(cluster)[part], _outsider(cluster, part)
    before = {n: sorted(st.members) for n, st in _views(cluster, part).items()}
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    # (step, fields, field named by the error); each is refused whichever replica leads.
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("AddReplica", {"partition": PARTITIONS, "node_id": outsider}, "partition"),
        ("AddReplica", {"partition": part, "node_id": "n9"}, "node_id"),
        ("AddReplica", {"partition": part, "node_id": outsider, "timeout_ms": 600_001}, "timeout_ms"),
        ("AddReplica", {"partition": part, "node_id": outsider, "max_lag": 5}, "max_lag"),
        ("WaitCaughtUp", {"partition": part, "node_id": outsider}, "node_id"),  # not a member
        ("TransferLeader", {"partition": part, "node_id": outsider}, "node_id"),  # not a member
        ("RemoveReplica", {"partition": part, "node_id": "n9"}, "node_id"),
    ]
    for node_id in placed:
        # A replica cannot remove itself, leader or not.
        assert _refused(cluster, node_id, "RemoveReplica", partition=part, node_id=node_id)[0] == invalid
        for step, fields, field in cases:
            code, err = _refused(cluster, node_id, step, **fields)
            assert (code, err.field) == (invalid, field), (node_id, step, fields, err)
    members = [pb.NodeInfo(node_id=n) for n in placed]
    code, err = _refused(cluster, outsider, "OpenReplica", partition=part, members=members)
    assert (code, err.field) == (invalid, "members")  # the node it opens on is not a member
    code, err = _refused(cluster, outsider, "AddReplica", partition=part, node_id=outsider)
    assert (code, err.field) == (invalid, "partition")  # no replica of the partition there

    def refused_by_follower() -> bool:
        leader = _leader(cluster, part)
        follower = next(n for n in placed if n != leader)
        code, err = _refused(cluster, follower, "AddReplica", partition=part, node_id=outsider)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and isinstance(err, NotLeaderError), err
        return err.leaders == {part: _leader(cluster, part)}  # the hint names the leader (unless it just moved)

    wait_until(refused_by_follower, what="a follower to refuse AddReplica with the leader as hint")

    with pytest.raises(KvError, match=r"partition: 8 is not in 0\.\.7"):
        _ops(cluster, "add", PARTITIONS, outsider)
    with pytest.raises(KvError, match="'n9' is not a node"):
        _ops(cluster, "remove", part, "n9")
    with pytest.raises(KvError, match=f"{outsider} holds no replica of partition {part}"):
        _ops(cluster, "remove", part, outsider)

    assert {n: sorted(st.members) for n, st in _views(cluster, part).items()} == before
    assert _status(cluster, outsider, part) is None


def test_a_second_change_on_a_group_is_refused_while_one_runs(cluster: LocalCluster) -> None:
    part = 3
    outsider = _outsider(cluster, part)
    # A member that never opens its replica: a transfer to it is denied until the step's timeout.
    deadline = time.monotonic() + 30.0
    _ops(cluster, "on_leader", "AddReplica", part, outsider, deadline)
    refusal: KvError | None = None
    for _ in range(5):  # the leader balancer may move the leadership under the transfer: try again
        leader = _leader(cluster, part)
        outcome: list[grpc.RpcError | pb.ReplicaReply] = []

        def transfer(leader: str = leader, outcome: list[grpc.RpcError | pb.ReplicaReply] = outcome) -> None:
            try:
                outcome.append(
                    _step(cluster, leader, "TransferLeader", partition=part, node_id=outsider, timeout_ms=4000)
                )
            except grpc.RpcError as failure:
                outcome.append(failure)

        runner = threading.Thread(target=transfer)
        runner.start()
        try:
            while runner.is_alive() and refusal is None:
                # AddReplica of a member is a no-op when it runs: probing with it changes nothing.
                try:
                    _step(cluster, leader, "AddReplica", partition=part, node_id=outsider)
                except grpc.RpcError as probe:
                    code, err = _error_of(probe)
                    if code == grpc.StatusCode.UNAVAILABLE:
                        refusal = err
        finally:
            runner.join(30)
        if refusal is not None:
            break
    assert refusal is not None, "no AddReplica was refused while a TransferLeader ran"
    assert "TransferLeader of" in refusal.message and refusal.field == "partition", refusal
    assert isinstance(outcome[0], grpc.RpcError) and outcome[0].code() == grpc.StatusCode.UNAVAILABLE
    assert _leader(cluster, part) != outsider

    # A caller that gives up does not end its step: the group stays claimed until the engine call ends.
    for _ in range(5):
        leader = _leader(cluster, part)
        with pytest.raises(grpc.RpcError) as info:
            _step(
                cluster, leader, "TransferLeader", partition=part, node_id=outsider, timeout_ms=3000, rpc_timeout_s=0.5
            )
        if info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            break
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    code, err = _refused(cluster, leader, "RemoveReplica", partition=part, node_id=outsider)
    assert code == grpc.StatusCode.UNAVAILABLE and "TransferLeader of" in err.message, err
    assert outsider in _views(cluster, part)[leader].members

    # Once the transfer gave up, changes go through again.
    after = _ops(cluster, "remove", part, outsider)
    assert outsider not in after.members and len(after.members) == 3


def test_cli_adds_and_removes_a_replica(cluster: LocalCluster, capsys: pytest.CaptureFixture[str]) -> None:
    part = 4
    placed, new = _placement(cluster)[part], _outsider(cluster, part)
    seeds = ["--seeds", ",".join(cluster.seeds)]
    assert cli_main(["replica", "add", "--partition", str(part), "--node", new, "--json", *seeds]) == 0
    added = json.loads(capsys.readouterr().out)
    assert sorted(added["members"]) == sorted([*placed, new])
    assert cli_main(["replica", "transfer", "--partition", str(part), "--to", new, "--json", *seeds]) == 0
    assert json.loads(capsys.readouterr().out)["leader"] == new
    assert cli_main(["replica", "remove", "--partition", str(part), "--node", placed[0], "--json", *seeds]) == 0
    removed = json.loads(capsys.readouterr().out)
    assert sorted(removed["members"]) == sorted([*placed[1:], new])
    assert _status(cluster, placed[0], part) is None
    assert cli_main(["replica", "add", "--partition", str(PARTITIONS), "--node", new, *seeds]) == 2
    assert "partition: 8 is not in 0..7" in capsys.readouterr().out


def test_restarted_node_reopens_an_unplaced_replica_only_when_asked(cluster: LocalCluster) -> None:
    part = 5
    placed, new = _placement(cluster)[part], _outsider(cluster, part)
    status = _ops(cluster, "add", part, new)
    cluster.kill(new, signal.SIGKILL)
    wait_until(lambda: new not in [n.node_id for n in cluster.running()], what=f"{new} to die")
    cluster.start_node(new, cache_bytes="16MiB")
    cluster.wait_ready(new)
    # The map does not place the partition there, so nothing reopens it at start...
    assert _status(cluster, new, part) is None
    leader = _leader(cluster, part)
    assert new in _views(cluster, part)[leader].members  # ...while the group still counts it
    # ...until OpenReplica does: its log is still on disk, and it catches up from there.
    reply = _step(cluster, new, "OpenReplica", partition=part, members=[pb.NodeInfo(node_id=n) for n in [*placed, new]])
    assert sorted(reply.status.members) == sorted([*placed, new])
    wait_until(
        lambda: (st := _status(cluster, new, part)) is not None and st.applied_index >= status.commit_index,
        what="the reopened replica to catch up",
    )
    after = _ops(cluster, "remove", part, new)
    assert new not in after.members
    assert _status(cluster, new, part) is None
