"""The partition state machine against a dict model: replay, snapshots, bad commands."""

from __future__ import annotations

import io
from collections.abc import Iterator

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvclient._proto import kvstore_pb2 as pb
from kvstore.engine import Engine, MemEngine
from kvstore.replication.command import Command, encode
from kvstore.rocks_engine import RocksEngine
from kvstore.state_machine import ERROR_PREFIX, OK, SKIPPED, StoreStateMachine
from kvstore.store import Store

PART = 3
TABLE = pb.TableSchema(name="t", kind=pb.EMBEDDING, dim=2, dtype=pb.FLOAT32, table_id=7)
ROW = 8  # bytes of one float32 row of dim 2

ops = st.lists(
    st.tuples(
        st.lists(st.integers(0, 30), max_size=6),  # put ids
        st.lists(st.integers(0, 30), max_size=4),  # delete ids
        st.integers(0, 255),  # value seed
    ),
    min_size=1,
    max_size=25,
)


def _command(puts: list[int], deletes: list[int], seed: int) -> bytes:
    values = b"".join(bytes([seed, i]) * (ROW // 2) for i in range(len(puts)))
    return encode(
        Command(
            partition=PART,
            table_id=TABLE.table_id,
            ids=np.array(puts, dtype="<u8").tobytes(),
            values=values if puts else None,
            deletes=np.array(deletes, dtype="<u8").tobytes(),
        )
    )


def _model(log: list[tuple[list[int], list[int], int]]) -> dict[int, bytes]:
    state: dict[int, bytes] = {}
    for puts, deletes, seed in log:
        for i, key in enumerate(puts):
            state[key] = bytes([seed, i]) * (ROW // 2)
        for key in deletes:
            state.pop(key, None)
    return state


def _read(store: Store) -> dict[int, bytes]:
    ids = np.arange(31, dtype=np.uint64)
    found, rows = store.get_vectors(TABLE, ids, np.full(31, PART, dtype=np.intp))
    return {int(k): bytes(r) for k, r in zip(ids[found], rows, strict=True)}


@pytest.fixture(params=["mem", "rocks"], scope="module")
def engine_factory(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Makes a fresh engine per call (so per hypothesis example); closes them all at the end."""
    made: list[Engine] = []

    def make() -> Engine:
        engine: Engine = MemEngine()
        if request.param == "rocks":
            engine = RocksEngine(str(tmp_path_factory.mktemp("db")), block_cache_bytes=8 << 20)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


def _machine(engine: Engine) -> StoreStateMachine:
    store = Store(engine, cache_budget_bytes=1 << 16)
    store.set_tables([TABLE])
    return StoreStateMachine(store)


@given(log=ops, replay_from=st.integers(0, 25))
def test_apply_matches_the_model_and_replays_are_no_ops(engine_factory, log, replay_from) -> None:
    sm = _machine(engine_factory())
    for index, op in enumerate(log, start=1):
        assert sm.apply(PART, _command(*op), index) == OK
    for index, op in enumerate(log[replay_from:], start=replay_from + 1):
        assert sm.apply(PART, _command(*op), index) == SKIPPED  # a restart replays the log tail
    assert sm.applied_index(PART) == len(log)
    assert _read(sm.store) == _model(log)


def _torn(snapshot: bytes, applied: int) -> io.BytesIO:
    """Rewrite a snapshot's header to claim an older applied index than its data holds."""
    unpacker = msgpack.Unpacker(io.BytesIO(snapshot), raw=False)
    header = next(unpacker)
    header["applied"] = applied
    packer = msgpack.Packer(use_bin_type=True)
    return io.BytesIO(packer.pack(header) + b"".join(packer.pack(tuple(item)) for item in unpacker))


@given(log=ops, cut=st.integers(0, 25), extra=st.integers(0, 25))
def test_snapshot_plus_log_tail_converges(engine_factory, log, cut, extra) -> None:
    """A snapshot whose data runs ahead of its applied index (entries applied while it was
    written) still converges once the log tail after that index is replayed."""
    cut = min(cut, len(log))
    later = min(len(log), cut + extra)
    leader = _machine(engine_factory())
    for index, op in enumerate(log[:later], start=1):
        leader.apply(PART, _command(*op), index)
    buf = io.BytesIO()
    assert leader.snapshot(PART, buf) == later
    follower = _machine(engine_factory())
    follower.restore(PART, _torn(buf.getvalue(), cut))
    assert follower.applied_index(PART) == cut
    for index, op in enumerate(log, start=1):
        follower.apply(PART, _command(*op), index)
    assert _read(follower.store) == _model(log)


def test_bad_commands_are_reported_counted_and_never_raise(engine_factory) -> None:
    sm = _machine(engine_factory())
    assert sm.apply(PART, b"\x09garbage", 1).startswith(ERROR_PREFIX)
    assert sm.apply(PART + 1, _command([1], [], 5), 2).startswith(ERROR_PREFIX)
    assert sm.applied_index(PART) == 1 and sm.applied_index(PART + 1) == 2
    assert sm.apply(PART, _command([1], [], 5), 3) == OK
    assert _read(sm.store) == {1: bytes([5, 0]) * 4}


def test_cached_rows_follow_applied_writes(engine_factory) -> None:
    sm = _machine(engine_factory())
    sm.apply(PART, _command([1, 2], [], 1), 1)
    assert _read(sm.store)[1] == bytes([1, 0]) * 4  # now cached
    sm.apply(PART, _command([1], [2], 9), 2)
    assert _read(sm.store) == {1: bytes([9, 0]) * 4}
    assert sm.store.stats.cache_hits > 0


def test_restore_refuses_a_snapshot_of_another_partition(engine_factory) -> None:
    sm = _machine(engine_factory())
    sm.apply(PART, _command([1], [], 1), 1)
    buf = io.BytesIO()
    sm.snapshot(PART, buf)
    buf.seek(0)
    with pytest.raises(ValueError, match="partition 4"):
        sm.restore(PART + 1, buf)
