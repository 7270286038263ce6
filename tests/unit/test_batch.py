"""Batch split by node and merge back into the caller's order, checked against a dict model."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from kvclient._batch import KeyStatus, UniqueIds, VectorMerge, choose_replicas, dedupe, group_by_node
from kvclient._ring import partitions_of

DIM = 3
TABLE = "items"

# A small id space so that batches repeat ids and the model holds some and misses others.
small_ids = st.lists(
    st.integers(min_value=0, max_value=40) | st.sampled_from([2**63, 2**64 - 1]), min_size=1, max_size=60
)


def routing(data: st.DataObject) -> tuple[int, np.ndarray]:
    partitions = data.draw(st.integers(min_value=1, max_value=16), label="partitions")
    nodes = data.draw(st.integers(min_value=1, max_value=5), label="nodes")
    node_of_partition = data.draw(st.lists(st.integers(0, nodes - 1), min_size=partitions, max_size=partitions))
    return partitions, np.array(node_of_partition, dtype=np.intp)


@given(ids=small_ids)
def test_dedupe_gives_distinct_ids_that_expand_back_to_the_batch(ids: list[int]) -> None:
    arr = np.array(ids, dtype=np.uint64)
    uniq = dedupe(arr)
    assert sorted(uniq.ids.tolist()) == sorted(set(ids))
    assert uniq.expand(uniq.ids).tolist() == ids
    if len(set(ids)) == len(ids):
        assert uniq.inverse is None and uniq.ids is arr  # no duplicates: no copy, no gather


@given(ids=small_ids, data=st.data())
def test_group_by_node_puts_every_position_in_exactly_one_group_of_its_node(
    ids: list[int], data: st.DataObject
) -> None:
    uniq = dedupe(np.array(ids, dtype=np.uint64)).ids
    partitions, node_of_partition = routing(data)
    # A subset in any order, as a retry of some keys would pass.
    positions = np.array(data.draw(st.permutations(range(len(uniq)))), dtype=np.intp)
    positions = positions[: data.draw(st.integers(0, len(positions)))]
    groups = group_by_node(TABLE, uniq, positions, partitions, node_of_partition)
    assert sorted(int(p) for g in groups for p in g.positions) == sorted(positions.tolist())
    assert len({g.node for g in groups}) == len(groups)
    for group in groups:
        assert len(group.positions) > 0
        parts = partitions_of(TABLE, uniq[group.positions], partitions)
        assert (node_of_partition[parts] == group.node).all()
        # Stable: a group keeps the order the positions were given in.
        order = {int(p): i for i, p in enumerate(positions)}
        assert [order[int(p)] for p in group.positions] == sorted(order[int(p)] for p in group.positions)


@given(
    ids=small_ids,
    stored=st.dictionaries(st.integers(min_value=0, max_value=40), st.integers(-100, 100), max_size=30),
    data=st.data(),
)
def test_split_and_merge_equals_the_dict_model(ids: list[int], stored: dict[int, int], data: st.DataObject) -> None:
    model = {k: np.full(DIM, v, dtype=np.float32) for k, v in stored.items()}
    default = np.array([0.5, -1.0, 2.0], dtype=np.float32)
    failed_nodes = set(data.draw(st.lists(st.integers(0, 4), max_size=2), label="failed"))
    partitions, node_of_partition = routing(data)

    uniq = dedupe(np.array(ids, dtype=np.uint64))
    merge = VectorMerge(len(uniq.ids), default)
    all_positions = np.arange(len(uniq.ids), dtype=np.intp)
    failed_ids = set()
    for group in group_by_node(TABLE, uniq.ids, all_positions, partitions, node_of_partition):
        keys = uniq.ids[group.positions].tolist()
        if group.node in failed_nodes:
            failed_ids.update(keys)
            continue
        found = np.array([k in model for k in keys], dtype=np.bool_)
        rows = np.array([model[k] for k in keys if k in model], dtype=np.float32).reshape(-1, DIM)
        merge.add(group.positions, found, rows)
    values, status = merge.result(uniq)

    assert values.shape == (len(ids), DIM)
    for i, key in enumerate(ids):
        if key in failed_ids:
            assert status[i] == KeyStatus.ERROR
            np.testing.assert_array_equal(values[i], default)
        elif key in model:
            assert status[i] == KeyStatus.FOUND
            np.testing.assert_array_equal(values[i], model[key])
        else:
            assert status[i] == KeyStatus.MISSING
            np.testing.assert_array_equal(values[i], default)


def test_vector_merge_casts_float16_rows_to_float32() -> None:
    merge = VectorMerge(2, np.zeros(2, dtype=np.float32))
    merge.add(np.array([1, 0]), np.array([True, False]), np.array([[1.5, -2.0]], dtype=np.float16))
    values, status = merge.result(UniqueIds(ids=np.array([5, 6], dtype=np.uint64), inverse=np.array([0, 1, 1])))
    assert values.dtype == np.float32
    assert values.tolist() == [[0.0, 0.0], [1.5, -2.0], [1.5, -2.0]]
    assert status.tolist() == [KeyStatus.MISSING, KeyStatus.FOUND, KeyStatus.FOUND]


def reference_choice(replicas: list[int], cost: list[float]) -> int:
    """Lowest-cost replica, earliest on ties; the first replica when every one costs +inf."""
    best, best_cost = replicas[0], math.inf
    for node in replicas:
        if node >= 0 and cost[node] < best_cost:
            best, best_cost = node, cost[node]
    return best


@given(data=st.data())
def test_choose_replicas_picks_the_cheapest_replica(data: st.DataObject) -> None:
    nodes = data.draw(st.integers(min_value=1, max_value=6))
    width = data.draw(st.integers(min_value=1, max_value=nodes))
    cost = data.draw(st.lists(st.sampled_from([0.0, 1.0, 2.0, 5.0, math.inf]), min_size=nodes, max_size=nodes))
    rows = []
    for _ in range(data.draw(st.integers(min_value=1, max_value=12))):
        replicas = data.draw(st.permutations(range(nodes)))[: data.draw(st.integers(1, width))]
        rows.append(replicas + [-1] * (width - len(replicas)))  # short rows are padded with -1
    chosen = choose_replicas(np.array(rows, dtype=np.intp), np.array(cost))
    assert chosen.tolist() == [reference_choice(r, cost) for r in rows]


def test_choose_replicas_falls_back_to_the_first_replica_when_all_are_down() -> None:
    rows = np.array([[2, 0, 1], [1, 2, -1]], dtype=np.intp)
    chosen = choose_replicas(rows, np.full(3, np.inf))
    assert chosen.tolist() == rows[:, 0].tolist()
