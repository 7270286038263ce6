"""Random put/delete/get sequences through the client, checked against a dict model."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvclient import Client
from kvstore.launcher import LocalCluster

DIM = 4
ID_SPACE = st.integers(min_value=0, max_value=400)
ids_lists = st.lists(ID_SPACE, min_size=1, max_size=60)
_tables = itertools.count()


@pytest.fixture(scope="module")
def model_client(shared_cluster: LocalCluster) -> Iterator[Client]:
    with Client(shared_cluster.seeds, deadline_s=10.0) as client:
        yield client


def test_client_against_dict_model(model_client: Client) -> None:
    class ClientModel(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.kv = model_client
            self.table = f"model_{next(_tables)}"
            self.kv.create_table(self.table, dim=DIM, dtype="float32")
            self.model: dict[int, np.ndarray] = {}

        @rule(ids=ids_lists, seed=st.integers(0, 2**32 - 1))
        def put(self, ids: list[int], seed: int) -> None:
            rows = np.random.default_rng(seed).standard_normal((len(ids), DIM)).astype(np.float32)
            self.kv.put(self.table, ids, rows)
            for key, row in zip(ids, rows, strict=True):
                self.model[key] = row

        @rule(ids=ids_lists)
        def delete(self, ids: list[int]) -> None:
            self.kv.delete(self.table, ids)
            for key in ids:
                self.model.pop(key, None)

        @rule(ids=ids_lists)
        def get(self, ids: list[int]) -> None:
            res = self.kv.get(self.table, ids)
            for i, key in enumerate(ids):
                assert res.found[i] == (key in self.model)
                expected = self.model.get(key, np.zeros(DIM, dtype=np.float32))
                np.testing.assert_array_equal(res.values[i], expected)

        @invariant()
        def sample_agrees(self) -> None:
            if self.model:
                keys = sorted(self.model)[:20]
                res = self.kv.get(self.table, keys)
                assert res.found.all()
                np.testing.assert_array_equal(res.values, np.stack([self.model[k] for k in keys]))

    run = settings(max_examples=15, stateful_step_count=20, deadline=None)(ClientModel)
    run.TestCase().runTest()
