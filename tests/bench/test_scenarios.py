"""Fast checks of the harness's pure parts: scenario files, overrides, key streams."""

from __future__ import annotations

import numpy as np
import pytest

from bench.scenario import ScenarioError, list_scenarios, load_scenario, parse_overrides
from bench.workload import Dataset, KeyStream, make_dataset


def test_every_scenario_file_loads_and_validates() -> None:
    names = {name for name, _ in list_scenarios()}
    wanted = {"smoke", "k1000_uniform", "k1000_zipf", "k100_uniform", "k1_uniform", "k10000_uniform"}
    assert wanted | {"saturation", "node_kill", "node_add"} <= names
    kill = load_scenario("node_kill")
    assert [(a.at_s, a.action, a.node) for a in kill.actions] == [(5, "kill", "n2"), (10, "restart", "n2")]


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
