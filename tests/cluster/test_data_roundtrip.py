"""Round trips through the smart client against a real 3-node cluster."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from kvclient import AsyncClient, Client, KeyStatus
from kvstore.launcher import LocalCluster


def _rows(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


@pytest.mark.parametrize("transport", ["stream", "unary"])
def test_float32_round_trip_keeps_caller_order_and_duplicates(cluster: LocalCluster, transport: str) -> None:
    with Client(cluster.seeds, transport=transport) as kv:  # type: ignore[arg-type]
        table = f"f32_{transport}"
        kv.create_table(table, dim=16)
        ids = np.arange(1000, 3000, dtype=np.uint64)
        vectors = _rows(len(ids), 16, seed=1)
        assert kv.put(table, ids, vectors) == len(ids)
        ask = np.array([2999, 5, 1000, 2999, 1500, 7_000_000], dtype=np.uint64)
        res = kv.get(table, ask)
        expected_found = np.array([True, False, True, True, True, False])
        np.testing.assert_array_equal(res.found, expected_found)
        for i, key in enumerate(ask):
            if expected_found[i]:
                np.testing.assert_array_equal(res.values[i], vectors[int(key) - 1000])
            else:
                np.testing.assert_array_equal(res.values[i], np.zeros(16, dtype=np.float32))
        assert res.values.dtype == np.float32 and res.values.shape == (6, 16)
        assert list(res.status) == [KeyStatus.FOUND if f else KeyStatus.MISSING for f in expected_found]


def test_keys_spread_over_every_node(kv: Client) -> None:
    kv.create_table("spread", dim=4)
    ids = np.arange(5000, dtype=np.uint64)
    kv.put("spread", ids, _rows(5000, 4, seed=2))
    written = [s.keys_written for s in kv.node_stats()]  # type: ignore[union-attr]
    assert len(written) == 3 and all(w > 0 for w in written), written


def test_float16_round_trip_within_half_precision(kv: Client) -> None:
    kv.create_table("half", dim=32, dtype="float16")
    ids = np.arange(500, dtype=np.uint64)
    vectors = _rows(500, 32, seed=3) * 10
    kv.put("half", ids, vectors)
    res = kv.get("half", ids[::-1])
    assert res.values.dtype == np.float32 and res.found.all()
    np.testing.assert_allclose(res.values, vectors[::-1], rtol=2**-10, atol=1e-3)
    np.testing.assert_array_equal(res.values, vectors[::-1].astype(np.float16).astype(np.float32))


def test_default_vector_and_nan_default_fill_missing_rows(kv: Client) -> None:
    default = np.linspace(-1, 1, 8, dtype=np.float32)
    kv.create_table("with_default", dim=8, default=default)
    kv.create_table("nan_default", dim=8, default="nan")
    kv.put("with_default", [1], default[None, :] * 3)
    res = kv.get("with_default", [1, 2])
    np.testing.assert_array_equal(res.values[0], default * 3)
    np.testing.assert_array_equal(res.values[1], default)
    assert np.isnan(kv.get("nan_default", [99]).values).all()


def test_overwrite_and_delete_are_seen_by_later_reads(kv: Client) -> None:
    kv.create_table("rewrite", dim=4)
    ids = np.arange(300, dtype=np.uint64)
    first, second = _rows(300, 4, seed=4), _rows(300, 4, seed=5)
    kv.put("rewrite", ids, first)
    kv.get("rewrite", ids)  # warm the cache tier with the first values
    kv.put("rewrite", ids, second)
    np.testing.assert_array_equal(kv.get("rewrite", ids).values, second)
    kv.delete("rewrite", ids[:100])
    res = kv.get("rewrite", ids)
    assert not res.found[:100].any() and res.found[100:].all()
    np.testing.assert_array_equal(res.values[100:], second[100:])


def test_duplicate_ids_in_one_put_last_wins(kv: Client) -> None:
    kv.create_table("dupes", dim=2)
    kv.put("dupes", [7, 8, 7], np.array([[1, 1], [2, 2], [3, 3]], dtype=np.float32))
    np.testing.assert_array_equal(kv.get("dupes", [7, 8]).values, [[3, 3], [2, 2]])


def test_features_round_trip(kv: Client) -> None:
    kv.create_table("user_features", kind="features")
    records = [{"age": i, "country": "de" if i % 2 else "fr", "scores": [i, i / 2]} for i in range(50)]
    kv.put_features("user_features", np.arange(50), records)
    res = kv.get_features("user_features", [3, 1000, 3, 49])
    assert res.records == [records[3], None, records[3], records[49]]
    assert list(res.found) == [True, False, True, True]
    kv.delete("user_features", [3])
    assert kv.get_features("user_features", [3]).records == [None]


def test_async_client_matches_sync_client(cluster: LocalCluster) -> None:
    async def scenario() -> np.ndarray:
        async with AsyncClient(cluster.seeds) as kv:
            await kv.create_table("async_tab", dim=8)
            await kv.put("async_tab", np.arange(100), _rows(100, 8, seed=6))
            results = await asyncio.gather(*(kv.get("async_tab", np.arange(i, i + 10)) for i in range(0, 100, 10)))
            return np.concatenate([r.values for r in results])

    np.testing.assert_array_equal(asyncio.run(scenario()), _rows(100, 8, seed=6))


def test_drop_table_then_recreate_starts_empty(kv: Client) -> None:
    kv.create_table("recreated", dim=4)
    kv.put("recreated", [1, 2, 3], _rows(3, 4, seed=7))
    kv.drop_table("recreated")
    assert "recreated" not in {t.name for t in kv.list_tables()}
    kv.create_table("recreated", dim=4)
    assert not kv.get("recreated", [1, 2, 3]).found.any()


def test_second_client_sees_table_created_by_first(cluster: LocalCluster) -> None:
    with Client(cluster.seeds) as first, Client(cluster.seeds) as second:
        second.refresh_map()
        first.create_table("late_table", dim=3)
        first.put("late_table", [1], [[1.0, 2.0, 3.0]])
        np.testing.assert_array_equal(second.get("late_table", [1]).values, [[1, 2, 3]])
