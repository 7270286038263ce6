"""One contract for every `Engine`: MemEngine and RocksEngine must behave alike."""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore.engine import Engine, MemEngine
from kvstore.rocks_engine import RocksEngine

EngineFactory = Callable[[], Engine]
Op = tuple[str, int, Any]


@pytest.fixture(params=["mem", "rocks"])
def make_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EngineFactory]:
    opened: list[Engine] = []

    def make() -> Engine:
        engine: Engine = (
            MemEngine() if request.param == "mem" else RocksEngine(str(tmp_path / "db"), block_cache_bytes=1 << 20)
        )
        opened.append(engine)
        return engine

    yield make
    if request.param == "rocks":
        opened[-1].close()


def test_an_unknown_partition_reads_as_empty(make_engine: EngineFactory) -> None:
    engine = make_engine()
    assert engine.multi_get(3, [b"a", b"b"]) == [None, None]
    assert engine.multi_get(3, []) == []
    assert engine.partitions() == []


def test_write_applies_puts_and_deletes_in_order(make_engine: EngineFactory) -> None:
    engine = make_engine()
    engine.write(1, [b"k", b"k", b"gone", b"gone", b"back", b"back"], [b"v1", b"v2", b"x", None, None, b"y"])
    assert engine.multi_get(1, [b"k", b"gone", b"back", b"never"]) == [b"v2", None, b"y", None]
    assert engine.multi_get(2, [b"k"]) == [None]  # partitions are separate keyspaces
    assert engine.partitions() == [1]


def test_keys_lists_a_range_in_key_order_as_of_the_call(make_engine: EngineFactory) -> None:
    engine = make_engine()
    keys = [bytes([i, j]) for i in range(4) for j in (7, 3, 250)]
    engine.write(5, keys, [b"v"] * len(keys))
    engine.write(6, [b"\x01\x05"], [b"other partition"])
    assert list(engine.keys(5, b"\x01", b"\x03")) == sorted(k for k in keys if b"\x01" <= k < b"\x03")
    assert list(engine.keys(5, b"\x09", b"\xff")) == []
    assert list(engine.keys(9, b"", b"\xff")) == []  # an unknown partition is empty
    snapshot = engine.keys(5, b"\x02", b"\x03")
    engine.write(5, [b"\x02\x05"], [b"later"])
    assert list(snapshot) == [b"\x02\x03", b"\x02\x07", b"\x02\xfa"]


def test_multi_get_answers_in_the_order_asked(make_engine: EngineFactory) -> None:
    engine = make_engine()
    keys = [bytes([i]) * 3 for i in range(50)]
    engine.write(0, keys, [k[::-1] + b"!" for k in keys])
    asked = [*keys[::-3], b"zz", *keys[:2], *keys[:2]]
    assert engine.multi_get(0, asked) == [None if k == b"zz" else k[::-1] + b"!" for k in asked]


def test_delete_range_is_half_open_and_stays_in_its_partition(make_engine: EngineFactory) -> None:
    engine = make_engine()
    keys = [b"a", b"b", b"b\x00", b"bz", b"c", b"c\x00", b"d"]
    engine.write(5, keys, keys)
    engine.write(6, keys, keys)
    engine.delete_range(5, b"b", b"c")
    assert engine.multi_get(5, keys) == [b"a", None, None, None, b"c", b"c\x00", b"d"]
    assert engine.multi_get(6, keys) == keys
    engine.delete_range(9, b"a", b"z")  # unknown partition: nothing happens, nothing is created
    assert engine.partitions() == [5, 6]


def test_an_inverted_range_deletes_nothing_and_breaks_nothing(make_engine: EngineFactory) -> None:
    engine = make_engine()
    engine.write(0, [b"a", b"b"], [b"1", b"2"])
    engine.delete_range(0, b"b", b"a")
    engine.delete_range(0, b"a", b"a")
    assert engine.multi_get(0, [b"a", b"b"]) == [b"1", b"2"]
    engine.write(0, [b"c"], [b"3"])  # rocksdict used to fail every later call after the first
    assert engine.multi_get(0, [b"c"]) == [b"3"]


def test_drop_partition_removes_it_and_its_data(make_engine: EngineFactory) -> None:
    engine = make_engine()
    engine.write(1, [b"a"], [b"1"])
    engine.write(2, [b"a"], [b"2"])
    engine.drop_partition(1)
    engine.drop_partition(7)  # absent: ignored
    assert engine.partitions() == [2]
    assert engine.multi_get(1, [b"a"]) == [None]
    engine.write(1, [b"b"], [b"new"])  # re-created empty
    assert engine.multi_get(1, [b"a", b"b"]) == [None, b"new"]
    assert engine.partitions() == [1, 2]


