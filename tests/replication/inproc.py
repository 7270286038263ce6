"""In-process replicators for tests that need no kill -9 (each still has its own port and driver)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kvstore.replication import NodeId
from kvstore.replication.pysyncobj_engine import PySyncObjConfig, PySyncObjGroup, PySyncObjReplicator
from tests.conftest import wait_until
from tests.replication.sm import RecordingStateMachine


@contextmanager
def replicators(
    root: str, count: int, **config: Any
) -> Iterator[list[tuple[PySyncObjReplicator, RecordingStateMachine]]]:
    """Start `count` replicators (each with its own state machine); close them all afterwards."""
    started: list[tuple[PySyncObjReplicator, RecordingStateMachine]] = []
    try:
        for i in range(count):
            yield_one = _start(os.path.join(root, f"n{i}"), f"n{i}", config.get("secrets", [None] * count)[i], config)
            started.append(yield_one)
        yield started
    finally:
        for rep, sm in started:
            rep.close()
            sm.close()


def _start(
    data_dir: str, node_id: str, secret: bytes | None, config: dict[str, Any]
) -> tuple[PySyncObjReplicator, RecordingStateMachine]:
    settings = {k: v for k, v in config.items() if k != "secrets"}
    settings.setdefault("balance_leaders", False)
    os.makedirs(data_dir, exist_ok=True)
    sm = RecordingStateMachine(os.path.join(data_dir, "sm"))
    rep = PySyncObjReplicator(NodeId(node_id), PySyncObjConfig(data_dir=data_dir, secret=secret, **settings), sm)
    rep.start()
    return rep, sm


def members_of(reps: list[tuple[PySyncObjReplicator, RecordingStateMachine]]) -> dict[NodeId, str]:
    return {rep.node_id: rep.address for rep, _ in reps}


def wait_leader(groups: list[PySyncObjGroup], timeout_s: float = 15.0) -> PySyncObjGroup:
    """Return the group replica that leads, waiting for an election."""
    leader = wait_until(lambda: next((g for g in groups if g.is_leader()), None), timeout_s=timeout_s, what="a leader")
    assert leader is not None
    return leader
