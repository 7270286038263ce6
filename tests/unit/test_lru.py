"""The cache tier against a dict model: never a stale value, never over budget."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvstore.lru import ENTRY_OVERHEAD_BYTES, RecordCache, VectorCache

ROW_BYTES = 8
ENTRY_BYTES = ROW_BYTES + ENTRY_OVERHEAD_BYTES
EVERY_KEY = [*range(31), 2**63, 2**64 - 1]
keys = st.sampled_from(EVERY_KEY)
unique_keys = st.lists(keys, min_size=0, max_size=20, unique=True)
key_lists = st.lists(keys, min_size=0, max_size=20)


def u64(ids: list[int]) -> np.ndarray:
    return np.array(ids, dtype=np.uint64)


class VectorCacheMachine(RuleBasedStateMachine):
    """Every row written is a fresh version number, so a stale row cannot pass for a current one."""

    def __init__(self) -> None:
        super().__init__()
        self.versions = itertools.count(1)
        self.model: dict[int, int] = {}  # id -> version last inserted (absent: never, or discarded)

    @initialize(
        entries=st.integers(min_value=0, max_value=12), spare=st.integers(min_value=0, max_value=ENTRY_BYTES - 1)
    )
    def make(self, entries: int, spare: int) -> None:
        self.cache = VectorCache(ROW_BYTES, entries * ENTRY_BYTES + spare)
        assert self.cache.capacity == entries

    def cached(self, ids: list[int]) -> dict[int, int]:
        """Return id -> version of the ids the cache holds (looking them up marks them used)."""
        slots = self.cache.lookup(u64(ids))
        assert slots.shape == (len(ids),)
        hit = slots >= 0
        rows = self.cache.rows(slots[hit])
        return dict(zip(u64(ids)[hit].tolist(), rows.view("<u8")[:, 0].tolist(), strict=True))

    @rule(ids=unique_keys)
    def insert(self, ids: list[int]) -> None:
        versions = [next(self.versions) for _ in ids]
        rows = np.array(versions, dtype="<u8").view(np.uint8).reshape(len(ids), ROW_BYTES)
        self.cache.insert(u64(ids), rows)
        self.model.update(zip(ids, versions, strict=True))
        kept = ids[len(ids) - self.cache.capacity :] if self.cache.capacity else []
        assert self.cached(kept) == {k: self.model[k] for k in kept}  # the last `capacity` ids stay

    @rule(ids=key_lists)
    def lookup(self, ids: list[int]) -> None:
        for key, version in self.cached(ids).items():
            assert self.model.get(key) == version

    @rule(ids=key_lists)
    def discard(self, ids: list[int]) -> None:
        self.cache.discard(u64(ids))
        for key in ids:
            self.model.pop(key, None)
        assert self.cached(ids) == {}

    @precondition(lambda self: self.model)
    @rule()
    def clear(self) -> None:
        self.cache.clear()
        self.model.clear()
        assert len(self.cache) == 0

    @invariant()
    def within_budget(self) -> None:
        assert len(self.cache) <= self.cache.capacity
        assert self.cache.size_bytes == len(self.cache) * ENTRY_BYTES
        assert self.cache.size_bytes <= self.cache.budget_bytes

    @invariant()
    def no_stale_or_forgotten_value(self) -> None:
        held = self.cached(EVERY_KEY)
        assert len(held) == len(self.cache)
        for key, version in held.items():
            assert self.model.get(key) == version


TestVectorCache = VectorCacheMachine.TestCase


class RecordCacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.versions = itertools.count(1)
        self.model: dict[int, bytes] = {}

    @initialize(budget=st.integers(min_value=-10, max_value=8 * ENTRY_OVERHEAD_BYTES))
    def make(self, budget: int) -> None:
        self.cache = RecordCache(budget)

    def record(self, size: int) -> bytes:
        return next(self.versions).to_bytes(8, "little") + b"r" * size

    @rule(ids=key_lists, sizes=st.lists(st.integers(min_value=0, max_value=300), min_size=20, max_size=20))
    def insert(self, ids: list[int], sizes: list[int]) -> None:
        """Duplicates allowed: the later one wins."""
        values = [self.record(size) for size in sizes[: len(ids)]]
        self.cache.insert(u64(ids), values)
        self.model.update(zip(ids, values, strict=True))
        if ids and len(values[-1]) + ENTRY_OVERHEAD_BYTES <= self.cache.budget_bytes:
            assert self.cache.get_many(u64(ids[-1:])) == [values[-1]]  # the newest always fits

    @rule(ids=key_lists)
    def get(self, ids: list[int]) -> None:
        for key, value in zip(ids, self.cache.get_many(u64(ids)), strict=True):
            assert value is None or value == self.model.get(key)

    @rule(ids=key_lists)
    def discard(self, ids: list[int]) -> None:
        self.cache.discard(u64(ids))
        for key in ids:
            self.model.pop(key, None)
        assert self.cache.get_many(u64(ids)) == [None] * len(ids)

    @invariant()
    def within_budget(self) -> None:
        assert 0 <= self.cache.size_bytes <= self.cache.budget_bytes

    @invariant()
    def size_is_the_sum_of_the_entries(self) -> None:
        held = [v for v in self.cache.get_many(u64(EVERY_KEY)) if v is not None]
        assert len(held) == len(self.cache)
        assert self.cache.size_bytes == sum(len(v) + ENTRY_OVERHEAD_BYTES for v in held)


TestRecordCache = RecordCacheMachine.TestCase


# ---- scenarios ----


def rows_for(ids: list[int]) -> np.ndarray:
    return np.array(ids, dtype="<u8").view(np.uint8).reshape(len(ids), ROW_BYTES)


@pytest.mark.parametrize("budget", [0, -5, ENTRY_BYTES - 1])
def test_vector_cache_of_capacity_zero_holds_nothing(budget: int) -> None:
    cache = VectorCache(ROW_BYTES, budget)
    assert cache.capacity == 0
    cache.insert(u64([1, 2]), rows_for([1, 2]))
    assert cache.lookup(u64([1, 2])).tolist() == [-1, -1]
    cache.discard(u64([1]))
    assert len(cache) == 0
    assert cache.size_bytes == 0


def test_vector_cache_keeps_the_last_ids_of_an_oversized_insert() -> None:
    cache = VectorCache(ROW_BYTES, 4 * ENTRY_BYTES)
    cache.insert(u64([1, 2]), rows_for([100, 200]))
    ids = list(range(1, 11))
    cache.insert(u64(ids), rows_for([i * 1000 for i in ids]))
    slots = cache.lookup(u64(ids))
    assert (slots[-4:] >= 0).all()
    assert cache.rows(slots[-4:]).view("<u8")[:, 0].tolist() == [7000, 8000, 9000, 10000]
    # 1 and 2 were cached before; their old rows must not outlive the overwrite.
    assert (slots[:2] == -1).all()


def test_vector_cache_rejects_a_non_positive_row_size() -> None:
    with pytest.raises(ValueError, match="row_bytes"):
        VectorCache(0, 1000)


def survives(touch: bool, later_inserts: int) -> bool:
    """Fill a cache of 8, let one lap clear every reference bit, maybe touch id 4, insert more."""
    cache = VectorCache(ROW_BYTES, 8 * ENTRY_BYTES)
    first = list(range(8))
    cache.insert(u64(first), rows_for(first))
    cache.insert(u64([100]), rows_for([100]))  # a full lap: every bit cleared, slot 0 evicted
    if touch:
        assert cache.lookup(u64([4]))[0] >= 0
    for n in range(1, later_inserts + 1):
        cache.insert(u64([100 + n]), rows_for([100 + n]))
    return bool(cache.lookup(u64([4]))[0] >= 0)


def inserts_until_evicted(touch: bool) -> int:
    return next(n for n in range(1, 30) if not survives(touch, n))


def test_clock_gives_a_touched_row_a_second_chance() -> None:
    untouched, touched = inserts_until_evicted(False), inserts_until_evicted(True)
    assert touched > untouched


def test_record_cache_evicts_the_least_recently_used() -> None:
    budget = 3 * (ENTRY_OVERHEAD_BYTES + 10)
    cache = RecordCache(budget)
    cache.insert(u64([1, 2, 3]), [b"a" * 10, b"b" * 10, b"c" * 10])
    assert cache.get_many(u64([1])) == [b"a" * 10]  # 1 becomes the most recent
    cache.insert(u64([4]), [b"d" * 10])
    assert cache.get_many(u64([1, 2, 3, 4])) == [b"a" * 10, None, b"c" * 10, b"d" * 10]


def test_record_cache_skips_a_record_larger_than_its_budget_and_drops_the_old_value() -> None:
    cache = RecordCache(ENTRY_OVERHEAD_BYTES + 10)
    cache.insert(u64([1]), [b"old"])
    cache.insert(u64([1]), [b"x" * 11])
    assert cache.get_many(u64([1])) == [None]
    assert cache.size_bytes == 0
