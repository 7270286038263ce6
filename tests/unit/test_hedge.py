"""Hedge delay estimator, hedge budget, alternate-replica choice and the hedge race."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvclient import AsyncClient, ClientError, ServerError, UnavailableError
from kvclient._batch import alternate_replicas
from kvclient._hedge import HedgeBudget, HedgePolicy, Hedging, LatencyEstimate
from kvclient._reads import _first_success

latencies = st.lists(st.floats(min_value=0.0, max_value=10.0, allow_nan=False), min_size=1, max_size=200)


@given(samples=latencies, min_ms=st.floats(0.0, 5.0), extra_ms=st.floats(0.0, 100.0))
def test_delay_stays_within_floor_and_cap(samples: list[float], min_ms: float, extra_ms: float) -> None:
    est = LatencyEstimate()
    for s in samples:
        est.record(s)
    min_s, cap_s = min_ms / 1000, (min_ms + extra_ms) / 1000
    assert min_s <= est.delay_s(min_s, cap_s) <= cap_s


@given(latency=st.floats(min_value=0.0, max_value=1.0), count=st.integers(60, 300))
def test_steady_latency_converges_to_that_latency(latency: float, count: int) -> None:
    est = LatencyEstimate()
    for _ in range(count):
        est.record(latency)
    # The deviation decays by 3/4 per sample from latency/2: after 60 samples it is negligible.
    assert est.smoothed_s == pytest.approx(latency, rel=1e-9, abs=1e-12)
    assert est.delay_s(0.0, math.inf) == pytest.approx(latency, rel=1e-6, abs=1e-9)


@given(samples=latencies)
def test_delay_never_drops_below_the_smoothed_latency(samples: list[float]) -> None:
    est = LatencyEstimate()
    for s in samples:
        est.record(s)
    assert est.deviation_s >= 0
    assert est.delay_s(0.0, math.inf) >= est.smoothed_s
    assert min(samples) - 1e-9 <= est.smoothed_s <= max(samples) + 1e-9


def test_a_jumpy_node_gets_a_longer_delay_than_a_steady_one() -> None:
    steady, jumpy = LatencyEstimate(), LatencyEstimate()
    for i in range(50):
        steady.record(0.002)
        jumpy.record(0.001 if i % 2 else 0.003)  # same mean, more spread
    assert jumpy.delay_s(0.0, 1.0) > steady.delay_s(0.0, 1.0)


def test_unknown_node_waits_for_the_cap_and_a_known_one_adapts() -> None:
    hedging = Hedging(HedgePolicy(after_ms=8.0, min_ms=1.0))
    assert hedging.delay_s("n1") == pytest.approx(0.008)
    for _ in range(100):
        hedging.record("n1", 0.0002)
    assert hedging.delay_s("n1") == pytest.approx(0.001)  # the floor, not 0.2 ms
    for _ in range(100):
        hedging.record("n2", 0.5)
    assert hedging.delay_s("n2") == pytest.approx(0.008)  # the cap
    assert hedging.delay_s("n3") == pytest.approx(0.008)


@given(
    ratio=st.floats(0.0, 1.0),
    burst=st.integers(1, 20),
    steps=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 5)), max_size=100),
)
def test_budget_bounds_hedges_by_ratio_times_requests_plus_burst(
    ratio: float, burst: int, steps: list[tuple[int, int]]
) -> None:
    budget = HedgeBudget(ratio, burst)
    requests = hedges = 0
    for earned, wanted in steps:
        budget.earn(earned)
        requests += earned
        for _ in range(wanted):
            hedges += budget.take()
        assert hedges <= ratio * requests + burst + 1e-9
        assert 0 <= budget.tokens <= burst


def test_budget_refills_after_it_runs_dry() -> None:
    budget = HedgeBudget(0.1, 2)
    assert budget.take() and budget.take() and not budget.take()
    budget.earn(9)
    assert not budget.take()  # 0.9 tokens
    budget.earn(1)
    assert budget.take()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"after_ms": -1.0}, "hedge_after_ms"),
        ({"after_ms": math.inf}, "hedge_after_ms"),
        ({"after_ms": 5.0, "min_ms": 6.0}, "hedge_min_ms"),
        ({"ratio": 1.5}, "hedge_ratio"),
        ({"burst": 0.0}, "hedge_burst"),
        ({"after_ms": "5"}, "hedge_after_ms"),
        ({"ratio": math.nan}, "hedge_ratio"),
    ],
)
def test_bad_policy_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ClientError) as info:
        HedgePolicy(**kwargs).validate()  # type: ignore[arg-type]
    assert info.value.field == field


def test_client_checks_its_hedge_settings() -> None:
    with pytest.raises(ClientError) as info:
        AsyncClient("127.0.0.1:1", hedge_ratio=-0.5)
    assert info.value.field == "hedge_ratio"
    assert not HedgePolicy(after_ms=None).enabled and not HedgePolicy(after_ms=0).enabled


@given(data=st.data())
def test_alternate_replica_is_the_cheapest_other_live_one(data: st.DataObject) -> None:
    nodes = data.draw(st.integers(min_value=1, max_value=6))
    width = data.draw(st.integers(min_value=1, max_value=nodes))
    costs = st.sampled_from([0.0, 1.0, 3.0, 1e6, math.inf])
    cost = np.array(data.draw(st.lists(costs, min_size=nodes, max_size=nodes)))
    exclude = data.draw(st.integers(0, nodes - 1))
    rows = []
    for _ in range(data.draw(st.integers(min_value=1, max_value=12))):
        replicas = data.draw(st.permutations(range(nodes)))[: data.draw(st.integers(1, width))]
        rows.append(replicas + [-1] * (width - len(replicas)))
    chosen = alternate_replicas(np.array(rows, dtype=np.intp), cost, exclude)
    for row, node in zip(rows, chosen.tolist(), strict=True):
        usable = [r for r in row if r >= 0 and r != exclude and math.isfinite(cost[r])]
        if not usable:
            assert node == -1
        else:
            assert node == min(usable, key=lambda r: (cost[r], row.index(r)))


async def _outcome(gate: asyncio.Event, value: object) -> object:
    await gate.wait()
    if isinstance(value, Exception):
        raise value
    return value


def test_first_success_skips_a_failure_and_reports_the_node_error_when_all_fail() -> None:
    async def scenario() -> None:
        first_gate, second_gate = asyncio.Event(), asyncio.Event()
        node = asyncio.ensure_future(_outcome(first_gate, UnavailableError("node down")))
        hedge = asyncio.ensure_future(_outcome(second_gate, "hedge rows"))
        race = asyncio.ensure_future(_first_success(node, hedge))
        first_gate.set()  # the node fails first: the race waits for the hedge
        for _ in range(10):  # let the failure propagate as far as it would
            await asyncio.sleep(0)
        assert node.done() and not race.done()
        second_gate.set()
        assert await race is hedge

        gates = asyncio.Event()
        both = [asyncio.ensure_future(_outcome(gates, ServerError(f"failure {i}"))) for i in range(2)]
        gates.set()
        with pytest.raises(ServerError, match="failure 0"):
            await _first_success(*both)

    asyncio.run(scenario())
