"""A node's tables (engine + cache tier) against a dict model, on MemEngine and RocksEngine."""

from __future__ import annotations

import itertools
import tempfile
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvclient._codec import NUMPY_DTYPES
from kvclient._errors import UnknownTableError
from kvclient._proto import kvstore_pb2 as pb
from kvclient._ring import partitions_of
from kvstore.engine import Engine, MemEngine
from kvstore.lru import ENTRY_OVERHEAD_BYTES
from kvstore.rocks_engine import RocksEngine
from kvstore.store import Store, encode_keys, last_occurrence

PARTITIONS = 8
ID_SPACE = [*range(25), 2**63, 2**64 - 1]
ids_lists = st.lists(st.sampled_from(ID_SPACE), min_size=1, max_size=8)  # short: partly filled caches


def u64(ids: list[int]) -> np.ndarray:
    return np.array(ids, dtype=np.uint64)


def parts_of(table: pb.TableSchema, ids: np.ndarray) -> np.ndarray:
    return partitions_of(table.name, ids, PARTITIONS)


def embedding(name: str, table_id: int, dim: int, dtype: pb.DType.ValueType) -> pb.TableSchema:
    return pb.TableSchema(name=name, kind=pb.EMBEDDING, dim=dim, dtype=dtype, table_id=table_id)


def features(name: str, table_id: int) -> pb.TableSchema:
    return pb.TableSchema(name=name, kind=pb.FEATURES, table_id=table_id)


