"""The node's real state machine (`StoreStateMachine` over `Store` + `RocksEngine`) through the engine."""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from kvclient._proto import kvstore_pb2 as pb
from kvstore.replication import NodeId
from kvstore.replication.command import Command, encode
from kvstore.replication.pysyncobj_engine import PySyncObjConfig, PySyncObjReplicator
from kvstore.rocks_engine import RocksEngine
from kvstore.state_machine import OK, StoreStateMachine
from kvstore.store import Store
from tests.conftest import wait_until
from tests.replication.inproc import wait_leader


def _applied_at_least(store: Store, index: int) -> bool:
    return store.applied_index(0) >= index


TABLE = pb.TableSchema(name="t", kind=pb.EMBEDDING, dim=4, dtype=pb.FLOAT32, table_id=9)


def test_three_stores_apply_the_same_commands_and_a_new_one_catches_up(tmp_path: Any) -> None:
    nodes: list[tuple[PySyncObjReplicator, Store]] = []
    try:
        for i in range(4):
            store = Store(RocksEngine(os.path.join(str(tmp_path), f"db{i}")), 1 << 20)
            store.set_tables([TABLE])
            config = PySyncObjConfig(data_dir=os.path.join(str(tmp_path), f"n{i}"), balance_leaders=False)
            rep = PySyncObjReplicator(NodeId(f"n{i}"), config, StoreStateMachine(store))
            rep.start()
            nodes.append((rep, store))
        members = {rep.node_id: rep.address for rep, _ in nodes[:3]}
        groups = [rep.add_group(0, members) for rep, _ in nodes[:3]]
        leader = wait_leader(groups)
        rows = np.arange(40, dtype=np.float32).reshape(10, 4)
        ids = np.arange(10, dtype="<u8")
        assert leader.propose(encode(Command(0, TABLE.table_id, ids.tobytes(), rows.tobytes()))) == OK
        for _ in range(30):  # enough entries for the leader to take a snapshot
            assert leader.propose(encode(Command(0, TABLE.table_id, deletes=ids[:1].tobytes()))) == OK
        leader_rep = next(rep for rep, _ in nodes[:3] if rep.group(0) is leader)
        leader_rep._driver.call(leader._raft.forceLogCompaction)
        wait_until(lambda: leader.status().log_entries < 10, what="a compacted leader log")

        new_rep = nodes[3][0]
        new_rep.add_group(0, {**members, new_rep.node_id: new_rep.address})
        leader.add_member(new_rep.node_id, new_rep.address)
        leader.wait_caught_up(new_rep.node_id)
        parts = np.zeros(len(ids), dtype=np.intp)
        top = next(store for rep, store in nodes if rep is leader_rep).applied_index(0)
        for _, store in nodes:
            wait_until(functools.partial(_applied_at_least, store, top), what=f"applied index {top}")
            found, got = store.get_vectors(TABLE, ids.astype(np.uint64), parts)
            assert not found[0] and found[1:].all()
            assert got.view(np.float32).reshape(-1, 4).tolist() == rows[1:].tolist()
    finally:
        for rep, store in nodes:
            rep.close()
            store.close()
