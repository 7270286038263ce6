"""IdIndex against a dict model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvstore.id_index import IdIndex

CAPACITY = 64
# A small id space makes collisions, tombstone reuse and re-inserts common; the large
# values check the full uint64 range hashes and compares correctly.
ids_strategy = st.lists(
    st.one_of(st.integers(0, 200), st.integers(2**64 - 50, 2**64 - 1)), min_size=0, max_size=40, unique=True
)


class IndexModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.index = IdIndex(CAPACITY)
        self.model: dict[int, int] = {}

    @rule(ids=ids_strategy, base=st.integers(0, 10_000))
    def put(self, ids: list[int], base: int) -> None:
        new = [i for i in ids if i not in self.model]
        values = np.arange(base, base + len(ids), dtype=np.int64)
        if len(self.model) + len(new) > CAPACITY:
            with pytest.raises(OverflowError):
                self.index.put(np.array(ids, dtype=np.uint64), values)
            return
        self.index.put(np.array(ids, dtype=np.uint64), values)
        self.model.update(zip(ids, values.tolist(), strict=True))

    @rule(ids=ids_strategy)
    def delete(self, ids: list[int]) -> None:
        self.index.delete(np.array(ids, dtype=np.uint64))
        for key in ids:
            self.model.pop(key, None)

    @rule(ids=ids_strategy)
    def get(self, ids: list[int]) -> None:
        got = self.index.get(np.array(ids, dtype=np.uint64), missing=-7)
        assert got.tolist() == [self.model.get(k, -7) for k in ids]

    @invariant()
    def count_matches(self) -> None:
        assert len(self.index) == len(self.model)


TestIndexModel = IndexModel.TestCase


@given(st.lists(st.integers(0, 2**64 - 1), unique=True, max_size=500))
def test_every_inserted_id_is_found_and_others_are_not(ids: list[int]) -> None:
    index = IdIndex(len(ids))
    arr = np.array(ids, dtype=np.uint64)
    index.put(arr, np.arange(len(ids), dtype=np.int64))
    assert index.get(arr).tolist() == list(range(len(ids)))
    others = np.array([i ^ 0x5555 for i in ids if (i ^ 0x5555) not in set(ids)], dtype=np.uint64)
    assert (index.get(others) == -1).all()


def test_churn_far_beyond_capacity_keeps_answers_exact() -> None:
    index = IdIndex(100)
    model: dict[int, int] = {}
    rng = np.random.default_rng(3)
    for round_ in range(200):
        if len(model) > 60:
            gone = rng.choice(np.array(list(model), dtype=np.uint64), 30, replace=False)
            index.delete(gone)
            for key in gone.tolist():
                del model[key]
        fresh = np.setdiff1d(rng.integers(0, 10_000, 30, dtype=np.uint64), np.array(list(model), dtype=np.uint64))
        index.put(fresh, np.full(len(fresh), round_, dtype=np.int64))
        model.update(dict.fromkeys(fresh.tolist(), round_))
        probe = rng.integers(0, 10_000, 200, dtype=np.uint64)
        assert index.get(probe).tolist() == [model.get(k, -1) for k in probe.tolist()]