def make_rows(table: pb.TableSchema, versions: list[int]) -> np.ndarray:
    """Rows in the table's stored dtype that encode `versions` exactly (float16 included)."""
    v = np.array(versions, dtype=np.float64)
    cols = [v % 1000, v // 1000] + [np.full_like(v, -0.5)] * (table.dim - 2)
    return np.stack(cols, axis=1).astype(NUMPY_DTYPES[table.dtype])


def stored_bytes(row: np.ndarray) -> bytes:
    return row.astype(row.dtype.newbyteorder("<")).tobytes()


class StoreMachine(RuleBasedStateMachine):
    """Random puts, deletes, reads and table drops; every read must agree with the model."""

    ENGINE = "mem"

    def __init__(self) -> None:
        super().__init__()
        self.versions = itertools.count(1)
        self.table_ids = itertools.count(1)
        self.dropped_ids: list[int] = []
        self.tmp: tempfile.TemporaryDirectory[str] | None = None

    def new_engine(self) -> Engine:
        if self.ENGINE == "mem":
            return MemEngine()
        self.tmp = tempfile.TemporaryDirectory()
        return RocksEngine(self.tmp.name, block_cache_bytes=1 << 20)

    @initialize(budget=st.sampled_from([0, 600, 1500, 3000, 50_000]))
    def start(self, budget: int) -> None:
        self.store = Store(self.new_engine(), budget)
        self.tables = {
            "f32": embedding("f32", next(self.table_ids), 4, pb.FLOAT32),
            "f16": embedding("f16", next(self.table_ids), 3, pb.FLOAT16),
            "feat": features("feat", next(self.table_ids)),
        }
        self.model: dict[str, dict[int, bytes]] = {name: {} for name in self.tables}  # name -> id -> stored bytes
        self.store.set_tables(list(self.tables.values()))

    def teardown(self) -> None:
        if hasattr(self, "store"):
            self.store.close()
        if self.tmp is not None:
            self.tmp.cleanup()

    # ---- writes ----

    @rule(name=st.sampled_from(["f32", "f16"]), ids=ids_lists, read_back=st.booleans())
    def put_vectors(self, name: str, ids: list[int], read_back: bool) -> None:
        table = self.tables[name]
        rows = make_rows(table, [next(self.versions) for _ in ids])
        arr = u64(ids)
        written = self.store.put_vectors(table, arr, parts_of(table, arr), rows)
        assert written == len(set(ids))
        for key, row in zip(ids, rows, strict=True):  # a later duplicate wins
            self.model[name][key] = stored_bytes(row)
        if read_back:  # straight from the cache the put just filled
            self.get_vectors(name, ids)

    @rule(ids=ids_lists)
    def put_records(self, ids: list[int]) -> None:
        table = self.tables["feat"]
        records = [msgpack.packb({"v": next(self.versions), "pad": "x" * (key % 7) * 30}) for key in ids]
        arr = u64(ids)
        assert self.store.put_records(table, arr, parts_of(table, arr), records) == len(set(ids))
        self.model["feat"].update(zip(ids, records, strict=True))

    @rule(name=st.sampled_from(["f32", "f16", "feat"]), ids=ids_lists)
    def delete(self, name: str, ids: list[int]) -> None:
        table = self.tables[name]
        arr = u64(ids)
        assert self.store.delete(table, arr, parts_of(table, arr)) == len(set(ids))
        for key in ids:
            self.model[name].pop(key, None)

    @rule(name=st.sampled_from(["f32", "f16", "feat"]))
    def drop_and_recreate(self, name: str) -> None:
        """Dropping a table deletes its rows; the re-created name gets a new id and starts empty."""
        old = self.tables[name]
        self.store.set_tables([t for t in self.tables.values() if t is not old])
        self.dropped_ids.append(old.table_id)
        renewed = pb.TableSchema()
        renewed.CopyFrom(old)
        renewed.table_id = next(self.table_ids)
        self.tables[name] = renewed
        self.model[name] = {}
        self.store.set_tables(list(self.tables.values()))

    @rule()
    def readopt_the_same_tables(self) -> None:
        self.store.set_tables(list(reversed(self.tables.values())))

    # ---- reads ----

    @rule(name=st.sampled_from(["f32", "f16"]), ids=ids_lists)
    def get_vectors(self, name: str, ids: list[int]) -> None:
        table = self.tables[name]
        arr = u64(ids)
        reads = self.store.stats.keys_read
        found, rows = self.store.get_vectors(table, arr, parts_of(table, arr))
        assert self.store.stats.keys_read == reads + len(ids)
        assert found.tolist() == [key in self.model[name] for key in ids]
        assert [r.tobytes() for r in rows] == [self.model[name][key] for key in ids if key in self.model[name]]

    @rule(ids=ids_lists)
    def get_records(self, ids: list[int]) -> None:
        table = self.tables["feat"]
        arr = u64(ids)
        found, records = self.store.get_records(table, arr, parts_of(table, arr))
        assert found.tolist() == [key in self.model["feat"] for key in ids]
        assert records == [self.model["feat"][key] for key in ids if key in self.model["feat"]]

    # ---- invariants ----

    @invariant()
    def cache_within_budget(self) -> None:
        if hasattr(self, "store"):
            assert self.store.cache_bytes <= self.store.cache_budget_bytes

    @invariant()
    def read_counters_add_up(self) -> None:
        if hasattr(self, "store"):
            stats = self.store.stats
            assert stats.cache_hits + stats.cache_misses == stats.keys_read

    @invariant()
    def dropped_tables_leave_no_rows(self) -> None:
        if not self.dropped_ids:
            return
        engine = self.store.engine
        for table_id in self.dropped_ids:
            keys = encode_keys(table_id, u64(ID_SPACE))
            for partition in engine.partitions():
                assert engine.multi_get(partition, keys) == [None] * len(keys)


TestStoreOnMemEngine = StoreMachine.TestCase


class RocksStoreMachine(StoreMachine):
    ENGINE = "rocks"


TestStoreOnRocksEngine = RocksStoreMachine.TestCase


# ---- scenarios ----


@pytest.fixture(params=["mem", "rocks"])
def engine(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    engine: Engine = (
        MemEngine() if request.param == "mem" else RocksEngine(str(tmp_path / "db"), block_cache_bytes=1 << 20)
    )
    yield engine
    engine.close()


def test_cache_never_serves_an_overwritten_or_deleted_row(engine: Engine) -> None:
    table = embedding("t", 1, 4, pb.FLOAT32)
    store = Store(engine, 1 << 20)
    store.set_tables([table])
    ids = u64([5, 6])
    parts = parts_of(table, ids)
    store.put_vectors(table, ids, parts, make_rows(table, [1, 2]))
    store.get_vectors(table, ids, parts)  # now both are cached
    store.put_vectors(table, ids[:1], parts[:1], make_rows(table, [3]))
    store.delete(table, ids[1:], parts[1:])
    hits = store.stats.cache_hits
    found, rows = store.get_vectors(table, ids, parts)
    assert store.stats.cache_hits == hits + 1  # 5 came from the cache
    assert found.tolist() == [True, False]
    assert rows.tobytes() == make_rows(table, [3]).tobytes()


@pytest.mark.parametrize("kind", [pb.EMBEDDING, pb.FEATURES])
def test_a_bulk_write_does_not_evict_the_rows_reads_keep_hot(engine: Engine, kind: int) -> None:
    table = embedding("t", 1, 4, pb.FLOAT32) if kind == pb.EMBEDDING else features("t", 1)
    store = Store(engine, 8 * (16 + ENTRY_OVERHEAD_BYTES))  # room for 8 rows
    store.set_tables([table])

    def stored(version: int) -> bytes:
        return make_rows(table, [version]).tobytes() if kind == pb.EMBEDDING else bytes([version]) * 16

    def put(batch: list[int], version: int) -> None:
        ids = u64(batch)
        if kind == pb.EMBEDDING:
            store.put_vectors(table, ids, parts_of(table, ids), make_rows(table, [version] * len(batch)))
        else:
            store.put_records(table, ids, parts_of(table, ids), [stored(version)] * len(batch))

    def read(batch: list[int]) -> tuple[int, list[bytes]]:
        ids = u64(batch)
        hits = store.stats.cache_hits
        if kind == pb.EMBEDDING:
            found, rows = store.get_vectors(table, ids, parts_of(table, ids))
            values = [r.tobytes() for r in rows]
        else:
            found, values = store.get_records(table, ids, parts_of(table, ids))
        assert found.all()
        return store.stats.cache_hits - hits, values

    hot = [1, 2, 3]
    put(hot, 1)
    assert store.cache_bytes == 0  # writes do not fill the cache
    assert read(hot)[0] == 0 and read(hot)[0] == 3  # reads do
    put(list(range(100, 164)), 2)  # eight times the cache
    put(hot[:1], 3)  # a cached row takes its new value in place
    hits, values = read(hot)
    assert hits == 3
    assert values == [stored(3), stored(1), stored(1)]
    assert read([100]) == (0, [stored(2)])


@pytest.mark.parametrize("kind", [pb.EMBEDDING, pb.FEATURES])
@pytest.mark.parametrize("rows", [5, 20])
def test_warm_fills_the_cache_up_to_its_budget_and_evicts_nothing(engine: Engine, kind: int, rows: int) -> None:
    table = embedding("t", 1, 4, pb.FLOAT32) if kind == pb.EMBEDDING else features("t", 1)
    other = embedding("other", 2, 4, pb.FLOAT32)
    store = Store(engine, 2 * 8 * (16 + ENTRY_OVERHEAD_BYTES))  # each table's share: room for 8 rows
    store.set_tables([table, other])
    ids = u64(list(range(100, 100 + rows)))
    parts = parts_of(table, ids)
    if kind == pb.EMBEDDING:
        store.put_vectors(table, ids, parts, make_rows(table, list(range(rows))))
    else:
        store.put_records(table, ids, parts, [bytes([i]) * 16 for i in range(rows)])
    store.put_vectors(other, ids, parts_of(other, ids), make_rows(other, list(range(rows))))

    def read(ask: np.ndarray) -> int:
        hits = store.stats.cache_hits
        if kind == pb.EMBEDDING:
            found = store.get_vectors(table, ask, parts_of(table, ask))[0]
        else:
            found = store.get_records(table, ask, parts_of(table, ask))[0]
        assert found.all()
        return store.stats.cache_hits - hits

    hot = ids[-3:]
    read(hot)
    read_before = store.stats.keys_read
    added, full = store.warm(table, sorted(set(parts.tolist())), chunk=4)
    assert store.stats.keys_read == read_before  # warming is not a read
    assert added == min(rows, 8) - len(hot)
    assert full == (rows > 8)
    assert read(hot) == len(hot)  # the hot rows were not evicted
    assert read(ids) == min(rows, 8)
    assert store.warm(table, [], chunk=4) == (0, False)
    hits = store.stats.cache_hits
    assert store.get_vectors(other, ids, parts_of(other, ids))[0].all()
    assert store.stats.cache_hits == hits  # only `table` was warmed


def test_a_put_larger_than_the_free_cache_space_reads_back_exactly(engine: Engine) -> None:
    table = embedding("t", 1, 4, pb.FLOAT32)
    store = Store(engine, 3 * (16 + ENTRY_OVERHEAD_BYTES))  # room for 3 rows
    store.set_tables([table])
    for batch in ([1], [2, 3, 4], [5, 1, 6, 7]):
        ids = u64(batch)
        store.put_vectors(table, ids, parts_of(table, ids), make_rows(table, [100 + i for i in batch]))
        found, rows = store.get_vectors(table, ids, parts_of(table, ids))
        assert found.all()
        assert rows.tobytes() == make_rows(table, [100 + i for i in batch]).tobytes()


@pytest.mark.parametrize("kind", [pb.EMBEDDING, pb.FEATURES])
def test_delete_works_when_the_cache_is_empty_or_disabled(engine: Engine, kind: int) -> None:
    table = embedding("t", 1, 4, pb.FLOAT32) if kind == pb.EMBEDDING else features("t", 1)
    for budget in (0, 1 << 20):
        store = Store(engine, budget)
        store.set_tables([table])
        ids = u64([1, 2, 1])
        assert store.delete(table, ids, parts_of(table, ids)) == 2


def test_duplicate_ids_in_a_read_are_answered_and_cached_once(engine: Engine) -> None:
    table = embedding("t", 1, 4, pb.FLOAT32)
    store = Store(engine, 1 << 20)
    store.set_tables([table])
    one = u64([9])
    store.put_vectors(table, one, parts_of(table, one), make_rows(table, [4]))
    store = Store(engine, 1 << 20)  # a cold cache over the same engine
    store.set_tables([table])
    dup = u64([9, 9, 9])
    found, rows = store.get_vectors(table, dup, parts_of(table, dup))
    assert found.tolist() == [True] * 3
    assert [r.tobytes() for r in rows] == [make_rows(table, [4]).tobytes()] * 3
    assert store.cache_bytes == 4 * 4 + ENTRY_OVERHEAD_BYTES


def test_set_tables_with_a_dropped_table_removes_its_rows(engine: Engine) -> None:
    keep, drop = embedding("keep", 1, 4, pb.FLOAT32), features("drop", 2)
    store = Store(engine, 1 << 20)
    store.set_tables([keep, drop])
    ids = u64(list(range(40)))
    store.put_vectors(keep, ids, parts_of(keep, ids), make_rows(keep, list(range(40))))
    store.put_records(drop, ids, parts_of(drop, ids), [msgpack.packb({"i": i}) for i in range(40)])
    store.set_tables([keep])
    for partition in engine.partitions():
        assert engine.multi_get(partition, encode_keys(2, ids)) == [None] * 40
    found, _ = store.get_vectors(keep, ids, parts_of(keep, ids))
    assert found.all()


@pytest.mark.parametrize("ids", [[1], [3, 1, 3, 2, 1], [7, 7, 7], [2**64 - 1, 0, 2**64 - 1]])
def test_last_occurrence_keeps_each_ids_last_position(ids: list[int]) -> None:
    positions = last_occurrence(u64(ids)).tolist()
    expected = sorted(max(i for i, x in enumerate(ids) if x == key) for key in set(ids))
    assert positions == expected


def test_encode_keys_sorts_by_table_then_id() -> None:
    ids = u64([2**64 - 1, 0, 256, 1])
    keys = encode_keys(7, ids)
    assert all(len(k) == 12 for k in keys)
    assert [int.from_bytes(k[:4], "big") for k in keys] == [7] * 4
    assert [int.from_bytes(k[4:], "big") for k in keys] == ids.tolist()
    assert sorted(keys) == [keys[i] for i in np.argsort(ids)]


def test_requests_routed_before_a_drop_get_unknown_table_and_write_nothing(engine: Engine) -> None:
    """A map adopted on another thread can drop a table between a request's routing and its store call."""
    vectors, records = embedding("v", 1, 4, pb.FLOAT32), features("f", 2)
    store = Store(engine, 1 << 20)
    store.set_tables([vectors, records])
    store.set_tables([])
    ids = u64([1, 2, 3])
    calls = [
        lambda: store.get_vectors(vectors, ids, parts_of(vectors, ids)),
        lambda: store.get_records(records, ids, parts_of(records, ids)),
        lambda: store.put_vectors(vectors, ids, parts_of(vectors, ids), make_rows(vectors, [1, 2, 3])),
        lambda: store.put_records(records, ids, parts_of(records, ids), [msgpack.packb({"i": 1})] * 3),
        lambda: store.delete(vectors, ids, parts_of(vectors, ids)),
    ]
    for call in calls:
        with pytest.raises(UnknownTableError, match="dropped"):
            call()
    for partition in engine.partitions():
        assert engine.multi_get(partition, encode_keys(1, ids)) == [None] * 3
        assert engine.multi_get(partition, encode_keys(2, ids)) == [None] * 3
