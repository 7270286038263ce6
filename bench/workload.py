"""The data and the key sequences every system gets: seeded, so every system sees the same.

Pure: numpy only, no clocks or I/O. Ids are 0..keys-1. Under zipf, rank r (0 = hottest)
maps to id `perm[r]` for a seeded permutation, so the hot keys spread over partitions,
slots and RocksDB blocks instead of being ids 0, 1, 2 ...
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from bench.scenario import Scenario

U64 = npt.NDArray[np.uint64]
F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Dataset:
    """The table every system stores: `stored[i]` is the row of id i in the stored dtype."""

    stored: npt.NDArray[np.floating]

    @property
    def keys(self) -> int:
        return int(self.stored.shape[0])

    @property
    def dim(self) -> int:
        return int(self.stored.shape[1])

    @property
    def row_bytes(self) -> int:
        return int(self.stored.shape[1] * self.stored.dtype.itemsize)

    def rows(self, ids: U64) -> npt.NDArray[np.floating]:
        """Return the stored-dtype rows of `ids` (a copy)."""
        return self.stored[ids.astype(np.intp)]

    def expected(self, ids: U64) -> F32:
        """Return what a correct `get` of `ids` answers: the rows as float32."""
        return self.rows(ids).astype(np.float32, copy=False)

    def matches(self, ids: U64, values: F32) -> bool:
        """True if `values` equals the expected rows bit for bit."""
        want = np.ascontiguousarray(self.expected(ids))
        if values.dtype != np.float32 or values.shape != want.shape:
            return False
        got = np.ascontiguousarray(values)
        return bool(np.array_equal(got.view(np.uint32), want.view(np.uint32)))


def make_dataset(scn: Scenario) -> Dataset:
    """Build the table: standard-normal rows, cast to the stored dtype."""
    rng = np.random.default_rng(scn.seed)
    rows = rng.standard_normal((scn.keys, scn.dim), dtype=np.float32)
    return Dataset(rows if scn.dtype == "float32" else rows.astype(scn.dtype))


class KeyStream:
    """Batches of ids for each load phase; the same (phase, index) gives the same batch."""

    def __init__(self, scn: Scenario) -> None:
        self.batch_keys = scn.batch_keys
        self.keys = scn.keys
        self.seed = scn.seed
        self.write_fraction = scn.write_fraction
        self.unique = scn.unique_batches
        self._cdf: npt.NDArray[np.float64] | None = None
        self._perm: npt.NDArray[np.uint64] | None = None
        if scn.distribution == "zipf":
            weights = 1.0 / np.arange(1, scn.keys + 1, dtype=np.float64) ** scn.zipf_alpha
            self._cdf = np.cumsum(weights) / weights.sum()
            self._perm = np.random.default_rng([scn.seed, 1]).permutation(scn.keys).astype(np.uint64)

    def batches(self, phase: int, count: int, batch_keys: int = 0) -> U64:
        """Return `count` batches for `phase` as a (count, batch_keys) uint64 array (default: the scenario's K)."""
        rng = np.random.default_rng([self.seed, 2, phase])
        shape = (count, batch_keys or self.batch_keys)
        if self.unique:  # consecutive windows of one seeded permutation: no id twice in a batch
            perm = rng.permutation(self.keys).astype(np.uint64)
            starts = np.arange(count, dtype=np.int64)[:, None] * shape[1] % self.keys
            return perm[(starts + np.arange(shape[1])) % self.keys]
        if self._cdf is None or self._perm is None:
            return rng.integers(0, self.keys, size=shape, dtype=np.uint64)
        ranks = np.searchsorted(self._cdf, rng.random(shape), side="right")
        return self._perm[np.minimum(ranks, self.keys - 1)]

    def writes(self, phase: int, count: int) -> npt.NDArray[np.bool_]:
        """Return which of the phase's `count` requests are writes (same for every system)."""
        if self.write_fraction <= 0:
            return np.zeros(count, dtype=np.bool_)
        return np.random.default_rng([self.seed, 3, phase]).random(count) < self.write_fraction


def unique_fraction(batches: U64, sample: int = 50) -> float:
    """Return the mean fraction of distinct ids per batch over the first `sample` batches."""
    rows = batches[:sample]
    if len(rows) == 0:
        return 1.0
    return float(np.mean([len(np.unique(r)) / len(r) for r in rows]))


def batch_count(mode: str, value: float, duration_s: float, cap_keys: int, batch_keys: int) -> int:
    """Return how many batches a phase precomputes: the open loop's exact count, or a closed-loop pool.

    A closed loop cycles through its pool; `cap_keys` bounds the pool's memory.
    """
    if mode == "open":
        return max(1, int(value * duration_s))
    return max(1, min(cap_keys // batch_keys, int(duration_s * 5000)))