def test_size_grows_with_the_data(make_engine: EngineFactory) -> None:
    engine = make_engine()
    empty = engine.size_bytes()
    engine.write(0, [i.to_bytes(4, "big") for i in range(1000)], [b"v" * 500] * 1000)
    assert engine.size_bytes() - empty >= 400_000


def test_rocks_engine_keeps_data_across_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "db")
    engine = RocksEngine(path, block_cache_bytes=1 << 20)
    engine.write(0, [b"a", b"b", b"c"], [b"1", b"2", b"3"])
    engine.write(4, [b"x", b"y"], [b"9", b"8"])
    engine.write(7, [b"z"], [b"7"])
    engine.write(0, [b"b"], [None])
    engine.delete_range(4, b"x", b"y")
    engine.drop_partition(7)
    engine.close()

    engine = RocksEngine(path, block_cache_bytes=1 << 20)
    try:
        assert engine.partitions() == [0, 4]
        assert engine.multi_get(0, [b"a", b"b", b"c"]) == [b"1", None, b"3"]
        assert engine.multi_get(4, [b"x", b"y"]) == [None, b"8"]
        assert engine.multi_get(7, [b"z"]) == [None]
    finally:
        engine.close()


# ---- random operations against a dict model ----

key_alphabet = st.sampled_from([b"\x00", b"\x01", b"a", b"\xff"])
short_keys = st.lists(key_alphabet, min_size=1, max_size=3).map(b"".join)
partitions = st.integers(min_value=0, max_value=3)
writes = st.tuples(
    st.just("write"),
    partitions,
    st.lists(st.tuples(short_keys, st.none() | st.binary(min_size=0, max_size=6)), max_size=8),
)
ranges = st.tuples(st.just("delete_range"), partitions, st.tuples(short_keys, short_keys))
drops = st.tuples(st.just("drop"), partitions, st.none())
operations = st.lists(writes | ranges | drops, max_size=25)
EVERY_KEY = sorted(bytes(k) for n in (1, 2, 3) for k in itertools.product(b"\x00\x01a\xff", repeat=n))


def apply_to_model(model: dict[int, dict[bytes, bytes]], op: Op) -> None:
    kind, partition, arg = op
    if kind == "write":
        part = model.setdefault(partition, {})
        for key, value in arg:
            if value is None:
                part.pop(key, None)
            else:
                part[key] = value
    elif kind == "delete_range":
        begin, end = arg
        for key in [k for k in model.get(partition, {}) if begin <= k < end]:
            del model[partition][key]
    else:
        model.pop(partition, None)


def apply_to_engine(engine: Engine, op: Op) -> None:
    kind, partition, arg = op
    if kind == "write":
        engine.write(partition, [k for k, _ in arg], [v for _, v in arg])
    elif kind == "delete_range":
        engine.delete_range(partition, *arg)
    else:
        engine.drop_partition(partition)


def assert_matches(engine: Engine, model: dict[int, dict[bytes, bytes]]) -> None:
    assert engine.partitions() == sorted(model)
    for partition in range(4):
        assert engine.multi_get(partition, EVERY_KEY) == [model.get(partition, {}).get(k) for k in EVERY_KEY]


@contextmanager
def engine_of(kind: str) -> Iterator[Engine]:
    if kind == "mem":
        yield MemEngine()
        return
    with tempfile.TemporaryDirectory() as path:
        engine = RocksEngine(path, block_cache_bytes=1 << 20)
        try:
            yield engine
        finally:
            engine.close()


@pytest.mark.parametrize("kind", ["mem", "rocks"])
@given(ops=operations)
def test_random_operations_match_a_dict_model(kind: str, ops: list[Op]) -> None:
    model: dict[int, dict[bytes, bytes]] = {}
    with engine_of(kind) as engine:
        for op in ops:
            apply_to_engine(engine, op)
            apply_to_model(model, op)
        assert_matches(engine, model)


@given(ops=operations, split=st.integers(min_value=0, max_value=25))
def test_rocks_engine_reopened_midway_matches_a_dict_model(ops: list[Op], split: int) -> None:
    model: dict[int, dict[bytes, bytes]] = {}
    with tempfile.TemporaryDirectory() as path:
        engine = RocksEngine(path, block_cache_bytes=1 << 20)
        try:
            for i, op in enumerate(ops):
                if i == split:
                    engine.close()
                    engine = RocksEngine(path, block_cache_bytes=1 << 20)
                apply_to_engine(engine, op)
                apply_to_model(model, op)
            assert_matches(engine, model)
        finally:
            engine.close()
