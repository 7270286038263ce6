"""Fast checks of the harness's pure parts: scenario files, overrides, key streams."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.failover import longest_gap, write_failover
from bench.report import copies, label, order_key
from bench.scenario import LEADER, ScenarioError, list_scenarios, load_scenario, parse_overrides
from bench.workload import Dataset, KeyStream, make_dataset


def test_every_scenario_file_loads_and_validates() -> None:
    names = {name for name, _ in list_scenarios()}
    wanted = {"smoke", "k1000_uniform", "k1000_zipf", "k100_uniform", "k1_uniform", "k10000_uniform"}
    assert wanted | {"saturation", "node_kill", "node_add"} <= names
    kill = load_scenario("node_kill")
    assert [(a.at_s, a.action, a.node) for a in kill.actions] == [(5, "kill", "n2"), (10, "restart", "n2")]
    new = {"k1000_replicated", "leader_kill", "put_r3_k1000", "put_r3_k10000", "put_r3_k50000", "smoke_replicated"}
    assert new <= names


def test_replicated_scenarios_ask_for_what_issue_4_measures() -> None:
    both = load_scenario("k1000_replicated")
    assert [both.kvstore_replicas(n) for n in both.systems] == [1, 3] and both.batch_keys == 1000
    for name in ("leader_kill", "smoke_replicated"):
        scn = load_scenario(name)
        assert scn.kvstore_replicas(scn.systems[0]) == 3 and scn.write_stream_rate > 0
        assert [(a.action, a.node) for a in scn.actions] == [("kill", LEADER), ("restart", LEADER)]
    for k in (1000, 10000, 50000):
        put = load_scenario(f"put_r3_k{k}")
        assert put.batch_keys == k and put.write_fraction == 1.0 and put.dim == 64 and not put.rates
        assert put.unique_batches
        assert put.kvstore_replicas(put.systems[0]) == 3


def test_kvstore_replica_systems_are_validated() -> None:
    scn = load_scenario("smoke", {"systems": ["kvstore", "kvstore_r3", "redis"]})
    assert [scn.kvstore_replicas(n) for n in scn.systems] == [1, 3, None]
    assert sorted(["redis", "kvstore_r3", "floor_numpy", "kvstore", "kvstore_r1"], key=order_key) == [
        "kvstore", "kvstore_r1", "kvstore_r3", "redis", "floor_numpy"]  # fmt: skip
    assert label("kvstore_r3") == "kvstore, 3 replicas" and copies(scn.to_dict(), "kvstore_r3") == 3
    with pytest.raises(ScenarioError, match="'kvstore_r4' asks for 4 copies, must be within \\[1, nodes = 3\\]"):
        load_scenario("smoke", {"systems": ["kvstore_r4"]})
    with pytest.raises(ScenarioError, match="replicas: 0 must be within"):
        load_scenario("smoke", {"replicas": 0})
    with pytest.raises(ScenarioError, match="names a system twice"):
        load_scenario("smoke", {"systems": ["kvstore_r1", "kvstore_r1"]})
    with pytest.raises(ScenarioError, match="kvstore_rx"):
        load_scenario("smoke", {"systems": ["kvstore_rx"]})
    with pytest.raises(ScenarioError, match="write_stream_rate: the concurrent write stream runs on kvstore"):
        load_scenario("smoke", {"systems": ["kvstore", "redis"], "write_stream_rate": 5})
    with pytest.raises(ScenarioError, match="actions: a timeline needs one kvstore system"):
        load_scenario("leader_kill", {"systems": ["kvstore_r1", "kvstore_r3"]})
    assert load_scenario("leader_kill", {"systems": ["kvstore_r3"], "replicas": 1}).actions


@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), min_size=2, max_size=50))
def test_longest_gap_is_the_largest_step_between_sorted_times(times: list[float]) -> None:
    times.sort()
    gap, start = longest_gap(times)
    assert gap is not None and start is not None
    assert gap == max(b - a for a, b in itertools.pairwise(times))
    assert (start, gap) in [(a, b - a) for a, b in itertools.pairwise(times)]


@given(
    st.lists(
        st.tuples(st.floats(0, 30, allow_nan=False), st.one_of(st.none(), st.floats(0.001, 5))), min_size=1, max_size=40
    ),
    st.floats(0, 30, allow_nan=False),
    st.sets(st.integers(0, 39)),
)
def test_failover_is_the_first_ack_after_the_kill_of_an_affected_write(
    rows: list[tuple[float, float | None]], kill_s: float, hit: set[int]
) -> None:
    trace = [(i, due, lat) for i, (due, lat) in enumerate(rows)]
    out = write_failover(trace, kill_s, lambda i: i in hit)
    acks = [due + lat for i, due, lat in trace if due >= kill_s and i in hit and lat is not None]
    if acks:
        assert out["failover_s"] == round(min(acks) - kill_s, 3) and out["failover_s"] >= 0
    else:
        assert out["failover_s"] is None
    assert out["errors_after_kill"] == sum(1 for _, due, lat in trace if due >= kill_s and lat is None)
    assert out["writes_after_kill"] == sum(1 for _, due, _ in trace if due >= kill_s)


def test_overrides_parse_as_toml_and_are_validated() -> None:
    scn = load_scenario("smoke", parse_overrides(["rates=[10, 20]", "partial=true", "distribution=zipf"]))
    assert scn.rates == (10, 20) and scn.partial and scn.distribution == "zipf"
    with pytest.raises(ScenarioError, match="batch_keys: 0 must be >= 1"):
        load_scenario("smoke", {"batch_keys": 0})
    with pytest.raises(ScenarioError, match="unknown field"):
        load_scenario("smoke", {"batch_size": 5})
    with pytest.raises(ScenarioError, match="systems"):
        load_scenario("smoke", {"systems": ["memcached"]})
    with pytest.raises(ScenarioError, match="expected key=value"):
        parse_overrides(["duration_s"])


def test_key_streams_are_deterministic_and_in_range() -> None:
    for dist in ("uniform", "zipf"):
        scn = load_scenario("smoke", {"distribution": dist})
        a, b = KeyStream(scn).batches(0, 50), KeyStream(scn).batches(0, 50)
        assert a.shape == (50, scn.batch_keys) and a.dtype == np.uint64
        assert np.array_equal(a, b)
        assert not np.array_equal(a, KeyStream(scn).batches(1, 50))
        assert int(a.max()) < scn.keys


def test_unique_batches_never_repeat_an_id_within_a_batch() -> None:
    scn = load_scenario("smoke", {"unique_batches": True, "keys": 1000, "batch_keys": 300})
    batches = KeyStream(scn).batches(0, 20)
    assert batches.shape == (20, 300) and int(batches.max()) < 1000
    assert all(len(np.unique(b)) == 300 for b in batches)
    assert not np.array_equal(batches[0], batches[1])
    with pytest.raises(ScenarioError, match="unique_batches: needs distribution = 'uniform'"):
        load_scenario("smoke", {"unique_batches": True, "distribution": "zipf"})


def test_zipf_concentrates_on_few_keys() -> None:
    scn = load_scenario("smoke", {"distribution": "zipf", "batch_keys": 1000})
    batch = KeyStream(scn).batches(0, 1)[0]
    assert len(np.unique(batch)) < 0.8 * len(batch)


def test_dataset_matches_is_bit_exact() -> None:
    data: Dataset = make_dataset(load_scenario("smoke", {"keys": 100, "dtype": "float16"}))
    ids = np.array([3, 1, 3], dtype=np.uint64)
    good = data.expected(ids)
    assert good.dtype == np.float32 and data.matches(ids, good)
    bad = good.copy()
    bad[1, 0] = np.nextafter(bad[1, 0], np.float32(np.inf))
    assert not data.matches(ids, bad)
    assert not data.matches(ids, good.astype(np.float64))
